"""Checkpoints: round trip onto another mesh, refusal on changed data settings, keep policy."""
import jax
import numpy as np
import pytest
from flax import nnx

from internvl_jax.config import MeshConfig
from internvl_jax.sharding import make_mesh
from internvl_jax.train.checkpoint import Checkpointer, IncompatibleCheckpoint
from internvl_jax.train.state import abstract_train_state
from test_train_step import run_steps, small_config

STAGE1 = "train.trainable=mlp1,language_model"


@pytest.fixture(scope="module")
def trained():
    """(config, state) after one step on a (2, 2, 2) mesh: moments and step are non-trivial."""
    config = small_config(STAGE1)
    _, state, _ = run_steps(config, make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), 1)
    return config, state


def test_round_trip_onto_another_mesh(tmp_path, trained):
    config, state = trained
    checkpointer = Checkpointer(tmp_path, config)
    checkpointer.save(1, state, {"position": 4})
    checkpointer.wait()
    other = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    _, target = abstract_train_state(config, config.train.total_steps, other)
    restored, data_state = checkpointer.restore(checkpointer.latest_step(), target)
    checkpointer.close()
    assert data_state == {"position": 4}
    saved, targets = dict(nnx.to_flat_state(state)), dict(nnx.to_flat_state(target))
    flat = dict(nnx.to_flat_state(restored))
    assert flat.keys() == saved.keys()
    for path, variable in flat.items():
        value = variable.get_value()
        np.testing.assert_array_equal(jax.device_get(value), jax.device_get(saved[path].get_value()), err_msg=str(path))
        assert value.sharding == targets[path].get_value().sharding, path


def test_resume_refuses_changed_batch_settings(tmp_path, trained):
    config, state = trained
    checkpointer = Checkpointer(tmp_path, config)
    checkpointer.save(1, state, {"position": 4})
    checkpointer.close()
    changed = small_config(STAGE1, "train.global_batch_size=8")
    _, target = abstract_train_state(changed, changed.train.total_steps, make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    with pytest.raises(IncompatibleCheckpoint, match="'train.global_batch_size' was 4 .* is 8"):
        Checkpointer(tmp_path, changed).restore(1, target)


def test_keep_last_and_keep_every(tmp_path, trained):
    config = small_config(STAGE1, "train.keep_last=2", "train.keep_every=3", "train.save_every_steps=2")
    _, state = trained
    checkpointer = Checkpointer(tmp_path, config)
    assert [step for step in range(1, 8) if checkpointer.due(step)] == [2, 4, 6]
    for step in range(1, 8):
        checkpointer.save(step, state, {"position": 4 * step})
    checkpointer.close()
    assert Checkpointer(tmp_path, config).all_steps() == [3, 6, 7]
