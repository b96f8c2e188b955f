"""The jitted train step: optimizer schedule, frozen params, loss reductions, no recompilation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import IMG_CONTEXT_ID
from internvl_jax.config import MeshConfig, load_config
from internvl_jax.sharding import make_mesh, state_shardings
from internvl_jax.train.loss import IGNORE_INDEX
from internvl_jax.train.optimizer import learning_rate_schedule, make_transform, weight_decay_mask
from internvl_jax.train.state import create_train_state
from internvl_jax.train.step import TrainStep, device_batch, stack_micro_batches

SMALL = ["train.max_seq_length=64", "train.global_batch_size=4", "train.total_steps=6", "train.warmup_steps=2",
         "train.save_every_steps=3", "model.llm.num_layers=2", f"model.img_context_token_id={IMG_CONTEXT_ID}"]


def small_config(*overrides):
    return load_config("tiny", SMALL + list(overrides))


class ContractBatches:
    """Deterministic per-process micro-batches of the batch contract, one sample (and tile) per row.

    The position is a global sample index; process p of P takes rows [p·B, (p+1)·B) of each
    global micro-batch. Sample i depends only on i.
    """

    def __init__(self, config, rows, process_index=0, process_count=1):
        self.config, self.rows = config, rows
        self.process_index, self.process_count = process_index, process_count
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        first = self.position + self.process_index * self.rows
        samples = [self.sample(first + i) for i in range(self.rows)]
        self.position += self.rows * self.process_count
        return {k: np.stack([s[k] for s in samples]) if k not in ("pixel_values", "image_flags")
                else np.concatenate([s[k] for s in samples]) for k in samples[0]}

    def sample(self, index):
        rng = np.random.default_rng(index)
        length, tokens = self.config.train.max_seq_length, self.config.model.num_image_token
        used = int(rng.integers(length // 2 + tokens // 2, length + 1))
        ids = rng.integers(3, 900, length).astype(np.int32)
        ids[2:2 + tokens] = IMG_CONTEXT_ID
        answer = 2 + tokens + (used - 2 - tokens) // 2
        labels = np.full(length, IGNORE_INDEX, np.int32)
        labels[answer:used] = ids[answer:used]
        size = self.config.model.vision.image_size
        return dict(input_ids=ids, labels=labels, segment_ids=(np.arange(length) < used).astype(np.int32),
                    positions=np.where(np.arange(length) < used, np.arange(length), 0).astype(np.int32),
                    pixel_values=rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8),
                    image_flags=np.ones(1, np.int32), num_samples=np.ones(1, np.int32))

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def build(config, mesh):
    train_state = create_train_state(config, config.train.total_steps, mesh)
    graphdef, state = nnx.split(train_state)
    schedule = learning_rate_schedule(config.train, config.train.total_steps)
    return graphdef, state, TrainStep(graphdef, config.train, schedule, state_shardings(state, mesh), mesh)


def run_steps(config, mesh, steps):
    graphdef, state, step_fn = build(config, mesh)
    data = ContractBatches(config, config.train.global_batch_size // config.train.grad_accum_steps)
    history = []
    for _ in range(steps):
        batch = device_batch(stack_micro_batches([next(data) for _ in range(config.train.grad_accum_steps)]), mesh)
        state, metrics = step_fn(state, batch)
        history.append(jax.device_get(metrics))
    return graphdef, state, history


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def test_schedule_warmup_then_cosine():
    config = small_config("train.learning_rate=1.0")
    lr = learning_rate_schedule(config.train, 6)  # warmup_steps 2
    np.testing.assert_allclose([lr(i) for i in range(7)], [0, 0.5, 1, 0.5 * (1 + np.cos(np.pi / 4)), 0.5,
                                                          0.5 * (1 + np.cos(3 * np.pi / 4)), 0], atol=1e-6)
    by_ratio = learning_rate_schedule(small_config("train.warmup_steps=0", "train.warmup_ratio=0.03").train, 100)
    assert by_ratio(3) == pytest.approx(1e-3) and by_ratio(2) < by_ratio(3)  # ceil(0.03 × 100) warmup steps


def test_weight_decay_mask(tiny_model):
    assert weight_decay_mask("all") is None  # official: every trainable parameter decays
    params = nnx.state(tiny_model, nnx.Param)
    decayed = {path: flag for path, flag in jax.tree_util.tree_leaves_with_path(weight_decay_mask("no_bias_norm")(params))}
    names = {tuple(getattr(k, "key", getattr(k, "name", None)) for k in path): flag for path, flag in decayed.items()}
    assert names[("mlp1", "fc1", "kernel", "value")] and not names[("mlp1", "fc1", "bias", "value")]
    assert not names[("mlp1", "norm", "scale", "value")]
    assert not any(flag for name, flag in names.items() if "attn_norm" in name)


def test_per_group_learning_rate_multipliers(tiny_model):
    config = small_config("train.lr_multipliers=mlp1=10,vision_model=0", "train.warmup_steps=1",
                          "train.weight_decay=0", "train.max_grad_norm=0")
    transform = make_transform(config.train, 6)
    params = nnx.state(tiny_model, nnx.Param)
    opt_state = transform.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(2):  # the first update has lr 0 (warmup from 0)
        updates, opt_state = transform.update(grads, opt_state, params)
    step = {group: float(jnp.max(jnp.abs(jnp.concatenate([u.ravel() for u in jax.tree.leaves(updates[group])]))))
            for group in ("vision_model", "mlp1", "language_model")}
    assert step["vision_model"] == 0.0 and step["mlp1"] == pytest.approx(10 * step["language_model"], rel=1e-5)
    with pytest.raises(ValueError, match="lr_multipliers.*'encoder=2'"):
        make_transform(small_config("train.lr_multipliers=encoder=2").train, 6)


def test_nonfinite_gradients_skip_the_update():
    from internvl_jax.train.optimizer import make_transform
    tx = make_transform(small_config().train, 6)
    params = {"w": jnp.ones(3)}
    opt_state = tx.init(params)
    updates, opt_state = tx.update({"w": jnp.array([1.0, jnp.nan, 0.0])}, opt_state, params)
    assert not np.any(updates["w"]) and int(opt_state.total_notfinite) == 1


@pytest.fixture(scope="module")
def stage1_run(mesh):
    """Four steps of a stage-1-like recipe (ViT frozen), compilations counted after the first."""
    config = small_config("train.trainable=mlp1,language_model")
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
    graphdef, state, step_fn = build(config, mesh)
    before = jax.device_get(state)
    data = ContractBatches(config, 4)
    history = []
    for i in range(4):
        if i == 1:
            jax.monitoring.register_event_duration_secs_listener(listener)
        batch = device_batch(stack_micro_batches([next(data)]), mesh)
        state, metrics = step_fn(state, batch)
        history.append(jax.device_get(metrics))
    jax.block_until_ready(state)
    jax.monitoring.unregister_event_duration_listener(listener)
    return config, before, state, history, compiles


def test_no_recompilation_after_first_step(stage1_run):
    *_, history, compiles = stage1_run
    assert compiles == []
    assert len({float(h["supervised_fraction"]) for h in history}) == len(history)  # the data did vary


def test_frozen_params_unchanged_and_without_optimizer_state(stage1_run):
    config, before, after, history, _ = stage1_run
    flat_before, flat_after = dict(nnx.to_flat_state(before)), dict(nnx.to_flat_state(after))
    vision = [p for p in flat_after if p[:2] == ("model", "vision_model")]
    assert vision and all(np.array_equal(flat_before[p].get_value(), flat_after[p].get_value()) for p in vision)
    assert all(flat_after[p].get_value().dtype == jnp.bfloat16 for p in vision if "rng" not in str(p))
    changed = [p for p in flat_after if p[:2] == ("model", "mlp1")
               and not np.array_equal(flat_before[p].get_value(), flat_after[p].get_value())]
    assert changed and all(flat_after[p].get_value().dtype == jnp.float32 for p in changed)
    opt_paths = [p for p in flat_after if p[0] == "optimizer"]
    assert opt_paths and not any("vision_model" in p for p in opt_paths)
    assert int(flat_after[("optimizer", "step")].get_value()) == 4
    schedule = learning_rate_schedule(config.train, config.train.total_steps)
    np.testing.assert_allclose([h["lr"] for h in history], [schedule(i) for i in range(4)], rtol=1e-6)
    assert all(h["finite"] and h["skipped_updates"] == 0 and 0 < h["supervised_fraction"] < 1 for h in history)


def test_global_token_mean_is_independent_of_accumulation(mesh):
    """Same 4 rows as one micro-batch or two: same loss and update under global_token_mean;
    micro_batch_token_mean with 2-row groups averages two group means instead."""
    results = {}
    for name, overrides in {"ga1": [], "ga2": ["train.grad_accum_steps=2"],
                            "groups": ["train.loss_reduction=micro_batch_token_mean", "train.loss_group_rows=2"]}.items():
        reduction = [] if name == "groups" else ["train.loss_reduction=global_token_mean"]
        config = small_config("train.trainable=mlp1", *reduction, *overrides)
        _, state, history = run_steps(config, mesh, 1)
        results[name] = (float(history[0]["loss"]), state)
    np.testing.assert_allclose(results["ga2"][0], results["ga1"][0], rtol=1e-5)
    kernel = lambda s: np.asarray(dict(nnx.to_flat_state(s))[("model", "mlp1", "fc1", "kernel")].get_value())
    np.testing.assert_allclose(kernel(results["ga2"][1]), kernel(results["ga1"][1]), atol=1e-6)
    assert abs(results["groups"][0] - results["ga1"][0]) > 1e-4


def test_mfu_pass_multipliers_follow_the_gradient_path():
    from internvl_jax.train.flops import pass_multipliers, step_flops
    multipliers = lambda *o: tuple(pass_multipliers(small_config(*o)).values())
    assert multipliers("train.trainable=vision_model,mlp1") == (3, 3, 2)  # stage 1: LLM passes input grads
    assert multipliers("train.trainable=mlp1") == (1, 3, 2)  # 4B stage 1: the ViT is forward-only
    assert multipliers("train.trainable=mlp1,language_model") == (1, 3, 3)  # 2nd finetune
    assert multipliers("train.trainable=language_model", "model.lora.rank=16") == (1, 1, 2)  # LoRA
    batch = next(ContractBatches(small_config(), 4))
    packed = np.concatenate([np.ones((1, 32), np.int32), 2 * np.ones((1, 32), np.int32)], axis=1)
    single = np.ones((1, 64), np.int32)
    flags = np.zeros(1, np.int32)
    assert step_flops(small_config(), packed, flags) < step_flops(small_config(), single, flags)  # attention ∝ Σ L²
    assert step_flops(small_config(), batch["segment_ids"], batch["image_flags"]) > 0
