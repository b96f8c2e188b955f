"""The training input pipeline: packed, static-shape batches (see :mod:`batch`) from a meta file.

Global picture: every sample of the data has a place g in one global stream (epoch after epoch,
each epoch in its own seeded order). The stream is packed into rows (:mod:`packing`), and global
batch k is rows [k·G, (k+1)·G) for G global rows; process p of P takes rows [p·R, (p+1)·R) of it,
R = G / P. So the rows, and with G fixed the global batches, do not depend on the number of
processes or workers.

grain runs it: a random-access source whose element k is this process's k-th batch after the
start position; ``mp_prefetch`` hands elements k = w, w + W, ... to worker w. Each worker plans
the stream itself (measuring is cheap: tokenising and image headers or annotated sizes), and only
decodes, tiles and assembles the rows of its own batches. Planning is deterministic, so batches
do not depend on the worker count.

The position saved in checkpoints (:meth:`PipelineIterator.get_state`) is that of the planner
after the last batch handed out: a global sample index (the current packing window's first
sample) and the number of that window's rows already used. It is the same on every process, so
one copy restores any number of processes or workers, including in the middle of a window.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Sequence

import grain
import numpy as np
from absl import flags

from internvl_jax.data.batch import IGNORE_INDEX, Batch, empty_batch, field_shapes
from internvl_jax.data.config import DataConfig
from internvl_jax.data.packing import AUGMENT_STREAM, Drop, Planned, PlanState, Planner, Stream
from internvl_jax.data.samples import SampleDrop, SampleSpec, load_tiles, measure, read_record
from internvl_jax.data.sources import Mixture, estimate_length, open_meta
from internvl_jax.data.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# grain needs a length; batches past the end of a finite stream are end markers.
_UNBOUNDED = 2**62
# Drops of one reason logged one by one before only counting them.
_LOGGED_DROPS_PER_REASON = 20


@dataclasses.dataclass
class PipelineStats:
    """Counts over the batches handed out; drops are this process's share (see ``dropped``).

    ``dropped`` counts, per reason, the samples planned out at stream positions g with
    g mod P = this process, and the samples of this process's rows that failed to load; summed
    over processes, every dropped sample is counted once.
    """

    batches: int = 0
    rows: int = 0
    token_slots: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    tile_slots: int = 0
    tiles: int = 0
    samples: int = 0
    truncated: int = 0
    resampled: int = 0
    images_changed: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def packing_ratio(self) -> float:
        """Fraction of token slots holding a real token."""
        return self.tokens / self.token_slots if self.token_slots else 0.0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.packing_ratio if self.token_slots else 0.0

    @property
    def tile_fill(self) -> float:
        """Fraction of the tile budget holding real tiles."""
        return self.tiles / self.tile_slots if self.tile_slots else 0.0

    def add(self, counts: dict[str, int]) -> None:
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict:
        counts = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {**counts, "dropped": dict(self.dropped), "packing_ratio": self.packing_ratio,
                "padding_fraction": self.padding_fraction, "tile_fill": self.tile_fill}


def _state_dict(plan: PlanState, fingerprint: dict) -> dict:
    """The JSON-able position saved in checkpoints."""
    return {"version": STATE_VERSION, "sample_index": plan.sample_index, "rows_done": plan.rows_done,
            "fingerprint": fingerprint}


class DataPipeline:
    """Packed training batches for one process.

    Args:
        mixture: the samples (:func:`sources.open_meta`).
        tokenizer: the checkpoint's tokenizer.
        model: the ``ModelConfig`` (template, tile size, tokens per tile, tile limits).
        seq_len: T, tokens per row (``TrainConfig.max_seq_length``).
        data: pipeline settings.
        global_rows: rows per global batch; a multiple of ``process_count``.
        process_index, process_count: this process and how many read the data together.
        group_by_length: use the length-grouped order (official stage-2 ``group_by_length``).
    """

    def __init__(self, mixture: Mixture, tokenizer: Tokenizer, model, seq_len: int, data: DataConfig,
                 global_rows: int, process_index: int = 0, process_count: int = 1, group_by_length: bool = False):
        if global_rows < 1 or global_rows % process_count:
            raise ValueError(f"global_rows ({global_rows}) must be a positive multiple of the process count "
                             f"({process_count})")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.mixture = mixture
        self.tokenizer = tokenizer
        self.spec = spec = SampleSpec.from_configs(model, seq_len, data)
        self.data = data
        self.global_rows = global_rows
        self.process_index = process_index
        self.process_count = process_count
        self.rows = global_rows // process_count
        self.tiles_per_row = data.tiles_per_row(seq_len, spec.num_image_token)
        if self.tiles_per_row < 1:
            raise ValueError(f"a row of {seq_len} tokens cannot hold one tile of {spec.num_image_token} tokens")
        self.tile_budget = self.rows * self.tiles_per_row
        self.lengths = self._lengths() if group_by_length else None

    @classmethod
    def from_config(cls, config, data: DataConfig, global_rows: int, process_index: int = 0, process_count: int = 1,
                    tokenizer: Tokenizer | None = None) -> DataPipeline:
        """From the main ``Config`` (model, T = train.max_seq_length, train.group_by_length).

        ``global_rows`` counts packed rows per global (micro-)batch, not samples: each row holds
        several samples. The tokenizer is loaded from ``data.tokenizer_path`` unless given.
        """
        if tokenizer is None:
            tokenizer = load_tokenizer(data.tokenizer_path)
            if tokenizer is None:
                raise ValueError(f"no tokenizer files in data.tokenizer_path {data.tokenizer_path!r}")
        return cls(open_meta(data.meta_path, data.on_bad_line), tokenizer, config.model, config.train.max_seq_length,
                   data, global_rows, process_index, process_count, group_by_length=config.train.group_by_length)

    @property
    def seq_len(self) -> int:
        return self.spec.max_length

    @property
    def num_samples(self) -> int:
        """Samples in one epoch (all processes together), repeat_time applied."""
        return len(self.mixture)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{name: (shape, dtype)}`` of the batches this process gets."""
        return field_shapes(self.rows, self.seq_len, self.tile_budget, self.spec.image_size)

    def _lengths(self) -> np.ndarray:
        """Estimated length of every sample (0 for a record that no longer parses)."""
        lengths = np.zeros(len(self.mixture), np.int64)
        for index in range(len(self.mixture)):
            try:
                record = read_record(self.mixture, index)
            except SampleDrop:
                continue
            lengths[index] = estimate_length(record, self.tokenizer, self.spec.num_image_token,
                                             self.spec.dataset_max_tiles(self.mixture.specs[record.dataset]),
                                             self.spec.use_thumbnail)
        return lengths

    def fingerprint(self) -> dict:
        """What must not change between saving a position and resuming from it."""
        return {"num_samples": len(self.mixture), "seed": self.data.seed, "shuffle": self.data.shuffle,
                "group_by_length": self.lengths is not None, "megabatch_size": self.data.megabatch_size,
                "packing_window": self.data.packing_window, "seq_len": self.seq_len,
                "tiles_per_row": self.tiles_per_row}

    def initial_state(self) -> dict:
        return _state_dict(PlanState(), self.fingerprint())

    def check_state(self, state: dict) -> PlanState:
        """The planner position of a saved state; raises ValueError if it belongs to other data."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved, current = state.get("fingerprint", {}), self.fingerprint()
        changed = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
        if changed:
            raise ValueError(f"the saved data position belongs to another data stream; changed (saved, now): {changed}")
        return PlanState(int(state["sample_index"]), int(state["rows_done"]))

    def iterator(self, state: dict | None = None) -> PipelineIterator:
        """Batches from ``state`` (a :meth:`PipelineIterator.get_state` result) or the start."""
        return PipelineIterator(self, state or self.initial_state())


class _ProcessBatches:
    """grain data source: element k is this process's k-th batch after ``start``.

    Each copy (one per worker) plans the stream on its own and only assembles its own batches;
    requests come in increasing order, so planning advances and is rewound only on a new pass.
    """

    def __init__(self, pipeline: DataPipeline, start: PlanState):
        self._pipeline = pipeline
        self._fingerprint = pipeline.fingerprint()
        self._start = start
        self._planner, self._next = None, 0
        self._lock = threading.Lock()

    def __getstate__(self):
        return {**self.__dict__, "_planner": None, "_next": 0, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return _UNBOUNDED

    def __getitem__(self, index: int) -> dict:
        pipeline = self._pipeline
        with self._lock:
            if self._planner is None or index < self._next:
                self._planner, self._next = self._new_planner(), 0
            while self._next < index:
                self._plan_global_batch()
            rows, drops = self._plan_global_batch()
            state = _state_dict(self._planner.state, self._fingerprint)
        mine = [(drop.where, drop.reason, drop.detail) for drop in drops
                if drop.position % pipeline.process_count == pipeline.process_index]
        if rows[0] is None:
            return {"end": True, "drops": mine}
        first = pipeline.process_index * pipeline.rows
        batch, samples, counts, load_drops = self._assemble(rows[first:first + pipeline.rows])
        return {"end": False, "batch": batch, "samples": samples, "counts": counts, "drops": mine + load_drops,
                "state": state}

    def _new_planner(self) -> Planner:
        pipeline, data = self._pipeline, self._pipeline.data
        stream = Stream(len(pipeline.mixture), data.num_epochs, data.seed, data.shuffle, pipeline.lengths,
                        data.megabatch_size)

        def measure_record(record):
            max_tiles = pipeline.spec.dataset_max_tiles(pipeline.mixture.specs[record.dataset])
            return measure(record, pipeline.spec, pipeline.tokenizer, max_tiles)

        return Planner(stream, lambda index: read_record(pipeline.mixture, index), measure_record,
                       data.packing_window, pipeline.seq_len, pipeline.tiles_per_row, data.on_bad_sample,
                       data.max_resample_tries, data.seed, self._start)

    def _plan_global_batch(self) -> tuple[list[list[Planned] | None], list[Drop]]:
        """The next global batch's rows (None past the end of the stream) and its planning drops."""
        rows = [self._planner.next_row() for _ in range(self._pipeline.global_rows)]
        drops, self._planner.drops = self._planner.drops, []
        self._next += 1
        return rows, drops

    def _assemble(self, rows: Sequence[list[Planned] | None]) -> tuple[Batch, list[str], dict, list]:
        """Loads the rows' samples into one batch; returns it, its samples' ids, its counts and load failures."""
        pipeline, spec = self._pipeline, self._pipeline.spec
        batch = empty_batch(pipeline.rows, spec.max_length, pipeline.tile_budget, spec.image_size)
        counts = collections.Counter(batches=1, rows=pipeline.rows, token_slots=pipeline.rows * spec.max_length,
                                     tile_slots=pipeline.tile_budget)
        drops, samples, tile = [], [], 0
        for row_index, row in enumerate(rows):
            cursor, segment = 0, 0
            for item in row or ():
                try:
                    tiles, changed = load_tiles(item.record, item.measured, spec, self._augment_rng(item))
                except SampleDrop as drop:
                    if pipeline.data.on_bad_sample == "raise":
                        raise
                    drops.append((drop.where, drop.reason, drop.detail))
                    continue
                segment += 1
                samples.append(item.record.where)
                span = slice(cursor, cursor + item.measured.num_tokens)
                batch["input_ids"][row_index, span] = item.measured.input_ids
                batch["labels"][row_index, span] = item.measured.labels
                batch["segment_ids"][row_index, span] = segment
                batch["positions"][row_index, span] = np.arange(item.measured.num_tokens)
                batch["pixel_values"][tile:tile + len(tiles)] = tiles
                batch["image_flags"][tile:tile + len(tiles)] = 1
                cursor, tile = span.stop, tile + len(tiles)
                counts.update(samples=1, tokens=item.measured.num_tokens, tiles=len(tiles),
                              supervised_tokens=int(np.sum(item.measured.labels != IGNORE_INDEX)),
                              truncated=int(item.measured.truncated), resampled=int(item.attempt > 0),
                              images_changed=changed)
            batch["num_samples"][row_index] = segment
        return batch, samples, dict(counts), drops

    def _augment_rng(self, item: Planned) -> np.random.Generator | None:
        if not self._pipeline.mixture.specs[item.record.dataset].data_augment:
            return None
        # Seeded by the stream position: the same tiles on every resume, new ones every epoch.
        return np.random.default_rng([self._pipeline.data.seed, AUGMENT_STREAM, item.position])


class PipelineIterator:
    """Iterator over this process's batches (dicts of numpy arrays, see :mod:`batch`).

    ``get_state()`` is the position after the last batch returned (JSON-able, equal on every
    process); ``set_state`` or ``DataPipeline.iterator(state)`` resumes there. ``stats`` counts
    what was handed out; ``last_samples`` lists the ids (``file:line``) of the last batch's samples
    in row order. Call ``close()`` (or use ``with``) to stop the workers.
    """

    def __init__(self, pipeline: DataPipeline, state: dict):
        self._pipeline = pipeline
        self._state = state
        self._iterator = None
        self.stats = PipelineStats()
        self.last_samples: list[str] = []
        self._open(pipeline.check_state(state))

    def _open(self, start: PlanState) -> None:
        data = self._pipeline.data
        dataset = grain.MapDataset.source(_ProcessBatches(self._pipeline, start)).to_iter_dataset(
            # One thread: a copy of the source plans in order and must not be entered twice.
            grain.ReadOptions(num_threads=1, prefetch_buffer_size=data.worker_buffer_size))
        if data.num_workers:
            # grain 0.2.18 workers read absl flags and fail unless they count as parsed.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=data.num_workers, per_worker_buffer_size=data.worker_buffer_size))
        self._iterator = iter(dataset)

    def __iter__(self) -> PipelineIterator:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            raise StopIteration
        element = next(self._iterator)
        for where, reason, detail in element["drops"]:
            self.stats.dropped[reason] += 1
            if self.stats.dropped[reason] <= _LOGGED_DROPS_PER_REASON:
                logger.warning("dropped %s: %s: %s", where, reason, detail)
            if self.stats.dropped[reason] == _LOGGED_DROPS_PER_REASON:
                logger.warning("further %s drops are counted in the stats, not logged", reason)
        if element["end"]:
            self.close()
            raise StopIteration
        self._state = element["state"]
        self.last_samples = element["samples"]
        self.stats.add(element["counts"])
        return element["batch"]

    @property
    def num_samples(self) -> int:
        """Samples in one epoch (all processes together)."""
        return self._pipeline.num_samples

    def get_state(self) -> dict:
        return dict(self._state)

    def set_state(self, state: dict) -> None:
        start = self._pipeline.check_state(state)
        self.close()
        self._state = state
        self._open(start)

    def close(self) -> None:
        if self._iterator is not None:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()
            self._iterator = None

    def __enter__(self) -> PipelineIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
