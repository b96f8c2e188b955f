"""Evaluation outputs: the results JSON, the VLMEvalKit-style predictions export, the sweep table.

Files of one benchmark run (in its output folder):

    results.json                 score, breakdown, counts, failures, and every setting used
    predictions*.jsonl           the raw records (see `store`)
    predictions_vlmevalkit.tsv   the source rows (images left out) + a `prediction` column, in
                                 the source's order; VLMEvalKit's `load` reads TSV, so its scorer
                                 can take the file (rename it to <model>_<dataset>.tsv)

A tile-budget sweep adds `sweep.md`, `sweep.csv` and `sweep.png` (score against tiles) to the
top output folder.
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from internvl_jax.eval.benchmarks import Benchmark, Score
from internvl_jax.eval.plot import plot_panels
from internvl_jax.eval.samples import Sample

RESULTS = "results.json"
EXPORT = "predictions_vlmevalkit.tsv"


def write_json(path: pathlib.Path, data: Any) -> None:
    """Writes through a temporary file and a rename, so readers never see half a file (several
    shards may gather at the same moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def results_document(benchmark: Benchmark, samples: Sequence[Sample], records: Mapping[str, dict],
                     score: Score | None, settings: Mapping[str, Any], prediction_files: Sequence[str]) -> dict:
    """The results JSON of one benchmark run; `settings` are recorded as given."""
    failed = [{"id": sample.id, "error": _failure(records.get(sample.id))} for sample in samples
              if records.get(sample.id) is None or records[sample.id]["failed"]]
    document = {
        "benchmark": benchmark.name,
        "score": None if score is None else score.value,
        "metric": None if score is None else score.metric,
        "details": {} if score is None else score.details,
        "num_samples": len(samples),
        "num_failed": len(failed),
        # With failures the score covers only the answered samples; rerun to retry them.
        "complete": not failed,
        "failed": failed,
        "settings": dict(settings),
        "predictions": list(prediction_files),
        "export": EXPORT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if score is None and any(sample.answers is None for sample in samples):
        document["note"] = f"no ground truth in this split: submit {EXPORT} (or the predictions) for scoring"
    return document


def _failure(record: dict | None) -> str:
    return "no prediction recorded" if record is None else record["error"]


def write_export(path: pathlib.Path, benchmark: Benchmark, samples: Sequence[Sample],
                 records: Mapping[str, dict]) -> None:
    """The VLMEvalKit-style TSV: each sample's source columns and its prediction ('' if failed)."""
    columns: dict[str, None] = {}
    for sample in samples:
        columns.update(dict.fromkeys(sample.export))
    columns.pop("prediction", None)
    with open(path, "w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, delimiter="\t", lineterminator="\n")
        writer.writerow([*columns, "prediction"])
        for sample in samples:
            record = records.get(sample.id)
            ok = record is not None and not record["failed"]
            prediction = benchmark.export_prediction(sample, record["prediction"]) if ok else ""
            writer.writerow([_cell(sample.export.get(column, "")) for column in columns] + [prediction])


def _cell(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)


def write_sweep(directory: pathlib.Path, budgets: Sequence[int],
                results: Mapping[str, Mapping[int, dict]]) -> list[pathlib.Path]:
    """sweep.md / sweep.csv (benchmark x tiles) and sweep.png from each run's results document."""
    header = ["benchmark", "metric", *(str(budget) for budget in budgets)]
    rows = []
    for name, by_budget in results.items():
        metric = next((doc["metric"] for doc in by_budget.values() if doc["metric"]), "")
        rows.append([name, metric, *(_number(by_budget[budget]["score"]) for budget in budgets)])
    markdown = directory / "sweep.md"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown.write_text("\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n", encoding="utf-8")
    table = directory / "sweep.csv"
    with open(table, "w", encoding="utf-8", newline="") as stream:
        csv.writer(stream, lineterminator="\n").writerows([header, *rows])
    figure = directory / "sweep.png"
    plot_panels(figure, [(name, budgets, [by_budget[budget]["score"] for budget in budgets])
                         for name, by_budget in results.items()], x_label="max tiles", y_label="score")
    return [markdown, table, figure]


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"
