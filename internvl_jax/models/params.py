"""Creating, counting and casting model parameters; trainable-group filters.

Models are created abstractly first (`nnx.eval_shape`), then materialised by one jitted init
whose outputs are placed straight into their mesh shardings, so no host ever holds a full copy.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from internvl_jax.config import ModelConfig
from internvl_jax.models.internvl import InternVLChatModel
from internvl_jax.models.layers import LoRAParam
from internvl_jax.sharding import state_shardings

GROUPS = ("vision_model", "mlp1", "language_model")


def trainable_filter(groups: Sequence[str], lora_only: bool = False) -> nnx.filterlib.Filter:
    """Params under the named top-level groups; with `lora_only`, just the LoRA adapters."""
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown trainable groups {sorted(unknown)}; known: {GROUPS}")
    if lora_only:
        return nnx.All(LoRAParam, nnx.Any(*[nnx.PathContains(g) for g in groups]))
    return nnx.All(nnx.Param, nnx.Any(*[nnx.PathContains(g) for g in groups]))


def logical_shape(variable: nnx.Variable) -> tuple[int, ...]:
    """The shape checkpoints use: without the padding added for mesh divisibility."""
    return tuple(getattr(variable, "unpadded_shape", None) or variable.get_value().shape)


def count_params(tree, filter_=nnx.Param) -> int:
    """Number of logical parameters of a model or state (works on abstract ones)."""
    state = nnx.state(tree, filter_) if isinstance(tree, nnx.Module) else tree
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return sum(math.prod(logical_shape(v)) for v in variables if isinstance(v, nnx.Variable))


def abstract_model(config: ModelConfig, seed: int = 0) -> InternVLChatModel:
    """A model whose variables hold ShapeDtypeStructs: nothing is allocated."""
    return nnx.eval_shape(lambda: InternVLChatModel(config, rngs=nnx.Rngs(seed)))


def _cast_state(state: nnx.State, trainable: nnx.filterlib.Filter, train_dtype, frozen_dtype) -> nnx.State:
    train_state, frozen_state = state.split(trainable, ...)
    cast = lambda tree, dtype: jax.tree.map(lambda x: x.astype(dtype), tree)
    return nnx.merge_state(cast(train_state, train_dtype), cast(frozen_state, frozen_dtype))


def init_rngs(seed: int) -> nnx.Rngs:
    """Initialisation keys. The rbg generator compiles ~6x faster than threefry on CPU; its
    values depend on the sharding, so runs that must agree across meshes share a checkpoint,
    not a seed."""
    return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


def create_model(config: ModelConfig, *, mesh: Mesh | None = None, seed: int = 0,
                 trainable: nnx.filterlib.Filter = nnx.Param) -> InternVLChatModel:
    """Initialises a model; trainable params in `param_dtype`, the rest in `frozen_param_dtype`.

    With a mesh, every parameter is created directly in its sharding (from its logical axes).
    """
    train_dtype, frozen_dtype = jnp.dtype(config.param_dtype), jnp.dtype(config.frozen_param_dtype)

    def init_state():
        model = InternVLChatModel(config, rngs=init_rngs(seed))
        return _cast_state(nnx.state(model), trainable, train_dtype, frozen_dtype)

    graphdef = nnx.graphdef(abstract_model(config, seed))
    if mesh is None:
        return nnx.merge(graphdef, jax.jit(init_state)())
    shardings = state_shardings(nnx.eval_shape(init_state), mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(init_state, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
