"""Predictions on disk: append-only JSONL per process, resumable, gathered across shards.

Every process of a sharded evaluation (shard i of k takes every k-th sample) appends its records
to its own `predictions[.shard-i-of-k].jsonl` as soon as a batch is answered, so an interrupted run
loses at most one batch. A record is

    {"id", "prediction", "failed", "error", "prompt", "settings"}

where a failed sample has prediction null and the error text. Reading merges every predictions
file of the folder (so a run may resume with a different shard count); for an id seen twice, a
successful record beats a failed one, and otherwise the later one wins (a retried failure). A
record made with other settings (another prompt, tile budget, checkpoint, ...) is an error rather
than silently mixed in. A shard that has answered everything writes `shard-i-of-k.done`; the
process that finds all k markers present gathers and scores.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from internvl_jax.eval.samples import BenchmarkError, where

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's part of the work: every `count`-th item from `index` on."""
    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index must be in 0..{self.count - 1}, got {self.index}")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """'I/K' -> shard I of K."""
        index, slash, count = text.partition("/")
        if not slash or not index.isdigit() or not count.isdigit():
            raise ValueError(f"a shard is written I/K (e.g. 0/4), got {text!r}")
        return cls(int(index), int(count))

    def take(self, items: Sequence[T]) -> list[T]:
        return list(items[self.index::self.count])

    @property
    def suffix(self) -> str:
        return "" if self.count == 1 else f".shard-{self.index}-of-{self.count}"


class PredictionStore:
    """The predictions of one benchmark run in `directory`, written by this process's shard."""

    def __init__(self, directory: pathlib.Path, settings_key: str, shard: Shard = Shard()):
        self.directory = directory
        self.settings_key = settings_key
        self.shard = shard
        self.path = directory / f"predictions{shard.suffix}.jsonl"
        self._ended_cleanly: bool | None = None

    def files(self) -> list[pathlib.Path]:
        return sorted(self.directory.glob("predictions*.jsonl"))

    def records(self) -> dict[str, dict]:
        """id -> the record that counts, over every predictions file in the folder."""
        merged: dict[str, dict] = {}
        for path in self.files():
            for record in self._read(path):
                previous = merged.get(record["id"])
                # Only a success is never replaced by a failure.
                if previous is None or previous["failed"] or not record["failed"]:
                    merged[record["id"]] = record
        return merged

    def _read(self, path: pathlib.Path) -> Iterable[dict]:
        with open(path, encoding="utf-8") as stream:
            for line, text in enumerate(stream, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    # A record cut short by an interruption (or being written right now by
                    # another shard); that sample is simply predicted again.
                    log.warning("%s: skipping an incomplete record", where(path, line))
                    continue
                if not isinstance(record, dict) or not {"id", "failed", "prediction"} <= record.keys():
                    raise BenchmarkError(where(path, line), "not a prediction record")
                if record.get("settings") != self.settings_key:
                    raise BenchmarkError(where(path, line), "prediction made with other settings (prompt, tiles, "
                                                            "checkpoint, ...); write to another --out, or delete "
                                                            "the folder to start over")
                yield record

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Appends records (each gets the settings key) and flushes them to disk."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as stream:
            if not self._ends_cleanly():
                stream.write("\n")  # keep the next record off a line an interruption cut short
            for record in records:
                stream.write(json.dumps({**record, "settings": self.settings_key}, ensure_ascii=False) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        self._ended_cleanly = True

    def _ends_cleanly(self) -> bool:
        if self._ended_cleanly is None:
            if not self.path.exists() or self.path.stat().st_size == 0:
                self._ended_cleanly = True
            else:
                with open(self.path, "rb") as stream:
                    stream.seek(-1, os.SEEK_END)
                    self._ended_cleanly = stream.read(1) == b"\n"
        return self._ended_cleanly

    def _marker(self, index: int) -> pathlib.Path:
        return self.directory / f"shard-{index}-of-{self.shard.count}.done"

    def mark_done(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._marker(self.shard.index).write_text(self.settings_key + "\n", encoding="utf-8")

    def all_shards_done(self) -> bool:
        """Whether every shard of this run has finished (with these settings)."""
        for index in range(self.shard.count):
            marker = self._marker(index)
            if not marker.exists() or marker.read_text(encoding="utf-8").strip() != self.settings_key:
                return False
        return True


def failure_record(sample_id: str, prompt: str, error: str) -> dict:
    return {"id": sample_id, "prediction": None, "failed": True, "error": error, "prompt": prompt}


def success_record(sample_id: str, prompt: str, prediction: str) -> dict:
    return {"id": sample_id, "prediction": prediction, "failed": False, "error": None, "prompt": prompt}
