"""Streaming placement: one parameter at a time, straight from checkpoint rows into its sharding.

The host reads once the rows of the map's matrix T that its addressable devices need (the
union of their shards; on one host of a pod, only that host's part), cuts each device's block
from them and hands the blocks to `jax.make_array_from_callback`. Transfers are kept to about
`CHUNK_BYTES` (a stack's slab is at least one layer; a parameter split along every axis goes
in one transfer of 1/n per device): accelerator runtimes stage host-to-device copies through
pinned buffers that they keep, sized by the largest copy (measured on an H200: +1.4x the
copy), so the size of a transfer, not of a tensor, sets that part of the host's peak.

* A parameter of at most `host_bytes` is assembled on the host: every device's block of every
  layer is cut, transposed and cast there and sent once; nothing is compiled.
* A larger one is assembled on the devices in slabs along an axis that no device's shard
  splits (the layer axis of a stack): a zero array is created in its sharding and each slab,
  sent in T's own orientation (a torch Linear's [out, in]), is transposed to ours, cast and
  written into it by XLA with a donated update. The host holds one slab at a time (plus the
  rows it was cut from) and the devices never hold two copies of the parameter.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, Sharding

from internvl_jax.convert.layouts import Part, TensorMap

Box = tuple[tuple[int, int], ...]  # [start, stop) per axis
# (key index in the map, start row, stop row, width) -> rows of that checkpoint tensor
RowReader = Callable[[int, int, int, int], np.ndarray]


CHUNK_BYTES = 16 * 2 ** 20


def place_part(tensor_map: TensorMap, part: Part, read: Callable[[int | None], RowReader],
               shape: tuple[int, ...], dtype, sharding: Sharding, host_bytes: int = CHUNK_BYTES,
               chunk_bytes: int = CHUNK_BYTES) -> jax.Array:
    """Our parameter for `part`, of stored `shape` (padded, layer axis first when stacked).

    `read(layer)` returns the row reader of that layer's checkpoint tensors. Values are cast to
    `dtype`; the padding beyond the logical shape is zero. Parameters of at most `host_bytes`
    (in `dtype`) are assembled on the host, larger ones on the devices in slabs of about
    `chunk_bytes`.
    """
    dtype = jnp.dtype(dtype)
    if math.prod(shape) * dtype.itemsize <= host_bytes:
        value = _assemble_on_host(tensor_map, part, read, shape, dtype, sharding)
    else:
        value = _assemble_on_devices(tensor_map, part, read, shape, dtype, sharding, chunk_bytes)
    value.block_until_ready()
    _release_host_memory()
    return value


def _assemble_on_host(tensor_map: TensorMap, part: Part, read: Callable[[int | None], RowReader],
                      shape: tuple[int, ...], dtype, sharding: Sharding) -> jax.Array:
    """Every device's block of every layer cut, transposed and cast on the host, then sent once."""
    boxes = _device_boxes(sharding, shape, tensor_map)
    blocks = _read_slab(tensor_map, part, read, boxes, tuple(range(len(shape))), dtype)
    return jax.make_array_from_callback(shape, sharding, lambda index: blocks[_box(index, shape)])


def _assemble_on_devices(tensor_map: TensorMap, part: Part, read: Callable[[int | None], RowReader],
                         shape: tuple[int, ...], dtype, sharding: Sharding, chunk_bytes: int) -> jax.Array:
    """Slabs sent in T's orientation, transposed and cast by XLA; several are written into a zero
    array by donated updates."""
    lead = 1 if tensor_map.num_layers else 0
    order = tuple(range(lead)) + tuple(lead + i for i in _device_order(part))  # sent axes, in our numbering
    axis, step = _slabs(_device_boxes(sharding, shape, tensor_map), shape, lead, np.dtype(dtype).itemsize,
                        chunk_bytes)
    value = None if step >= shape[axis] else jnp.zeros(shape, dtype, device=sharding)
    for start in range(0, shape[axis], step):
        slab = _send_slab(tensor_map, part, read, shape, sharding, order, axis, start, min(start + step, shape[axis]))
        _release_host_memory()  # the host blocks, before the devices transpose
        if value is None:
            value = _finish(slab, order, dtype)
        else:
            value = _write_slab(value, slab, start, axis, order).block_until_ready()
        del slab
    return value if value.sharding.is_equivalent_to(sharding, value.ndim) else jax.device_put(value, sharding)


def _send_slab(tensor_map: TensorMap, part: Part, read: Callable[[int | None], RowReader], shape: tuple[int, ...],
               sharding: Sharding, order: tuple[int, ...], axis: int, start: int, stop: int) -> jax.Array:
    """Indices [start, stop) along `axis` of our parameter, on the devices, axes in `order`."""
    boxes = [box[:axis] + ((max(box[axis][0], start), min(box[axis][1], stop)),) + box[axis + 1:]
             for box in _device_boxes(sharding, shape, tensor_map)]
    blocks = _read_slab(tensor_map, part, read, boxes, order, None)
    sent_shape = tuple(stop - start if i == axis else shape[i] for i in order)
    offsets = tuple(start if i == axis else 0 for i in order)
    slab = jax.make_array_from_callback(sent_shape, _permute(sharding, order), lambda index: blocks[
        tuple((a + offset, b + offset) for (a, b), offset in zip(_box(index, sent_shape), offsets))])
    return slab.block_until_ready()


def _slabs(boxes: list[Box], shape: tuple[int, ...], lead: int, itemsize: int, chunk_bytes: int) -> tuple[int, int]:
    """(axis, indices per slab): slabs of about `chunk_bytes` along the layer axis of a stack, else
    along the largest axis that no device's shard splits; one slab when every axis is split."""
    free = [0] if lead else [i for i in range(len(shape)) if all(box[i] == (0, shape[i]) for box in boxes)]
    if not free:
        return 0, shape[0]
    axis = max(free, key=lambda i: shape[i])
    per_index = math.prod(shape) // shape[axis] * itemsize
    return axis, max(1, chunk_bytes // per_index)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _finish(slab: jax.Array, order: tuple[int, ...], dtype) -> jax.Array:
    """The whole parameter, sent with axes in `order` -> ours, in `dtype`."""
    return jnp.transpose(slab, tuple(int(i) for i in np.argsort(order))).astype(dtype)


@functools.partial(jax.jit, donate_argnums=0, static_argnums=(3, 4))
def _write_slab(value: jax.Array, slab: jax.Array, start, axis: int, order: tuple[int, ...]) -> jax.Array:
    """value[..., start:start + n, ...] (along `axis`) = the slab (axes in `order`) in our orientation."""
    ours = jnp.transpose(slab, tuple(int(i) for i in np.argsort(order))).astype(value.dtype)
    return jax.lax.dynamic_update_slice_in_dim(value, ours, start, axis)


def _device_boxes(sharding: Sharding, shape: tuple[int, ...], tensor_map: TensorMap) -> list[Box]:
    if tensor_map.num_layers:
        _drop_leading_axis(sharding, len(shape))  # raises when the layer axis is sharded
    return sorted({_box(index, shape) for index in sharding.addressable_devices_indices_map(shape).values()})


def _read_slab(tensor_map: TensorMap, part: Part, read: Callable[[int | None], RowReader], boxes: list[Box],
               order: tuple[int, ...], dtype) -> dict[Box, np.ndarray]:
    """{box, axes in `order`: its block} for boxes of our stored array (layer axis first when
    stacked); each layer's rows are read once. dtype None keeps the stored dtype."""
    if not tensor_map.num_layers:
        blocks = _read_blocks(tensor_map, part, read(None), boxes, order)
        return {box: block.astype(dtype or block.dtype, copy=False) for box, block in blocks.items()}
    layer_order = tuple(i - 1 for i in order[1:])
    blocks = {}
    for (first, last), layer_boxes in _group_by_layers(boxes).items():
        for layer in range(first, last):
            layer_blocks = _read_blocks(tensor_map, part, read(layer), layer_boxes, layer_order)
            for box in layer_boxes:
                sent = ((first, last),) + tuple(box[i] for i in layer_order)
                block = layer_blocks[tuple(box[i] for i in layer_order)]
                if sent not in blocks:
                    blocks[sent] = np.empty((last - first,) + block.shape, dtype or block.dtype)
                blocks[sent][layer - first] = block  # casts to dtype
    return blocks


def _group_by_layers(boxes: list[Box]) -> dict[tuple[int, int], list[Box]]:
    """{layer range: the boxes' other axes}."""
    groups: dict[tuple[int, int], list[Box]] = {}
    for box in boxes:
        groups.setdefault(box[0], []).append(box[1:])
    return groups


def _device_order(part: Part) -> tuple[int, ...]:
    """Axes of the array sent to the devices, in our axis numbering: T's orientation.

    Not transposed: ours. Transposed: our axes [split:] (T's rows) first, then [:split].
    """
    n = len(part.shape)
    return tuple(range(part.split, n)) + tuple(range(part.split)) if part.transposed else tuple(range(n))


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


_LIBC = _libc()


def _release_host_memory() -> None:
    """Frees the host blocks of finished transfers now, and hands the memory back to the OS.

    jaxlib drops its references to transferred numpy buffers lazily, from a gc callback (jax
    issue 14882): a cheap generation-0 collection runs it. glibc then keeps large freed blocks
    once its dynamic mmap threshold has grown; malloc_trim returns them, so the transient
    buffers of successive tensors do not add up.
    """
    gc.collect(0)
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _spec(sharding: NamedSharding, ndim: int) -> tuple:
    return tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))


def _drop_leading_axis(sharding: Sharding, ndim: int) -> Sharding:
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = _spec(sharding, ndim)
    if spec[0] is not None:
        raise ValueError(f"the layer axis of a stacked parameter is sharded ({sharding.spec}); it must not be")
    return NamedSharding(sharding.mesh, P(*spec[1:]))


def _permute(sharding: Sharding, order: tuple[int, ...]) -> Sharding:
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = _spec(sharding, len(order))
    return NamedSharding(sharding.mesh, P(*[spec[i] for i in order]))


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _read_blocks(tensor_map: TensorMap, part: Part, read: RowReader, boxes: list[Box],
                 order: tuple[int, ...]) -> dict[Box, np.ndarray]:
    """{box with axes in `order`: its block} for each of our boxes (zero beyond the logical
    shape), reading every needed row of T once."""
    selections = {box: _selection(part, box) for box in boxes}
    needed = np.unique(np.concatenate([rows for rows, _ in selections.values()] + [np.zeros(0, np.int64)]))
    matrix = _read_rows(tensor_map, read, needed)
    natural = _device_order(part)  # the axes of T[rows][:, cols], reshaped
    blocks = {}
    for box, (rows, cols) in selections.items():
        sent_box = tuple(box[i] for i in order)
        sent_shape = tuple(stop - start for start, stop in sent_box)
        logical = [max(0, min(stop, size) - start) for (start, stop), size in zip(box, part.shape)]
        values = _take(_take(matrix, np.searchsorted(needed, rows), 0), cols, 1)
        values = values.reshape([logical[i] for i in natural])
        if order != natural:
            values = _transpose(values, [natural.index(i) for i in order])
        if values.shape == sent_shape:
            block = np.ascontiguousarray(values)
            if block.nbytes < matrix.nbytes and np.may_share_memory(block, matrix):
                block = block.copy()  # a part of the matrix must not keep all of it alive
        else:  # the box reaches into padding (vocab rows, ViT heads added for mesh divisibility)
            block = np.zeros(sent_shape, matrix.dtype)
            block[tuple(slice(0, n) for n in values.shape)] = values
        blocks[sent_box] = block
    return blocks


def _selection(part: Part, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """(rows of T, columns of T) holding the logical part of `box` (our axes)."""
    clipped = [range(start, max(start, min(stop, size))) for (start, stop), size in zip(box, part.shape)]
    a = _flat_indices(clipped[:part.split], part.shape[:part.split])
    b = _flat_indices(clipped[part.split:], part.shape[part.split:])
    return (part.rows[b], a) if part.transposed else (part.rows[a], b)


def _flat_indices(ranges: list[range], shape: tuple[int, ...]) -> np.ndarray:
    """Row-major flat indices of the box `ranges` in an array of `shape` (no axes: one element)."""
    if not ranges:
        return np.zeros(1, np.int64)
    grids = np.meshgrid(*[np.arange(r.start, r.stop) for r in ranges], indexing="ij")
    return np.ravel_multi_index([g.reshape(-1) for g in grids], shape).astype(np.int64)


def _read_rows(tensor_map: TensorMap, read: RowReader, rows: np.ndarray) -> np.ndarray:
    """T[rows] for sorted unique `rows`, read as runs of consecutive rows within each tensor."""
    bounds = tensor_map.key_rows()
    key_of = np.searchsorted(bounds, rows, side="right") - 1
    breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(key_of) != 0)) + 1
    pieces = []
    for run in np.split(np.arange(len(rows)), breaks):
        if len(run):
            key, first, last = key_of[run[0]], rows[run[0]], rows[run[-1]]
            pieces.append(read(key, first - bounds[key], last + 1 - bounds[key], tensor_map.width))
    if not pieces:
        return np.zeros((0, tensor_map.width), np.float32)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)


def _transpose(array: np.ndarray, axes: list[int]) -> np.ndarray:
    """A contiguous transpose; numpy copies bfloat16 element by element, same-width integers fast."""
    raw = array.view(f"u{array.dtype.itemsize}")
    return np.ascontiguousarray(np.transpose(raw, axes)).view(array.dtype)


def _take(array: np.ndarray, indices: np.ndarray, axis: int) -> np.ndarray:
    """array.take(indices, axis), as a view when the indices are one ascending run."""
    n = len(indices)
    if n and indices[-1] - indices[0] == n - 1 and (n == 1 or np.all(np.diff(indices) == 1)):
        return array[(slice(None),) * axis + (slice(int(indices[0]), int(indices[0]) + n),)]
    # Gathers only move data: numpy copies bfloat16 element by element, same-width integers fast.
    raw = array.view(f"u{array.dtype.itemsize}")
    return np.take(raw, indices, axis=axis).view(array.dtype)
