"""The generation benchmark runs in its quick mode: figures are printed, not asserted (the CPU is
shared); the compile behaviour is asserted."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import generate as generate_benchmark  # noqa: E402


def test_generate_benchmark_quick(capsys):
    report = generate_benchmark.main(["--quick"])
    out = capsys.readouterr().out
    assert report["programs"] == 4  # prefill + decode for batch 1 and for batch 8
    assert report["compiles_after_warmup"] == 0
    for batch in (1, 8):
        row = report["results"][batch]
        assert row["ours_decode_tok_s"] > 0 and row["ref_decode_tok_s"] > 0
        assert f"{batch:>5} ratio" in out
    assert "compilations after warm-up: 0" in out
