"""`python -m internvl_jax.data.validate`: per-data-set report, every bad row by file and line, exit codes."""
import json

from data_fixtures import BAD_SET_MAX_PIXELS, NUM_TRAIN, bad_meta, synthetic_meta, tokenizer_dir  # noqa: F401
from internvl_jax.data.validate import main


def test_clean_data_passes(synthetic_meta, tokenizer_dir, capsys):
    assert main([str(synthetic_meta), "--tokenizer", str(tokenizer_dir), "--config", "tiny"]) == 0
    out = capsys.readouterr().out
    assert f"OK: {NUM_TRAIN} usable samples in 1 data sets" in out
    assert "text-only" in out and "truncated at T: 0" in out and "would be dropped 0" in out


def test_every_bad_row_is_listed_and_the_exit_code_is_1(bad_meta, tokenizer_dir, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    code = main([str(bad_meta), "--tokenizer", str(tokenizer_dir), "--config", "tiny", "--check-images",
                 "--max-pixels", str(BAD_SET_MAX_PIXELS), "--json", str(report_path)])
    assert code == 1
    out = capsys.readouterr().out
    expected = json.loads((bad_meta.parent / "expected.json").read_text())
    for line, outcome in expected.items():
        if outcome != "ok":
            assert f"bad.jsonl:{line}: {outcome}" in out
    (report,) = json.loads(report_path.read_text())
    assert report["usable"] == sum(outcome == "ok" for outcome in expected.values())
    assert report["truncated"] == 1 and report["bad_lines"] == 1
    assert sum(report["dropped"].values()) == sum(outcome not in ("ok", "bad_line") for outcome in expected.values())


def test_without_decoding_only_decode_failures_go_unnoticed(bad_meta, tokenizer_dir, capsys):
    assert main([str(bad_meta), "--tokenizer", str(tokenizer_dir), "--config", "tiny",
                 "--max-pixels", str(BAD_SET_MAX_PIXELS)]) == 1
    out = capsys.readouterr().out
    assert "image_missing" in out and "image_truncated" not in out and "size_mismatch" not in out


def test_tile_budget_and_unreadable_meta(synthetic_meta, tokenizer_dir, tmp_path, capsys):
    assert main([str(synthetic_meta), "--tokenizer", str(tokenizer_dir), "--config", "tiny",
                 "--max-tiles-per-row", "4"]) == 1
    assert "too_many_tiles" in capsys.readouterr().out
    assert main([str(tmp_path / "absent.json"), "--tokenizer", str(tokenizer_dir), "--config", "tiny"]) == 2
    assert "meta file not found" in capsys.readouterr().err
