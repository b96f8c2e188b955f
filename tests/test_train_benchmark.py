"""The train-step benchmark runs in its quick mode: its figures are printed and reported, never
asserted (the CPU is shared); the fields and the memory analysis must be there."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import train_step as train_benchmark  # noqa: E402


def test_train_benchmark_quick(capsys):
    report = train_benchmark.main(["--quick"])
    out = capsys.readouterr().out
    for side in ("ours", "reference"):
        assert report[side]["tokens_per_s"] > 0 and 0 < report[side]["peak_fraction"]
    assert report["ratio"] > 0 and report["peak_flops"] > 0 and report["model_flops"] > 0
    assert report["memory"]["temporaries"] > 0 and report["memory"]["arguments"] > 0
    for field in ("ratio:", "of peak", "fp32 matmul peak", "memory analysis (compiled step)", "temporaries",
                  "internvl-jax", "transformers"):
        assert field in out
