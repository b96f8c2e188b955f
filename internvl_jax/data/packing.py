"""Packing the global sample stream into rows of at most T tokens and a tile cap.

The stream is cut into windows of consecutive samples; each window is measured (tokenised, tiles
counted, bad samples dropped or resampled) and packed on its own by first-fit decreasing. Rows
depend only on the stream and the window, never on how many processes or workers read it, so the
row sequence is the same for every layout. The position in it is (global index of the current
window's first sample, rows of that window already handed out): re-planning that window and
skipping those rows resumes exactly, even in the middle of a window whose rows were only partly
consumed.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from internvl_jax.data.samples import Measured, SampleDrop
from internvl_jax.data.sources import Record, epoch_order

# Tags of the random streams drawn from the seed, so no two uses share one.
_RESAMPLE_STREAM = 1
AUGMENT_STREAM = 2


@dataclasses.dataclass(frozen=True)
class Planned:
    """A measured sample placed at ``position`` of the global stream.

    ``attempt`` > 0 when the sample is a replacement for a bad one (resampling).
    """

    position: int
    record: Record
    measured: Measured
    attempt: int = 0


@dataclasses.dataclass(frozen=True)
class Drop:
    """A sample left out while planning, at ``position`` of the global stream."""

    position: int
    where: str
    reason: str
    detail: str


@dataclasses.dataclass(frozen=True)
class PlanState:
    """Where the planner stands: window start (a global sample index) and rows already emitted."""

    sample_index: int = 0
    rows_done: int = 0


def pack(items: Sequence[Planned], seq_len: int, max_tiles: int) -> list[list[Planned]]:
    """First-fit decreasing: rows of at most ``seq_len`` tokens and ``max_tiles`` tiles.

    Longest samples are placed first, each into the first row with room. Every row lists its
    samples in stream order, and rows are ordered by their first sample, so the output follows
    the stream as closely as packing allows. Items must each fit in an empty row.
    """
    rows: list[list[Planned]] = []
    room: list[list[int]] = []
    for item in sorted(items, key=lambda it: (-it.measured.num_tokens, -it.measured.num_tiles, it.position)):
        tokens, tiles = item.measured.num_tokens, item.measured.num_tiles
        if tokens > seq_len or tiles > max_tiles:
            raise ValueError(f"sample at {item.position} ({tokens} tokens, {tiles} tiles) exceeds a row")
        for row_index, (tokens_left, tiles_left) in enumerate(room):
            if tokens <= tokens_left and tiles <= tiles_left:
                rows[row_index].append(item)
                room[row_index] = [tokens_left - tokens, tiles_left - tiles]
                break
        else:
            rows.append([item])
            room.append([seq_len - tokens, max_tiles - tiles])
    rows = [sorted(row, key=lambda it: it.position) for row in rows]
    return sorted(rows, key=lambda row: row[0].position)


class Stream:
    """The global sample stream: position g → sample index, epoch after epoch.

    Epoch e holds positions [e·N, (e+1)·N) in the order :func:`sources.epoch_order` draws for it.
    """

    def __init__(self, num_samples: int, num_epochs: int, seed: int, shuffle: bool,
                 lengths: np.ndarray | None = None, megabatch_size: int = 256):
        if num_samples < 1:
            raise ValueError("the data has no samples")
        self.num_samples = num_samples
        self.num_epochs = num_epochs
        self._seed = seed
        self._shuffle = shuffle
        self._lengths = lengths
        self._megabatch_size = megabatch_size
        self._cached_epoch, self._order = -1, None

    @property
    def end(self) -> int | None:
        """One past the last position, None for an endless stream."""
        return self.num_samples * self.num_epochs if self.num_epochs else None

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._cached_epoch:
            self._order = epoch_order(self.num_samples, epoch, self._seed, self._shuffle, self._lengths,
                                      self._megabatch_size)
            self._cached_epoch = epoch
        return int(self._order[offset])


class Planner:
    """Turns the stream into packed rows, one window at a time (see the module docstring).

    Args:
        stream: the global sample stream.
        read: sample index → Record (may raise SampleDrop).
        measure: Record → Measured (raises SampleDrop for a bad sample).
        window: samples per packing window.
        seq_len, max_tiles: row limits.
        on_bad_sample: "skip", "resample" or "raise" (SampleDrop propagates).
        max_resample_tries: replacement draws per bad sample.
        seed: drives the replacement draws.
        start: where to begin.

    Dropped samples are collected in ``drops`` (the caller drains it); a window re-planned on a
    resume does not report its drops again.
    """

    def __init__(self, stream: Stream, read: Callable[[int], Record], measure: Callable[[Record], Measured],
                 window: int, seq_len: int, max_tiles: int, on_bad_sample: str, max_resample_tries: int, seed: int,
                 start: PlanState = PlanState()):
        self._stream = stream
        self._read = read
        self._measure = measure
        self._window = window
        self._seq_len = seq_len
        self._max_tiles = max_tiles
        self._on_bad_sample = on_bad_sample
        self._max_tries = max_resample_tries if on_bad_sample == "resample" else 0
        self._seed = seed
        self._state = start
        self._pending: list[list[Planned]] | None = None
        self.drops: list[Drop] = []

    @property
    def state(self) -> PlanState:
        return self._state

    def next_row(self) -> list[Planned] | None:
        """The next packed row, or None once a finite stream is used up.

        Raises ValueError when a whole epoch's worth of consecutive samples is unusable.
        """
        empty_since = self._state.sample_index
        while not self._pending:
            end = self._stream.end
            if end is not None and self._state.sample_index >= end:
                return None
            self._pending = self._plan_window()
            if not self._pending:  # Every sample of the window was dropped.
                self._state = PlanState(self._state.sample_index + self._window, 0)
                if self._state.sample_index - empty_since >= self._stream.num_samples:
                    reasons = collections.Counter(drop.reason for drop in self.drops)
                    raise ValueError(f"no usable sample in {self._state.sample_index - empty_since} consecutive "
                                     f"samples; dropped: {dict(reasons)}")
        row = self._pending.pop(0)
        if self._pending:
            self._state = PlanState(self._state.sample_index, self._state.rows_done + 1)
        else:
            self._state = PlanState(self._state.sample_index + self._window, 0)
        return row

    def _plan_window(self) -> list[list[Planned]]:
        start = self._state.sample_index
        end = start + self._window if self._stream.end is None else min(start + self._window, self._stream.end)
        drops: list[Drop] = []
        items = [item for position in range(start, end) if (item := self._plan_sample(position, drops))]
        if self._state.rows_done == 0:
            self.drops.extend(drops)
        return pack(items, self._seq_len, self._max_tiles)[self._state.rows_done:]

    def _plan_sample(self, position: int, drops: list[Drop]) -> Planned | None:
        index = self._stream[position]
        for attempt in range(self._max_tries + 1):
            if attempt:
                rng = np.random.default_rng([self._seed, _RESAMPLE_STREAM, position, attempt])
                index = int(rng.integers(self._stream.num_samples))
            try:
                record = self._read(index)
                measured = self._measure(record)
                if measured.num_tiles > self._max_tiles:
                    raise SampleDrop(record.where, "too_many_tiles",
                                     f"{measured.num_tiles} tiles > {self._max_tiles} per row")
                return Planned(position, record, measured, attempt)
            except SampleDrop as drop:
                if self._on_bad_sample == "raise":
                    raise
                drops.append(Drop(position, drop.where, drop.reason, drop.detail))
        return None
