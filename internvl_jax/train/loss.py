"""Next-token cross-entropy over supervised tokens, computed in chunks of the sequence.

The full [tokens × vocab] logits never exist at once: each chunk's logits are computed,
reduced and (under remat) recomputed in the backward pass.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def next_token_targets(labels: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """targets[t] = labels[t + 1] within the same segment, else IGNORE_INDEX. [B, T] -> [B, T]."""
    shifted = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    next_segment = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    same = (next_segment == segment_ids) & (segment_ids != 0)
    return jnp.where(same, shifted, IGNORE_INDEX)


def chunked_cross_entropy(hidden: jax.Array, targets: jax.Array, logits_fn: Callable[[jax.Array], jax.Array],
                          chunk_size: int = 1024) -> tuple[jax.Array, jax.Array]:
    """Sum of token losses and the number of supervised tokens (scalars); see `chunked_row_losses`."""
    row_loss, row_count = chunked_row_losses(hidden, targets, logits_fn, chunk_size)
    return jnp.sum(row_loss), jnp.sum(row_count)


def chunked_row_losses(hidden: jax.Array, targets: jax.Array, logits_fn: Callable[[jax.Array], jax.Array],
                       chunk_size: int = 1024) -> tuple[jax.Array, jax.Array]:
    """Per-row sums of token losses [B] float32 and supervised-token counts [B] int32.

    hidden [B, T, D]; targets [B, T] int (IGNORE_INDEX = unsupervised); logits_fn maps
    [B, c, D] -> float32 logits [B, c, V]. T is padded up to a multiple of the chunk size.
    Rows are kept apart so callers can form any token-mean reduction (per micro-batch, per group).
    """
    b, t, d = hidden.shape
    chunk = min(chunk_size, t)
    pad = -t % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    chunks = (t + pad) // chunk
    hidden = hidden.reshape(b, chunks, chunk, d).swapaxes(0, 1)
    targets = targets.reshape(b, chunks, chunk).swapaxes(0, 1)

    def chunk_loss(h, y):
        logits = logits_fn(h)
        valid = y != IGNORE_INDEX
        log_z = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, jnp.where(valid, y, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid, log_z - picked, 0.0), axis=1), jnp.sum(valid, axis=1, dtype=jnp.int32)

    if chunks > 1:
        # Recompute each chunk's logits in the backward pass, so only one chunk's exist at a time.
        # With a single chunk the backward follows the forward at once: remat would only add a
        # second head matmul without lowering the peak.
        chunk_loss = jax.checkpoint(chunk_loss)

    def body(carry, inputs):
        loss, count = chunk_loss(*inputs)
        return (carry[0] + loss, carry[1] + count), None

    (total, count), _ = jax.lax.scan(body, (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32)),
                                     (hidden, targets))
    return total, count


def mean_batch_loss(model, batch: dict, chunk_size: int = 1024) -> jax.Array:
    """Token-mean next-token loss of one batch (the batch contract's fields), for benchmarks and checks."""
    hidden = model(batch["input_ids"], batch["pixel_values"], batch["image_flags"], batch["segment_ids"],
                   batch["positions"], return_hidden=True)
    targets = next_token_targets(batch["labels"], batch["segment_ids"])
    total, count = chunked_cross_entropy(hidden, targets, model.language_model.logits, chunk_size=chunk_size)
    return total / jnp.maximum(count, 1)
