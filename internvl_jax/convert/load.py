"""Reading HF checkpoints (safetensors only) into a model's state, with named errors."""
from __future__ import annotations

import json
import logging
from typing import Iterator

import jax
import numpy as np
from etils import epath
from flax import nnx
from safetensors import SafetensorError, safe_open

from internvl_jax.convert.layouts import TensorMap, tensor_maps
from internvl_jax.convert.hf_config import model_config_from_hf
from internvl_jax.config import ModelConfig

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SUPPORTED_DTYPES = {"F32", "BF16", "F16"}


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, unexpected, malformed or of the wrong shape."""


class SafetensorsReader:
    """Tensor access over a single file or a sharded checkpoint with an index."""

    def __init__(self, directory: str | epath.Path):
        self.directory = epath.Path(directory)
        index_path = self.directory / INDEX_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
        elif (self.directory / SINGLE_FILE).exists():
            weight_map = None
        else:
            raise CheckpointError(f"{self.directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        self._handles: dict[str, object] = {}
        if weight_map is None:
            handle = self._open(SINGLE_FILE)
            weight_map = {key: SINGLE_FILE for key in handle.keys()}
        self.weight_map: dict[str, str] = weight_map

    def _open(self, filename: str):
        if filename not in self._handles:
            path = self.directory / filename
            if not path.exists():
                raise CheckpointError(f"{self.directory / INDEX_FILE} points to missing shard {path}")
            try:
                self._handles[filename] = safe_open(str(path), framework="np")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from e
        return self._handles[filename]

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def _slice(self, key: str):
        if key not in self.weight_map:
            raise CheckpointError(f"{self.directory}: missing tensor '{key}'")
        return self._open(self.weight_map[key]).get_slice(key)

    def get(self, key: str) -> np.ndarray:
        tensor_slice = self._slice(key)
        dtype = tensor_slice.get_dtype()
        filename = self.directory / self.weight_map[key]
        if dtype not in SUPPORTED_DTYPES:
            raise CheckpointError(f"{filename}: tensor '{key}' has unsupported dtype {dtype}")
        try:
            return self._open(self.weight_map[key]).get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{filename}: cannot read tensor '{key}' ({e})") from e


def read_config(directory: str | epath.Path) -> tuple[ModelConfig, str]:
    path = epath.Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: config.json not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    return model_config_from_hf(data, str(path))


def _read_map(reader: SafetensorsReader, tensor_map: TensorMap) -> Iterator[np.ndarray]:
    """Our arrays (logical shapes, layers stacked) for one TensorMap, one per path."""
    layers = range(tensor_map.num_layers) if tensor_map.num_layers else [None]
    per_layer = []
    for layer in layers:
        converted = tensor_map.to_ours(*[reader.get(k) for k in tensor_map.layer_keys(layer)])
        per_layer.append(converted if isinstance(converted, tuple) else (converted,))
    for outputs in zip(*per_layer):
        yield np.stack(outputs) if tensor_map.num_layers else outputs[0]


def _pad_to(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.shape == shape:
        return array
    return np.pad(array, [(0, s - a) for a, s in zip(array.shape, shape)])


def load_state(directory: str | epath.Path, config: ModelConfig, layout: str, abstract: nnx.Module,
               shardings=None) -> nnx.State:
    """Reads every parameter of `abstract` (a model from `nnx.eval_shape`) from the checkpoint.

    Arrays are cast to the abstract parameter's dtype, zero-padded to its stored shape and
    placed in `shardings` (a state-shaped tree of shardings) when given. Raises CheckpointError
    naming the file and tensor on any missing, unexpected or mis-shaped tensor.
    """
    reader = SafetensorsReader(directory)
    state = nnx.state(abstract, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    used_keys: set[str] = set()
    loaded: dict[tuple, jax.Array] = {}
    for tensor_map in tensor_maps(config, layout):
        for path, array in zip(tensor_map.paths, _read_map(reader, tensor_map)):
            if path not in flat:
                raise CheckpointError(f"layout maps to unknown parameter {'.'.join(path)}")
            variable = flat[path]
            logical = tuple(getattr(variable, "unpadded_shape", None) or variable.get_value().shape)
            if array.shape != logical:
                raise CheckpointError(f"{reader.directory}: tensor(s) {', '.join(tensor_map.keys)} give shape "
                                      f"{array.shape} for {'.'.join(path)}, expected {logical}")
            target = variable.get_value()
            array = _pad_to(array, target.shape).astype(target.dtype)
            sharding = flat_shardings.get(path)
            loaded[path] = jax.device_put(array, sharding) if sharding is not None else jax.numpy.asarray(array)
        used_keys.update(k for layer in range(max(tensor_map.num_layers, 1))
                         for k in tensor_map.layer_keys(layer if tensor_map.num_layers else None))
    unexpected = sorted(reader.keys() - used_keys)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(f"{reader.directory}: {len(unexpected)} unexpected tensor(s): {shown}")
    missing = sorted(".".join(map(str, p)) for p in flat if p not in loaded)
    if missing:
        raise CheckpointError(f"{reader.directory}: no checkpoint tensor for parameter(s) {', '.join(missing)}")
    for path, value in loaded.items():
        flat[path] = flat[path].replace(value)
    return nnx.from_flat_state(flat)
