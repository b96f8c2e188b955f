"""`make demo` end to end on a shortened schedule: data, tokenizer, stage 1, stage 2, evaluation."""
import json

from internvl_jax import demo


def test_demo_quick(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as `make demo` passes
    demo.main(["--out", "out", "--quick"])
    tmp_path = tmp_path / "out"
    results = json.loads((tmp_path / "results.json").read_text())
    assert {row["type"] for row in results["results"]} >= {"shape", "colour", "count", "position", "word"}
    assert all(0.0 <= row["accuracy"] <= 1.0 and 0 < row["chance"] < 1 for row in results["results"])
    assert (tmp_path / "stage2" / "metrics.jsonl").exists()
    assert "blank-image control" in capsys.readouterr().out
