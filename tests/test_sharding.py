"""Sharding on a 2×2×2 mesh of fake CPU devices: placement, optimizer state, numerics, remat."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from internvl_jax.config import MeshConfig
from internvl_jax.models.params import abstract_model, create_model
from internvl_jax.sharding import logical_to_spec, make_mesh, state_shardings
from internvl_jax.train.loss import mean_batch_loss
from test_model import make_batch

REPLICATION_THRESHOLD = 4096  # elements; anything larger must be split over some mesh axis


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def sharded_model(tiny_model, tiny_config, mesh):
    """The session's tiny model, its exact values placed on the mesh by the rules."""
    state = nnx.state(tiny_model)
    placed = jax.device_put(state, state_shardings(state, mesh))
    return nnx.merge(nnx.graphdef(tiny_model), placed)


def test_make_mesh_sizes():
    assert dict(make_mesh(MeshConfig(data=1, fsdp=-1, tensor=2)).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="needs 12 devices"):
        make_mesh(MeshConfig(data=3, fsdp=2, tensor=2))
    with pytest.raises(ValueError, match="at most one axis"):
        make_mesh(MeshConfig(data=-1, fsdp=-1, tensor=1))


def test_rules_drop_axes_that_do_not_divide(mesh):
    assert logical_to_spec(("vocab", "embed"), (1024, 128), mesh) == P("tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed"), (1025, 128), mesh) == P(None, "fsdp")
    assert logical_to_spec(("act_batch", "act_length", "act_embed"), (4, 8, 16), mesh) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("act_batch", "act_length", "act_embed"), (2, 8, 16), mesh) == P("data", None, None)
    with pytest.raises(KeyError, match="no_such_axis"):
        logical_to_spec(("no_such_axis",))


def test_every_parameter_is_placed_by_the_rules(tiny_config, mesh):
    model = create_model(tiny_config, mesh=mesh, seed=0)
    replicated_large = []
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        expected = logical_to_spec(variable.axes, value.shape, mesh)
        assert value.sharding.spec == expected, path
        assert value.sharding.mesh.shape == mesh.shape
        if math.prod(value.shape) > REPLICATION_THRESHOLD and all(s is None for s in expected):
            replicated_large.append(path)
    assert not replicated_large


def test_optimizer_state_follows_parameter_shardings(sharded_model, mesh):
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(sharded_model, optax.adamw(1e-3), wrt=nnx.Param)
    params = {p: v.get_value().sharding for p, v in nnx.to_flat_state(nnx.state(sharded_model, nnx.Param))}
    checked = 0
    for path, variable in nnx.to_flat_state(nnx.state(optimizer, nnx.optimizer.OptState)):
        moment = next((m for m in ("mu", "nu") if m in path), None)
        if moment is None:  # step counters
            continue
        param_path = path[path.index(moment) + 1:]
        assert variable.get_value().sharding.spec == params[param_path].spec, path
        checked += 1
    assert checked == 2 * len(params)


def loss_fn(model, batch):
    return mean_batch_loss(model, batch, chunk_size=16)


def make_train_batch(config, rows=4):
    ids, pixels, flags = make_batch(config, batch=rows)
    labels = np.where(np.asarray(ids) == 1000, -100, np.asarray(ids))
    segments = np.ones(ids.shape, np.int32)
    segments[:, -5:] = 0
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(np.int32)
    pixels = np.concatenate([np.asarray(pixels)] * 2)  # 8 tiles: divisible by data × fsdp
    flags = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.int32)
    ids = np.asarray(ids).copy()
    ids[2, 2:2 + config.num_image_token] = 1000  # row 2 takes the fourth real tile
    return dict(input_ids=ids, labels=labels, segment_ids=segments, positions=positions, pixel_values=pixels,
                image_flags=flags)


def test_sharded_forward_backward_equals_single_device(tiny_model, sharded_model, tiny_config, mesh):
    batch = make_train_batch(tiny_config)
    grad_fn = nnx.jit(nnx.value_and_grad(loss_fn))
    loss_single, grads_single = grad_fn(tiny_model, jax.tree.map(jnp.asarray, batch))

    data_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    sharded_batch = jax.device_put(batch, data_sharding)
    with jax.set_mesh(mesh):
        loss_sharded, grads_sharded = grad_fn(sharded_model, sharded_batch)
    np.testing.assert_allclose(loss_sharded, loss_single, atol=1e-5, rtol=0)
    flat_single = dict(nnx.to_flat_state(grads_single))
    for path, grad in nnx.to_flat_state(grads_sharded):
        np.testing.assert_allclose(grad.get_value(), flat_single[path].get_value(), atol=1e-5, rtol=0,
                                   err_msg=str(path))


def test_remat_policies_change_temporary_memory(tiny_model, tiny_config):
    batch = jax.tree.map(jnp.asarray, make_train_batch(tiny_config))
    temp_bytes = {}
    for policy in ("none", "full"):
        model = nnx.merge(nnx.graphdef(abstract_model(dataclasses.replace(tiny_config, remat_policy=policy))),
                          nnx.state(tiny_model))
        graphdef, state = nnx.split(model)

        def grads(state, batch):
            return jax.grad(lambda s: loss_fn(nnx.merge(graphdef, s), batch))(state)
        compiled = jax.jit(grads).lower(state, batch).compile()
        temp_bytes[policy] = compiled.memory_analysis().temp_size_in_bytes
    assert temp_bytes["none"] != temp_bytes["full"], temp_bytes
