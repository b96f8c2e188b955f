"""The safetensors format, read in row ranges and written one tensor at a time (no pickle, no mmap).

A file is an 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape,
data_offsets [begin, end)}, "__metadata__": {...}}, then the raw little-endian, C-contiguous
tensor bytes. Reading with plain seeks (not mmap) keeps file pages out of the process's
resident memory and works on any `etils.epath` path (local disk or `gs://`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np
from etils import epath

DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2 ** 20
_ALIGNMENT = 8  # the header is space-padded so the data starts 8-byte aligned, as the reference writer does


class SafetensorsError(ValueError):
    """A safetensors file is truncated, corrupt or holds a tensor this reader does not support."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype | None  # None: a dtype outside DTYPES (reported when the tensor is used)
    dtype_name: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """Header of one file plus row-range reads of its tensors."""

    def __init__(self, path: str | epath.Path):
        self.path = epath.Path(path)
        self._handle = None
        try:
            size = self.path.stat().length
        except FileNotFoundError as e:
            raise SafetensorsError(f"{self.path}: file not found") from e
        with self.path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise SafetensorsError(f"{self.path}: corrupt or truncated safetensors file (header length "
                                       f"{header_len}, file size {size})")
            header_bytes = f.read(header_len)
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = _tensor_info(self.path, name, entry, data_start, size)

    def read_rows(self, name: str, start: int, stop: int, width: int) -> np.ndarray:
        """Rows [start, stop) of tensor `name` viewed as a [-1, width] matrix, in its own dtype."""
        info = self.tensors[name]
        if info.dtype is None:
            raise SafetensorsError(f"{self.path}: tensor '{name}' has unsupported dtype {info.dtype_name} "
                                   f"(supported: {', '.join(DTYPES)})")
        row_bytes = width * info.dtype.itemsize
        out = np.empty((stop - start, width), info.dtype)
        handle = self._open()
        handle.seek(info.begin + start * row_bytes)
        view = memoryview(out.reshape(-1).view(np.uint8))
        if hasattr(handle, "readinto"):
            got = handle.readinto(view)
        else:  # file objects of some remote filesystems
            data = handle.read(len(view))
            got = len(data)
            view[:got] = data
        if got != len(view):
            raise SafetensorsError(f"{self.path}: truncated while reading tensor '{name}'")
        return out

    def _open(self):
        if self._handle is None:
            self._handle = self.path.open("rb")
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _tensor_info(path, name: str, entry, data_start: int, file_size: int) -> TensorInfo:
    try:
        dtype_name = entry["dtype"]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise SafetensorsError(f"{path}: corrupt header entry for tensor '{name}' ({e!r})") from e
    dtype = DTYPES.get(dtype_name)
    if dtype is not None and end - begin != math.prod(shape) * dtype.itemsize:
        raise SafetensorsError(f"{path}: corrupt header: tensor '{name}' {dtype_name}{list(shape)} has "
                               f"{end - begin} bytes of data")
    if not 0 <= begin <= end:
        raise SafetensorsError(f"{path}: corrupt header: tensor '{name}' has offsets [{begin}, {end})")
    if data_start + end > file_size:
        raise SafetensorsError(f"{path}: truncated safetensors file: tensor '{name}' ends at byte "
                               f"{data_start + end}, the file has {file_size}")
    return TensorInfo(name, dtype, dtype_name, shape, data_start + begin, data_start + end)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, dtype and shape (known before its data exists)."""
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: epath.Path, specs: list[TensorSpec], arrays: Iterator[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes the header for `specs`, then each array of `arrays` (same names, same order) as it comes.

    Only one tensor is in memory at a time; an array that does not match its spec raises
    ValueError before anything of it is written.
    """
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-(8 + len(header_bytes)) % _ALIGNMENT)
    with epath.Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec in specs:
            name, array = next(arrays)
            if name != spec.name or array.dtype != spec.dtype or tuple(array.shape) != spec.shape:
                raise ValueError(f"{path}: expected tensor '{spec.name}' {spec.dtype}{list(spec.shape)}, got "
                                 f"'{name}' {array.dtype}{list(array.shape)}")
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)


def shard_specs(specs: Iterable[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Splits specs, in order, into consecutive groups of at most `max_bytes` (a larger tensor is alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards
