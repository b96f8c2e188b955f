"""The train state: model + optimizer (trainable moments only) + the run's base RNG key.

It is one nnx graph so that `nnx.split` gives a single State whose shardings come from the
variables' logical axes (optimizer moments inherit their parameter's axes).
"""
from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from internvl_jax.config import Config
from internvl_jax.models.params import create_model, trainable_filter
from internvl_jax.sharding import sharded_abstract_state, state_shardings
from internvl_jax.train.initial_weights import load_initial_weights
from internvl_jax.train.optimizer import make_optimizer


class RngKey(nnx.Variable):
    """Raw key data (uint32) of the run's base key; per-step keys are folded in from it."""


class TrainState(nnx.Module):
    def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer, key_data: jax.Array):
        self.model = model
        self.optimizer = optimizer
        self.rng = RngKey(key_data)

    def step_key(self) -> jax.Array:
        """The key of the current optimizer step: a function of (base key, step) only, so resumes replay it."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng[...]), self.optimizer.step[...])


def trainable_params(config: Config) -> nnx.filterlib.Filter:
    """The recipe's trainable parameters: whole groups, or only LoRA adapters when LoRA is on."""
    lora = config.model.lora
    return trainable_filter(config.train.trainable, lora_only=lora.rank > 0 or lora.vision_rank > 0)


def create_train_state(config: Config, total_steps: int, mesh: Mesh | None = None,
                       initial_weights: bool = True) -> TrainState:
    """A fresh state (weights from `train.init_from` when set), every variable in its mesh sharding."""
    wrt = trainable_params(config)
    model = create_model(config.model, mesh=mesh, seed=config.train.seed, trainable=wrt)
    if initial_weights and config.train.init_from:
        load_initial_weights(model, config.model, config.train.init_from)
    key_data = jax.random.key_data(jax.random.key(config.train.seed))
    state = TrainState(model, make_optimizer(model, config.train, total_steps, wrt), key_data)
    if mesh is None:
        return state
    graphdef, values = nnx.split(state)
    return nnx.merge(graphdef, jax.device_put(values, state_shardings(values, mesh)))


def abstract_train_state(config: Config, total_steps: int, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of ShapeDtypeStructs with their `mesh` shardings): a restore target."""
    abstract = nnx.eval_shape(lambda: create_train_state(config, total_steps, initial_weights=False))
    graphdef, values = nnx.split(abstract)
    return graphdef, sharded_abstract_state(values, mesh)

