"""A checkpoint directory's tensors: one `model.safetensors` or shards listed by an index.

Only safetensors are read (never pickle). Every error names the file and the tensor.
"""
from __future__ import annotations

import json

import numpy as np
from etils import epath

from internvl_jax.convert.safetensors_io import SafetensorsError, SafetensorsFile, TensorInfo

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, unexpected, malformed or of the wrong shape or dtype."""


class CheckpointReader:
    """Tensor headers and row-range reads over a single file or a sharded checkpoint."""

    def __init__(self, directory: str | epath.PathLike):
        self.directory = epath.Path(directory)
        index_path = self.directory / INDEX_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                assert isinstance(weight_map, dict)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from e
            filenames = sorted(set(weight_map.values()))
            for filename in filenames:
                if not (self.directory / filename).exists():
                    raise CheckpointError(f"{index_path} points to missing shard {self.directory / filename}")
        elif (self.directory / SINGLE_FILE).exists():
            weight_map, filenames = None, [SINGLE_FILE]
        elif not self.directory.exists():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        else:
            raise CheckpointError(f"{self.directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                                  "(only safetensors checkpoints are read)")
        self._files: dict[str, SafetensorsFile] = {}
        for filename in filenames:
            try:
                self._files[filename] = SafetensorsFile(self.directory / filename)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from e
        if weight_map is None:
            weight_map = {key: SINGLE_FILE for key in self._files[SINGLE_FILE].tensors}
        for key, filename in weight_map.items():
            if key not in self._files[filename].tensors:
                raise CheckpointError(f"{index_path} lists tensor '{key}' in {self.directory / filename}, "
                                      "which does not contain it")
        self.weight_map: dict[str, str] = weight_map

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def file_of(self, key: str) -> epath.Path:
        return self.directory / self.weight_map[key]

    def info(self, key: str) -> TensorInfo:
        if key not in self.weight_map:
            raise CheckpointError(f"{self.directory}: missing tensor '{key}'")
        return self._files[self.weight_map[key]].tensors[key]

    def read_rows(self, key: str, start: int, stop: int, width: int) -> np.ndarray:
        """Rows [start, stop) of tensor `key` viewed as [-1, width], in the stored dtype."""
        self.info(key)
        try:
            return self._files[self.weight_map[key]].read_rows(key, start, stop, width)
        except (SafetensorsError, OSError) as e:
            raise CheckpointError(f"{self.file_of(key)}: cannot read tensor '{key}' ({e})") from e

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
