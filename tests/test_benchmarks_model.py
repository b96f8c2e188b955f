"""The model benchmark runs in its quick mode (figures are printed, never asserted)."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import model_step  # noqa: E402


def test_model_step_benchmark_quick(capsys):
    model_step.main(["--quick"])
    out = capsys.readouterr().out
    assert "forward+backward" in out and "temporaries" in out
