"""Our own checkpoint of a model: `model_config.json` (the ModelConfig) + `params/` (orbax).

This is what `python -m internvl_jax.convert import` writes and `export` reads: the parameters
as an orbax PyTree checkpoint of `nnx.state(model, nnx.Param)` (LoRA adapters included), so it
restores onto any mesh without a conversion step.
"""
from __future__ import annotations

import json

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from internvl_jax import config as config_lib
from internvl_jax.config import ModelConfig
from internvl_jax.models.internvl import InternVLChatModel
from internvl_jax.models.params import abstract_model
from internvl_jax.sharding import state_shardings

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def is_native(directory: str | epath.PathLike) -> bool:
    return (epath.Path(directory) / CONFIG_FILE).exists()


def save_native(model: InternVLChatModel, directory: str | epath.PathLike) -> None:
    directory = epath.Path(directory)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory.resolve() / PARAMS_DIR, nnx.state(model, nnx.Param))
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (directory / CONFIG_FILE).write_text(json.dumps(config_lib.to_dict(model.config), indent=2) + "\n")


def load_native(directory: str | epath.PathLike, mesh: Mesh | None = None) -> InternVLChatModel:
    """Restores a model saved by `save_native`, sharded on `mesh` (or on the first device)."""
    directory = epath.Path(directory)
    config = config_lib.from_dict(ModelConfig, json.loads((directory / CONFIG_FILE).read_text()))
    abstract = abstract_model(config)
    state = nnx.state(abstract, nnx.Param)
    path = directory.resolve() / PARAMS_DIR
    with ocp.StandardCheckpointer() as checkpointer:
        # Parameters keep the dtypes they were saved in (e.g. fp32 trained, bf16 frozen).
        saved = {leaf.name: leaf.dtype for leaf in jax.tree.leaves(checkpointer.metadata(path).item_metadata)}
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        flat_shardings = dict(nnx.to_flat_state(state_shardings(state, mesh))) if mesh is not None else {}
        target = nnx.from_flat_state({
            p: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, saved[".".join(p) + ".value"],
                                              sharding=flat_shardings.get(p, device)))
            for p, v in nnx.to_flat_state(state)})
        restored = checkpointer.restore(path, target)
    return nnx.merge(nnx.graphdef(abstract), restored)
