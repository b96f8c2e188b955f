"""`python -m internvl_jax.eval` end to end on the hand-written benchmark files (a scripted predictor
stands in for the checkpoint): every benchmark at once, the tile-budget sweep's table and plot,
sharded processes, and the exit status and message for bad input."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO
from internvl_jax.eval.__main__ import main
from test_eval_benchmarks import (  # noqa: F401 (data_dir is a fixture)
    EXPECTED_PROMPTS, EXPECTED_SCORES, ScriptedPredictor, data_dir, script_for)

OUTPUT_NAMES = {"jsonl:custom/shapes.jsonl": "shapes", "tsv:seed/SEEDBench_IMG_mini.tsv": "SEEDBench_IMG_mini"}


def cli(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--out", str(out), "--checkpoint", "ckpt-dir", "--no-progress", *extra]


def test_every_benchmark_in_one_run(data_dir, tmp_path, capsys):
    names = list(EXPECTED_PROMPTS)
    predictor = ScriptedPredictor(script_for(*names))
    status = main(cli(data_dir, tmp_path, "--benchmarks", ",".join(names)), predictor=predictor)
    assert status == 0
    printed = capsys.readouterr().out
    for name in names:
        document = json.loads((tmp_path / OUTPUT_NAMES.get(name, name) / "results.json").read_text())
        expected = EXPECTED_SCORES[name][0]
        assert document["score"] == (None if expected is None else pytest.approx(expected)), name
        assert document["settings"]["preset"] == "official" and document["settings"]["checkpoint"] == "ckpt-dir"
        assert document["settings"]["version"] == "0.1.0"
        assert (tmp_path / OUTPUT_NAMES.get(name, name) / "predictions_vlmevalkit.tsv").exists()
    assert "textvqa (tiles 24): vqa_accuracy 50.00 over 3 samples" in printed
    assert "mmbench_test_en (tiles 6): no ground truth (export only) over 2 samples" in printed


class TileSensitivePredictor(ScriptedPredictor):
    """Answers from the script with at least 6 tiles, wrongly with fewer."""

    def predict(self, requests):
        answers = super().predict(requests)
        return [answer if request.max_tiles >= 6 else "wrong" for request, answer in zip(requests, answers)]


def test_tile_budget_sweep(data_dir, tmp_path, capsys):
    predictor = TileSensitivePredictor(script_for("chartqa", "scienceqa"))
    status = main(cli(data_dir, tmp_path, "--benchmarks", "chartqa,scienceqa", "--max-tiles", "1,6,12"),
                  predictor=predictor)
    assert status == 0
    assert sorted({request.max_tiles for request in predictor.requests}) == [1, 6, 12]
    results = json.loads((tmp_path / "tiles-12" / "scienceqa" / "results.json").read_text())
    assert results["settings"]["options"]["max_tiles"] == 12
    assert (tmp_path / "sweep.md").read_text() == (
        "| benchmark | metric | 1 | 6 | 12 |\n"
        "|---|---|---|---|---|\n"
        "| chartqa | relaxed_accuracy | 0.00 | 62.50 | 62.50 |\n"
        "| scienceqa | circular_accuracy | 0.00 | 66.67 | 66.67 |\n")
    assert (tmp_path / "sweep.csv").read_text().splitlines() == [
        "benchmark,metric,1,6,12", "chartqa,relaxed_accuracy,0.00,62.50,62.50",
        "scienceqa,circular_accuracy,0.00,66.67,66.67"]
    plot = Image.open(tmp_path / "sweep.png")
    assert plot.format == "PNG" and plot.size == (720, 260)  # two panels side by side
    colours = {colour for _, colour in plot.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert (31, 119, 180) in colours and (0, 0, 0) in colours  # the series and the axes/labels
    assert "wrote" in capsys.readouterr().out


def test_shards_as_separate_invocations(data_dir, tmp_path, capsys):
    for shard in ("0/2", "1/2"):
        status = main(cli(data_dir, tmp_path, "--benchmarks", "pope", "--shard", shard),
                      predictor=ScriptedPredictor(script_for("pope")))
        assert status == 0
    printed = capsys.readouterr().out
    assert printed.count("pope (tiles 6): pope_f1 55.56 over 6 samples") == 1  # only the last shard reports


def test_failed_samples_set_the_exit_status(data_dir, tmp_path, capsys):
    predictor = ScriptedPredictor({("here", "What shape is shown? Answer the question using a single word or phrase."):
                                   "circle"})
    assert main(cli(data_dir, tmp_path, "--benchmarks", "jsonl:bad/missing_image.jsonl"), predictor=predictor) == 1
    assert "missing_image (tiles 6): exact_match 100.00 over 2 samples, 1 FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, message", [
    (["--benchmarks", "textvqa,nope"], "unknown benchmark 'nope'"),
    (["--benchmarks", "jsonl:bad/malformed.jsonl"], "malformed.jsonl, line 2: malformed JSON"),
    (["--benchmarks", "docvqa", "docvqa.file=bad/no_answer.jsonl"], "no_answer.jsonl, line 2: missing field 'answer'"),
    (["--benchmarks", "textvqa", "textvqa.max_tile=3"], "textvqa has no setting 'max_tile'"),
    (["--benchmarks", "textvqa", "--max-tiles", "1,x"], "--max-tiles takes integers"),
    (["--benchmarks", "textvqa", "--preset", "official", "max_tiles"], "settings are written key=value"),
])
def test_bad_input_exits_2_with_a_clear_message(arguments, message, data_dir, tmp_path, capsys):
    predictor = ScriptedPredictor({})
    assert main(cli(data_dir, tmp_path, *arguments), predictor=predictor) == 2
    assert message in capsys.readouterr().err
    assert predictor.requests == []  # input is checked before anything is asked


def test_changed_settings_exit_2(data_dir, tmp_path, capsys):
    assert main(cli(data_dir, tmp_path, "--benchmarks", "ai2d"), predictor=ScriptedPredictor(script_for("ai2d"))) == 0
    changed = cli(data_dir, tmp_path, "--benchmarks", "ai2d", "max_new_tokens=5")
    assert main(changed, predictor=ScriptedPredictor({})) == 2
    assert "prediction made with other settings" in capsys.readouterr().err


def test_help_and_list_run_as_a_module():
    command = [sys.executable, "-m", "internvl_jax.eval"]
    usage = subprocess.run(command + ["--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--max-tiles" in usage and "--multi-turn" in usage and "jsonl:PATH" in usage
    listing = subprocess.run(command + ["--list", "--benchmarks", "docvqa", "--preset", "vlmevalkit"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    assert "max_tiles = 18" in listing and "prompt_sep = '\\n'" in listing
