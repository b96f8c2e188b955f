"""The data pipeline benchmark runs in its quick mode: outputs must equal the reference (figures are printed)."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import data_pipeline  # noqa: E402


def test_data_pipeline_benchmark_quick(fixtures_dir, capsys):
    data_pipeline.main(["--quick", "--tokenizer", str(fixtures_dir / "official_template")])
    out = capsys.readouterr().out
    assert "outputs equal to the reference: True" in out
    assert "identical batches for workers [0, 1, 2]: True" in out
    for name in ("reference (1 process)", "pipeline, 0 workers", "pipeline, 1 worker", "pipeline, 2 workers"):
        assert name in out
