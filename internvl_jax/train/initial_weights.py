"""Initial weights of a run (`train.init_from`): an HF checkpoint, or an earlier run's model.

Values are placed into the freshly created model's variables, keeping each variable's dtype
(trainable fp32 / frozen bf16 per the new recipe) and sharding.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from internvl_jax.config import ModelConfig


def _abstract(state: nnx.State) -> nnx.State:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def load_initial_weights(model: nnx.Module, config: ModelConfig, path: str) -> None:
    """Overwrites `model`'s parameters from `path` (HF checkpoint dir or run workdir)."""
    # orbax needs absolute paths; a relative local path is taken from the working directory.
    root = epath.Path(path if "://" in path else os.path.abspath(path))
    if (root / "config.json").exists():
        _load_hf(model, config, root)
    else:
        _load_run(model, root)


def _load_run(model: nnx.Module, workdir: epath.Path) -> None:
    directory = workdir / "checkpoints" if (workdir / "checkpoints").exists() else workdir
    if not directory.exists():
        raise FileNotFoundError(f"train.init_from: {workdir} is neither an HF checkpoint (no config.json) "
                                "nor a run workdir with checkpoints")
    with ocp.CheckpointManager(str(directory)) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"train.init_from: no checkpoint in {directory}")
        target = nnx.State({"model": _abstract(nnx.state(model))})
        restored = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
    nnx.update(model, restored["model"]["model"])


def _load_hf(model: nnx.Module, config: ModelConfig, directory: epath.Path) -> None:
    """Reads the checkpoint through the run's own config (shape mismatches raise, naming the tensor)."""
    from internvl_jax.convert.load import load_state, read_config  # the converter is only needed here
    _, layout = read_config(directory)
    params = nnx.state(model, nnx.Param)
    loaded = load_state(directory, config, layout, model)
    nnx.update(model, jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding),
                                   loaded, params))
