"""One jitted train step: gradient accumulation over micro-batches, loss reduction, AdamW update.

Input batch: the per-step stack of `grad_accum_steps` micro-batches of the batch contract, each
leaf with a leading [GA] axis:
    input_ids, labels, segment_ids, positions [GA, B, T] int32 (labels not shifted, -100 = ignored)
    pixel_values [GA, N, S, S, 3] uint8, image_flags [GA, N] int32, num_samples [GA, B] int32
B and N are global (all processes). The step is compiled once, ahead of time, with explicit
input/output shardings and the state donated; later calls go straight to that executable, so a
batch of another shape or sharding fails loudly instead of recompiling.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from internvl_jax.config import TrainConfig
from internvl_jax.sharding import logical_to_spec
from internvl_jax.train.loss import IGNORE_INDEX, chunked_row_losses, next_token_targets
from internvl_jax.train.optimizer import skipped_updates
from internvl_jax.train.state import TrainState

# Logical axes of each batch leaf after the leading micro-batch axis.
BATCH_AXES: dict[str, tuple[str | None, ...]] = {
    "input_ids": ("act_batch", "act_length"),
    "labels": ("act_batch", "act_length"),
    "segment_ids": ("act_batch", "act_length"),
    "positions": ("act_batch", "act_length"),
    "pixel_values": ("act_tiles", None, None, None),
    "image_flags": ("act_tiles",),
    "num_samples": ("act_batch",),
}
REDUCTIONS = ("micro_batch_token_mean", "global_token_mean")


def batch_shardings(shapes: Mapping[str, tuple[int, ...]], mesh: Mesh) -> dict[str, NamedSharding]:
    """NamedShardings of a stacked batch given its global shapes (rows and tiles over data × fsdp)."""
    return {name: NamedSharding(mesh, logical_to_spec((None,) + BATCH_AXES[name], shape, mesh))
            for name, shape in shapes.items()}


def _micro_batch_loss(train: TrainConfig, grad_accum: int, normalizer: jax.Array, row_loss: jax.Array,
                      row_count: jax.Array) -> jax.Array:
    """This micro-batch's share of the step loss; shares add up over the GA micro-batches.

    micro_batch_token_mean (official): token mean within each group of `loss_group_rows` rows,
    mean over groups, mean over micro-batches. global_token_mean: token sum / supervised tokens of
    the whole step (`normalizer`). A group without supervised tokens contributes 0.
    """
    if train.loss_reduction == "global_token_mean":
        return jnp.sum(row_loss) / jnp.maximum(normalizer, 1)
    rows = row_loss.shape[0]
    group = train.loss_group_rows or rows
    if rows % group:
        raise ValueError(f"loss_group_rows {group} does not divide the micro-batch's {rows} rows")
    sums = row_loss.reshape(-1, group).sum(axis=1)
    counts = row_count.reshape(-1, group).sum(axis=1)
    return jnp.mean(sums / jnp.maximum(counts, 1)) / grad_accum


def train_step(graphdef: nnx.GraphDef, train: TrainConfig, schedule: optax.Schedule, state: nnx.State,
               batch: dict[str, jax.Array]) -> tuple[nnx.State, dict[str, jax.Array]]:
    """(state, stacked batch) -> (new state, scalar metrics). Pure; jitted by `TrainStep`."""
    ts: TrainState = nnx.merge(graphdef, state)
    model_def, params, frozen = nnx.split(ts.model, ts.optimizer.wrt, ...)
    grad_accum = batch["input_ids"].shape[0]
    targets = jax.vmap(next_token_targets)(batch["labels"], batch["segment_ids"])
    supervised = jnp.sum(targets != IGNORE_INDEX)
    step_key = ts.step_key()

    def loss_fn(params, micro, micro_targets, key):
        model = nnx.merge(model_def, params, frozen)
        hidden = model(micro["input_ids"], micro["pixel_values"], micro["image_flags"], micro["segment_ids"],
                       micro["positions"], return_hidden=True, key=key)
        row_loss, row_count = chunked_row_losses(hidden, micro_targets, model.language_model.logits,
                                                 train.loss_chunk_size)
        return _micro_batch_loss(train, grad_accum, supervised, row_loss, row_count)

    def accumulate(grad_sum, inputs):
        micro, micro_targets, index = inputs
        loss, grads = jax.value_and_grad(loss_fn)(params, micro, micro_targets, jax.random.fold_in(step_key, index))
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    # Accumulate in float32 whatever the compute dtype: these are the master-weight gradients.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, losses = jax.lax.scan(accumulate, zeros, (batch, targets, jnp.arange(grad_accum)))
    loss = jnp.sum(losses)
    grad_norm = optax.global_norm(grads)
    skipped_before = skipped_updates(ts.optimizer)
    lr = schedule(ts.optimizer.step[...] - skipped_before)
    ts.optimizer.update(ts.model, grads)
    tokens = jnp.sum(batch["segment_ids"] > 0)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": jnp.asarray(lr, jnp.float32),
        "supervised_fraction": supervised / jnp.maximum(tokens, 1),
        "supervised_tokens": supervised,
        "tokens": tokens,
        "samples": jnp.sum(batch["num_samples"]),
        "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        "skipped_updates": skipped_updates(ts.optimizer),
    }
    return nnx.state(ts), metrics


class TrainStep:
    """The compiled step for one state layout and one batch shape on one mesh."""

    def __init__(self, graphdef: nnx.GraphDef, train: TrainConfig, schedule: optax.Schedule,
                 state_sharding: Any, mesh: Mesh):
        if train.loss_reduction not in REDUCTIONS:
            raise ValueError(f"unknown loss_reduction '{train.loss_reduction}'; known: {REDUCTIONS}")
        self.mesh = mesh
        self._state_sharding = state_sharding
        self._fn = lambda state, batch: train_step(graphdef, train, schedule, state, batch)
        self._compiled = None
        self.compile_seconds = 0.0

    def batch_sharding(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
        return batch_shardings({k: np.shape(v) for k, v in batch.items()}, self.mesh)

    def compile(self, state: nnx.State, batch: Mapping[str, Any],
                compiler_options: dict[str, Any] | None = None) -> jax.stages.Compiled:
        """Lowers and compiles for these (possibly abstract) inputs; records the compile time.

        `compiler_options`: XLA options for this program alone (e.g. a lower optimisation level
        where compile time matters more than step time, as in quick benchmark runs).
        """
        start = time.perf_counter()
        replicated = NamedSharding(self.mesh, P())
        jitted = jax.jit(self._fn, in_shardings=(self._state_sharding, self.batch_sharding(batch)),
                         out_shardings=(self._state_sharding, replicated), donate_argnums=0)
        with jax.set_mesh(self.mesh):
            self._compiled = jitted.lower(state, batch).compile(compiler_options)
        self.compile_seconds = time.perf_counter() - start
        return self._compiled

    def __call__(self, state: nnx.State, batch: Mapping[str, jax.Array]) -> tuple[nnx.State, dict]:
        """Runs one step; `state` is donated (do not use it afterwards)."""
        if self._compiled is None:
            self.compile(state, batch)
        with jax.set_mesh(self.mesh):
            return self._compiled(state, batch)


def stack_micro_batches(micro_batches: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """GA per-process micro-batches of the contract -> one per-process step batch with a leading [GA] axis."""
    return {name: np.stack([m[name] for m in micro_batches]) for name in BATCH_AXES}


def device_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process stacked batch -> global arrays; each process contributes its rows and tiles (axis 1)."""
    count = jax.process_count()
    global_shapes = {k: (v.shape[0], v.shape[1] * count) + v.shape[2:] for k, v in local.items()}
    shardings = batch_shardings(global_shapes, mesh)
    return {k: jax.make_array_from_process_local_data(shardings[k], v, global_shapes[k]) for k, v in local.items()}
