"""Rotary position embedding (rotate-half), with InternLM2 dynamic NTK and Phi-3 LongRoPE ("su").

The reference decides the scaling per forward call over the whole batch, and its dynamic-NTK
base stays changed afterwards. Here the decision is per token from the length of the sequence
(packed segment) it belongs to: `segment_lengths` [B, T] = 1 + the largest position in the
token's segment (the full forward), or 1 + the token's own position (one decode step, where the
cached keys keep the tables they were computed with, as in the reference).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import LLMConfig


def _base_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """theta^(-2k/hd), k = 0..hd/2-1, float32 as the reference computes it."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def segment_lengths(positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, T] -> [B, T]: 1 + the max position over each token's segment."""
    num_segments = positions.shape[1] + 1

    def per_row(pos_row, seg_row):
        max_pos = jax.ops.segment_max(pos_row, seg_row, num_segments=num_segments)
        return max_pos[seg_row] + 1

    return jax.vmap(per_row)(positions, segment_ids)


def rope_tables(positions: jax.Array, lengths: jax.Array, config: LLMConfig,
                dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, hd] for int positions [B, T] and sequence lengths [B, T]."""
    rope = config.rope
    head_dim = config.resolved_head_dim
    inv_freq = jnp.asarray(_base_inv_freq(rope.theta, head_dim))  # [hd/2]
    pos = positions.astype(jnp.float32)[..., None]  # [B, T, 1]
    multiplier = 1.0
    if rope.scaling in ("none", "default"):
        angles = pos * inv_freq
    elif rope.scaling == "linear":
        angles = (pos / rope.factor) * inv_freq
    elif rope.scaling == "dynamic":
        max_pos = config.max_position_embeddings
        length = lengths.astype(jnp.float32)[..., None]
        ntk_base = rope.theta * ((rope.factor * length / max_pos) - (rope.factor - 1)) ** (
            head_dim / (head_dim - 2))
        exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
        scaled = 1.0 / (ntk_base ** exponents)  # [B, T, hd/2]
        angles = pos * jnp.where(length > max_pos, scaled, inv_freq)
    elif rope.scaling in ("su", "longrope"):
        original = rope.original_max_position_embeddings
        short = jnp.asarray(rope.short_factor, jnp.float32)
        long = jnp.asarray(rope.long_factor, jnp.float32)
        exponents = jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim
        base_pow = jnp.float32(rope.theta) ** exponents
        use_long = (lengths > original)[..., None]
        inv = 1.0 / (jnp.where(use_long, long, short) * base_pow)
        angles = pos * inv
        scale = config.max_position_embeddings / original
        if scale > 1.0:
            multiplier = math.sqrt(1 + math.log(scale) / math.log(original))
    else:
        raise ValueError(f"unknown rope scaling '{rope.scaling}'")
    emb = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(emb) * multiplier, jnp.sin(emb) * multiplier
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, ..., hd] with cos/sin [B, T, hd]: x·cos + rotate_half(x)·sin."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
