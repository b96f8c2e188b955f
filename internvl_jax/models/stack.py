"""Running a stack of identical blocks: scanned (one compiled body) or unrolled, with remat.

Blocks are stored stacked (every parameter has a leading `layers` axis), so scanned and unrolled
runs share the same parameters and checkpoints.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_stack(blocks: nnx.Module, carry: Any, per_layer: Any,
              body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], *, scan: bool,
              remat_policy: str) -> tuple[Any, Any]:
    """Applies `body(block_i, carry, per_layer_i) -> (carry, out_i)` for each layer i.

    `per_layer` is a pytree whose leaves have the layer axis first (or None); the outputs are
    stacked along a new first axis. Returns (carry, stacked outputs).
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy '{remat_policy}' is not one of {tuple(REMAT_POLICIES)}")
    graphdef, params = nnx.split(blocks)

    def step(carry, inputs):
        layer_params, layer_inputs = inputs
        return body(nnx.merge(graphdef, layer_params), carry, layer_inputs)

    if remat_policy != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
        return jax.lax.scan(step, carry, (params, per_layer))
    num_layers = jax.tree.leaves(params)[0].shape[0]
    outputs = []
    for i in range(num_layers):
        carry, out = step(carry, jax.tree.map(lambda a: a[i], (params, per_layer)))
        outputs.append(out)
    return carry, jax.tree.map(lambda *xs: jax.numpy.stack(xs), *outputs)
