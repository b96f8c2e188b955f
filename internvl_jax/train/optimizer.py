"""AdamW with linear warmup + cosine decay, global-norm clipping and skip-on-non-finite (spec §10.3).

The official recipes use DeepSpeed AdamW through the HF Trainer: betas (0.9, 0.999), eps 1e-8,
`max_grad_norm` 1.0, `get_cosine_schedule_with_warmup` (lr 0 at the first update, peak after the
warmup, 0 at the last step) and one parameter group, so weight decay applies to every trainable
parameter. `train.lr_multipliers` adds per-group learning rates (e.g. a faster projector), which
the official recipes leave at 1. Optimizer state exists only for trainable parameters (`nnx.Optimizer(..., wrt=...)`).
"""
from __future__ import annotations

import math

import jax
import optax
from flax import nnx

from internvl_jax.config import TrainConfig

# Leaf or module names excluded from weight decay by the `no_bias_norm` mask (HF's default rule).
_NO_DECAY_LEAVES = ("bias", "scale")
_NORM_MARKER = "norm"
# Top-level modules of the chat model: the groups that `train.lr_multipliers` address.
PARAM_GROUPS = ("vision_model", "mlp1", "language_model")
# Consecutive skipped updates tolerated before apply_if_finite would apply one anyway: never.
_NEVER = 2 ** 31 - 1


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """`warmup_steps` when set, else ceil(warmup_ratio × total) as HF's `get_warmup_steps`."""
    return train.warmup_steps if train.warmup_steps > 0 else math.ceil(train.warmup_ratio * total_steps)


def learning_rate_schedule(train: TrainConfig, total_steps: int) -> optax.Schedule:
    """lr(count) for count = number of updates already applied: 0 → peak linearly, then cosine → 0."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup = min(warmup_steps(train, total_steps), total_steps - 1)  # optax needs ≥ 1 cosine step
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=train.learning_rate,
                                              warmup_steps=warmup, decay_steps=total_steps, end_value=0.0)


def _key_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def weight_decay_mask(kind: str):
    """None (decay everything) for `all`; for `no_bias_norm`, a path-based mask callable.

    Paths, not ranks, decide: scanned layers stack norm scales into rank-2 arrays.
    """
    if kind == "all":
        return None
    if kind != "no_bias_norm":
        raise ValueError(f"unknown weight_decay_mask '{kind}'; known: all, no_bias_norm")

    def decayed(path, _) -> bool:
        names = [_key_name(k) for k in path]
        names = [n for n in names if n != "value"]  # Variables flatten to a `value` child
        return not (names and names[-1] in _NO_DECAY_LEAVES) and not any(_NORM_MARKER in n for n in names)

    return lambda params: jax.tree_util.tree_map_with_path(decayed, params)


def lr_multipliers(train: TrainConfig) -> dict[str, float]:
    """{module group: factor} from `train.lr_multipliers` entries such as `mlp1=10`."""
    factors = {}
    for entry in train.lr_multipliers:
        group, sep, value = entry.partition("=")
        if not sep or group not in PARAM_GROUPS:
            raise ValueError(f"train.lr_multipliers: expected GROUP=FACTOR with GROUP one of {PARAM_GROUPS}, "
                             f"got {entry!r}")
        try:
            factors[group] = float(value)
        except ValueError:
            raise ValueError(f"train.lr_multipliers: {entry!r}: {value!r} is not a number") from None
    return factors


def group_scaling(factors: dict[str, float]) -> optax.GradientTransformation:
    """Scales each module group's updates by its factor: a per-group learning rate (weight decay
    included, as it is proportional to the lr in AdamW)."""
    if not factors:
        return optax.identity()

    def labels(updates):
        return jax.tree_util.tree_map_with_path(lambda path, _: _key_name(path[0]), updates)

    return optax.multi_transform({group: optax.scale(factors.get(group, 1.0)) for group in PARAM_GROUPS}, labels)


def make_transform(train: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """clip → AdamW(schedule) → per-group lr factors, wrapped so a non-finite gradient skips the whole update.

    apply_if_finite keeps the inner state untouched on a skipped step and counts it
    (`total_notfinite`); the `raise` policy is enforced by the loop on the reported metric.
    """
    if train.nonfinite_policy not in ("skip", "raise"):
        raise ValueError(f"unknown nonfinite_policy '{train.nonfinite_policy}'; known: skip, raise")
    inner = optax.chain(
        optax.clip_by_global_norm(train.max_grad_norm) if train.max_grad_norm > 0 else optax.identity(),
        optax.adamw(learning_rate_schedule(train, total_steps), b1=train.adam_b1, b2=train.adam_b2,
                    eps=train.adam_eps, weight_decay=train.weight_decay,
                    mask=weight_decay_mask(train.weight_decay_mask)),
        group_scaling(lr_multipliers(train)),
    )
    return optax.apply_if_finite(inner, max_consecutive_errors=_NEVER)


def make_optimizer(model: nnx.Module, train: TrainConfig, total_steps: int,
                   wrt: nnx.filterlib.Filter) -> nnx.Optimizer:
    """An optimizer holding moments only for the parameters matched by `wrt`."""
    return nnx.Optimizer(model, make_transform(train, total_steps), wrt=wrt)


def skipped_updates(optimizer: nnx.Optimizer) -> jax.Array:
    """Number of updates skipped so far because gradients were not finite (scalar int32)."""
    return optimizer.opt_state.total_notfinite[...]
