"""The batch contract between the data pipeline and the train step.

Every batch the pipeline yields is a dict of numpy arrays with static shapes; R rows of T tokens,
each row packing several samples, and a budget of N tiles of S×S pixels:

  input_ids     [R, T] int32  token ids; 0 on padding (padding is found by segment_ids, never by id)
  labels        [R, T] int32  the token id where supervised, IGNORE_INDEX (-100) elsewhere; aligned
                              with input_ids like the official labels (not shifted: the loss shifts
                              within each segment)
  segment_ids   [R, T] int32  1, 2, ... for the samples packed in a row, 0 on padding
  positions     [R, T] int32  0..len-1 within each sample, 0 on padding
  pixel_values  [N, S, S, 3] uint8  raw RGB tiles (the model normalises on device)
  image_flags   [N] int32     1 for a real tile, 0 for padding
  num_samples   [R] int32     samples packed in each row

The real tiles come in the order of the samples' IMG_CONTEXT tokens (row-major over rows, then
tokens): the k-th run of tokens-per-tile IMG_CONTEXT tokens belongs to the k-th real tile. Per
process R and N are the process-local rows and tile budget; global arrays concatenate the
processes in process order.
"""
from __future__ import annotations

import dataclasses
from typing import TypedDict

import numpy as np

from internvl_jax.data.conversation import IGNORE_INDEX


class Batch(TypedDict):
    """One batch; shapes and meanings in the module docstring, dtypes and pad values in FIELDS."""

    input_ids: np.ndarray  # [R, T] int32
    labels: np.ndarray  # [R, T] int32
    segment_ids: np.ndarray  # [R, T] int32
    positions: np.ndarray  # [R, T] int32
    pixel_values: np.ndarray  # [N, S, S, 3] uint8
    image_flags: np.ndarray  # [N] int32
    num_samples: np.ndarray  # [R] int32


@dataclasses.dataclass(frozen=True)
class Field:
    """One batch entry: its dtype, axis names and the value that fills padding."""

    name: str
    dtype: type
    axes: tuple[str, ...]
    pad_value: int


# Axis names: "rows" = R, "seq" = T, "tiles" = N, "pixels" = S, "rgb" = 3.
FIELDS = (
    Field("input_ids", np.int32, ("rows", "seq"), 0),
    Field("labels", np.int32, ("rows", "seq"), IGNORE_INDEX),
    Field("segment_ids", np.int32, ("rows", "seq"), 0),
    Field("positions", np.int32, ("rows", "seq"), 0),
    Field("pixel_values", np.uint8, ("tiles", "pixels", "pixels", "rgb"), 0),
    Field("image_flags", np.int32, ("tiles",), 0),
    Field("num_samples", np.int32, ("rows",), 0),
)


def _axis_sizes(rows: int, seq_len: int, tile_budget: int, image_size: int) -> dict[str, int]:
    for name, value in (("rows", rows), ("seq_len", seq_len), ("tile_budget", tile_budget),
                        ("image_size", image_size)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    return {"rows": rows, "seq": seq_len, "tiles": tile_budget, "pixels": image_size, "rgb": 3}


def field_shapes(rows: int, seq_len: int, tile_budget: int, image_size: int
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{name: (shape, dtype)}`` of a batch of ``rows`` rows and ``tile_budget`` tiles."""
    sizes = _axis_sizes(rows, seq_len, tile_budget, image_size)
    return {field.name: (tuple(sizes[axis] for axis in field.axes), np.dtype(field.dtype)) for field in FIELDS}


def batch_shapes(config, per_process_rows: int, tile_budget: int) -> dict:
    """``{name: jax.ShapeDtypeStruct}`` of the batches the pipeline yields, for abstract train inputs.

    Args:
        config: the main ``Config`` (T = ``train.max_seq_length``, S = ``model.vision.image_size``).
        per_process_rows: R; pass rows × process count for the global arrays.
        tile_budget: N; pass budget × process count for the global arrays.
    """
    import jax  # Lazily: the data pipeline and its workers do not need jax.

    shapes = field_shapes(per_process_rows, config.train.max_seq_length, tile_budget,
                          config.model.vision.image_size)
    return {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in shapes.items()}


def empty_batch(rows: int, seq_len: int, tile_budget: int, image_size: int) -> Batch:
    """A batch holding padding only (every field at its pad value)."""
    shapes = field_shapes(rows, seq_len, tile_budget, image_size)
    return {field.name: np.full(shapes[field.name][0], field.pad_value, shapes[field.name][1]) for field in FIELDS}


def check_batch(batch: Batch, tokens_per_tile: int, img_context_id: int) -> None:
    """Raises ValueError where ``batch`` breaks the contract (shapes, dtypes, segments, tile count)."""
    rows, seq_len = batch["input_ids"].shape
    tile_budget, image_size = batch["pixel_values"].shape[:2]
    expected = field_shapes(rows, seq_len, tile_budget, image_size)
    if set(batch) != set(expected):
        raise ValueError(f"batch keys {sorted(batch)} != {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        if batch[name].shape != shape or batch[name].dtype != dtype:
            raise ValueError(f"{name}: {batch[name].dtype}{list(batch[name].shape)}, expected {dtype}{list(shape)}")
    segments, positions = batch["segment_ids"], batch["positions"]
    padding = segments == 0
    if (batch["labels"][padding] != IGNORE_INDEX).any() or (positions[padding] != 0).any():
        raise ValueError("padding positions carry labels or positions")
    for row in range(rows):
        _check_row(segments[row], positions[row], int(batch["num_samples"][row]), row)
    supervised = batch["labels"] != IGNORE_INDEX
    if (batch["labels"][supervised] != batch["input_ids"][supervised]).any():
        raise ValueError("a supervised label differs from its input id")
    flags = batch["image_flags"]
    if not np.isin(flags, (0, 1)).all():
        raise ValueError("image_flags must be 0 or 1")
    context = int(np.sum(batch["input_ids"] == img_context_id))
    if context != int(flags.sum()) * tokens_per_tile:
        raise ValueError(f"{context} IMG_CONTEXT tokens for {int(flags.sum())} real tiles × {tokens_per_tile}")


def _check_row(segments: np.ndarray, positions: np.ndarray, num_samples: int, row: int) -> None:
    """Segments 1..num_samples in order, then padding only; positions count 0.. within each segment."""
    count = int((segments > 0).sum())
    used = segments[:count]
    last = int(used[-1]) if count else 0
    if (segments[count:] != 0).any() or (count and used[0] != 1) or not np.isin(np.diff(used), (0, 1)).all() \
            or last != num_samples:
        raise ValueError(f"row {row}: segment ids are not 1..{num_samples} followed by padding")
    starts = np.flatnonzero(np.diff(used, prepend=0))
    segment_start = np.repeat(starts, np.diff(np.append(starts, count)))
    if (positions[:count] != np.arange(count) - segment_start).any():
        raise ValueError(f"row {row}: positions do not count 0.. within each segment")
