"""Ahead-of-time compilation of the sharded tiny train step for a real TPU topology (v5e 2×2).

Runs the real XLA:TPU compiler from libtpu on this CPU-only machine (toolchain.md §10), with
the Pallas splash-attention kernels selected.
"""
import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from internvl_jax.config import MeshConfig
from internvl_jax.models.params import abstract_model
from internvl_jax.sharding import make_mesh, sharded_abstract_state
from test_sharding import loss_fn, make_train_batch


def tpu_topology(name):
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]')")
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # the plugin can be present but unusable on this host
        pytest.skip(f"libtpu cannot describe topology {name}: {e}")


def test_sharded_train_step_compiles_for_v5e_2x2(tiny_config):
    topology = tpu_topology("v5e:2x2")
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices=topology.devices)
    config = dataclasses.replace(tiny_config, attention="splash", dtype="bfloat16", remat_policy="full")
    graphdef, state = nnx.split(abstract_model(config))
    abstract_state = sharded_abstract_state(state, mesh)
    batch = make_train_batch(config)
    data = NamedSharding(mesh, P(("data", "fsdp")))
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data) for k, v in batch.items()}

    def step(state, batch):
        return jax.value_and_grad(lambda s: loss_fn(nnx.merge(graphdef, s), batch))(state)

    with jax.set_mesh(mesh):
        lowered = jax.jit(step).lower(abstract_state, abstract_batch)
    assert "tpu_custom_call" in lowered.as_text()  # the splash kernels are in the program
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    assert memory.temp_size_in_bytes > 0
    loss, grads = compiled.output_shardings
    assert loss.is_fully_replicated
