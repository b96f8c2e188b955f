"""Loading an HF checkpoint directory (safetensors only) into a model's state.

`load_state` first checks the whole checkpoint against the model from the headers alone
(`plan.py`), then streams the tensors into place one parameter at a time (`placement.py`),
merging the PEFT adapters the plan does not keep into their base weights as they are read.
"""
from __future__ import annotations

import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import SingleDeviceSharding

from internvl_jax.config import ModelConfig
from internvl_jax.convert import peft
from internvl_jax.convert.checkpoint import CheckpointError, CheckpointReader
from internvl_jax.convert.hf_config import ConfigFileError, model_config_from_hf
from internvl_jax.convert.layouts import TensorMap
from internvl_jax.convert.placement import CHUNK_BYTES, place_part
from internvl_jax.convert.plan import CheckpointSummary, inspect_checkpoint, plan_load
from internvl_jax.models.layers import LoRAParam

__all__ = ["CheckpointError", "CheckpointSummary", "ConfigFileError", "inspect_checkpoint", "load_state",
           "read_config"]

log = logging.getLogger(__name__)


def read_config(directory: str | epath.PathLike) -> tuple[ModelConfig, str]:
    """(ModelConfig, layout) from `directory/config.json`."""
    path = epath.Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: config.json not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    return model_config_from_hf(data, str(path))


def load_state(directory: str | epath.PathLike, config: ModelConfig, layout: str, model: nnx.Module,
               shardings=None, *, dtype=None, host_bytes: int = CHUNK_BYTES) -> nnx.State:
    """Reads every parameter of `model` from the checkpoint; returns them as a Param state.

    `model` is abstract (from `nnx.eval_shape` / `abstract_model`) or concrete (e.g. from
    `create_model`, whose values are then replaced by the caller).

    Args:
      shardings: a state-shaped tree of shardings (e.g. `sharding.state_shardings`); without it
        each parameter goes where the model's value is (a concrete array, or a
        ShapeDtypeStruct with a sharding), else to the first device.
      dtype: dtype of the loaded parameters; None keeps each tensor's stored dtype (bf16 stays
        bf16). LoRA adapters the checkpoint lacks keep a concrete model's values.
      host_bytes: parameters up to this size are assembled on the host (no compiled program),
        larger ones on the devices in slabs (`placement.py`); default `placement.CHUNK_BYTES`.
    Raises CheckpointError naming the file and tensor on any missing, unexpected, mis-shaped,
    unsupported or unreadable tensor; nothing is read before the whole checkpoint checks out.
    """
    start = time.perf_counter()
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    default_sharding = SingleDeviceSharding(jax.devices()[0])
    if shardings is not None:
        flat_shardings = dict(nnx.to_flat_state(shardings))
    else:
        flat_shardings = {path: getattr(v.get_value(), "sharding", None) or default_sharding
                          for path, v in flat.items()}
    with CheckpointReader(directory) as reader:
        names = peft.StoredNames(reader.keys(), str(reader.directory))
        plan = plan_load(reader, names, config, layout, flat)
        loaded = {}
        for tensor_map in plan.maps:
            stored = [reader.info(names.stored(k)).dtype for k in tensor_map.layer_keys(tensor_map.layers()[0])]
            target = jnp.dtype(dtype) if dtype is not None else np.result_type(*stored)
            read = _row_reader(reader, names, plan.merged, tensor_map)
            for part in tensor_map.parts:
                loaded[part.path] = place_part(tensor_map, part, read, flat[part.path].get_value().shape, target,
                                               flat_shardings[part.path], host_bytes)
    loaded.update(_missing_adapters(directory, flat, loaded))
    for path, value in loaded.items():
        flat[path] = flat[path].replace(value)
    log.info("loaded %d parameters from %s in %.1f s", len(loaded), directory, time.perf_counter() - start)
    return nnx.from_flat_state(flat)


def _missing_adapters(directory, flat: dict, loaded: dict) -> dict:
    """Values of the parameters the checkpoint does not hold: only the LoRA adapters of a
    concrete model (kept as they are, e.g. freshly initialised by `create_model`) may be."""
    missing = [path for path in flat if path not in loaded]
    values = {path: flat[path].get_value() for path in missing
              if isinstance(flat[path], LoRAParam) and isinstance(flat[path].get_value(), jax.Array)}
    unfilled = [".".join(map(str, p)) for p in missing if p not in values]
    if unfilled:
        raise CheckpointError(f"{directory}: no checkpoint tensor for parameter(s) {', '.join(unfilled)} (fresh "
                              "LoRA adapters: load into a model from create_model, as train.init_from does)")
    return values


def _row_reader(reader: CheckpointReader, names: peft.StoredNames, merged: set[str], tensor_map: TensorMap):
    """layer -> (key index, start, stop, width) -> rows, merging LoRA adapters where planned."""
    def for_layer(layer):
        keys = tensor_map.layer_keys(layer)

        def read(index: int, start: int, stop: int, width: int) -> np.ndarray:
            key = keys[index]
            rows = reader.read_rows(names.stored(key), start, stop, width)
            if key not in merged:
                return rows
            a_key, b_key = names.adapter_of(key)
            a = reader.read_rows(a_key, 0, reader.info(a_key).shape[0], width)
            b_rows = reader.read_rows(b_key, start, stop, a.shape[0])
            return peft.merge_rows(rows, b_rows, a)
        return read
    return for_layer
