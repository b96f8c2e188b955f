"""One attention API, three backends: XLA reference, TPU splash (Pallas), GPU cuDNN.

Shapes: q [B, T, KV, G, hd] (query head h = kv·G + g, i.e. repeat-interleave GQA), k and v
[B, S, KV, hd]. Segment ids [B, T] / [B, S] int32: tokens attend only within their segment, and
segment 0 marks padding (or empty cache slots) that nobody attends to; None for both means one
segment of real tokens (the ViT's tiles), so nothing but causality is masked. With `causal`,
query t sits at slot `q_offset + t` and sees kv slots ≤ its own.
`cached_attention` reads a KV cache stored head-major, [B, KV, S, hd].
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from internvl_jax.sharding import logical_to_spec

BACKENDS = ("auto", "xla", "splash", "cudnn")
SPLASH_BLOCK = 128
# Query block of the XLA path's causal self-attention: block i computes scores only against the
# keys up to its own end, so the products skip most of the masked upper triangle.
CAUSAL_BLOCK = 128


def resolve_backend(backend: str) -> str:
    """`auto` picks splash on TPU, cuDNN on GPU and the XLA reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend '{backend}' is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    platform = jax.devices()[0].platform
    return {"tpu": "splash", "gpu": "cudnn"}.get(platform, "xla")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None, causal: bool, q_offset: jax.Array | int = 0,
              backend: str = "xla", interpret: bool = False) -> jax.Array:
    """Scaled dot-product attention; returns [B, T, KV, G, hd] in v's dtype."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    backend = resolve_backend(backend)
    if backend == "splash" and q.shape[1] == k.shape[1] and isinstance(q_offset, int) and q_offset == 0:
        if q_segment_ids is None:
            q_segment_ids = kv_segment_ids = jnp.ones(q.shape[:2], jnp.int32)
        return _splash(q, k, v, q_segment_ids, kv_segment_ids, causal, interpret)
    if backend == "cudnn":
        return _cudnn(q, k, v, q_segment_ids, kv_segment_ids, causal, q_offset)
    return _xla(q, k, v, q_segment_ids, kv_segment_ids, causal, q_offset)


def attention_mask(q_segment_ids, kv_segment_ids, causal, q_offset, q_length: int = 0,
                   kv_length: int = 0) -> jax.Array | None:
    """Boolean [B, T, S] (or [1, T, S]): same non-zero segment, and (causal) kv slot ≤ query slot.

    Without segment ids only the causal part, over `q_length` × `kv_length`; None if nothing is masked.
    """
    mask = None
    if q_segment_ids is not None:
        mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
        q_length, kv_length = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    if causal:
        q_slots = q_offset + jnp.arange(q_length)
        visible = jnp.arange(kv_length)[None, None, :] <= q_slots[None, :, None]
        mask = visible if mask is None else mask & visible
    return mask


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array, q_offset: jax.Array | int) -> jax.Array:
    """Causal attention of T new queries over a head-major KV cache (XLA on every platform).

    q [B, T, KV, G, hd] at slots q_offset..q_offset+T-1; k_cache, v_cache [B, KV, S, hd] with the
    new keys/values already written; kv_segment_ids [B, S]. Returns [B, T, KV, G, hd].
    """
    return _xla_heads(q, k_cache, v_cache, q_segment_ids, kv_segment_ids, True, q_offset)


def _xla(q, k, v, q_segment_ids, kv_segment_ids, causal, q_offset):
    # Head-major operands make both products plain batched matmuls (≈2× faster on CPU).
    k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, hd]
    t = q.shape[1]
    blocked = (causal and isinstance(q_offset, int) and q_offset == 0 and t == k.shape[1] and t > CAUSAL_BLOCK
               and q.dtype == jnp.float32)
    if not blocked:
        return _xla_heads(q, k_heads, v_heads, q_segment_ids, kv_segment_ids, causal, q_offset)
    # Causal self-attention in query blocks: (n+1)/2n of the square instead of all of it
    # (5/8 at 4 blocks), forward and backward; ≈1.7× faster on CPU at 512 tokens. float32 only:
    # in bf16, XLA keeps excess precision in different places once the graph changes shape, and
    # the parity tests pin the unblocked form's rounding.
    outputs = []
    for start in range(0, t, CAUSAL_BLOCK):
        end = min(start + CAUSAL_BLOCK, t)
        q_seg, kv_seg = ((None, None) if q_segment_ids is None
                         else (q_segment_ids[:, start:end], kv_segment_ids[:, :end]))
        outputs.append(_xla_heads(q[:, start:end], k_heads[:, :, :end], v_heads[:, :, :end], q_seg, kv_seg,
                                  True, start))
    return jnp.concatenate(outputs, axis=1)


def _xla_heads(q, k_heads, v_heads, q_segment_ids, kv_segment_ids, causal, q_offset):
    """The XLA reference with k_heads, v_heads [B, KV, S, hd]; returns [B, T, KV, G, hd]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    q_heads = q.transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, hd]
    scores = jnp.einsum("bkgtd,bksd->bkgts", q_heads, k_heads, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_segment_ids, kv_segment_ids, causal, q_offset, q.shape[1], k_heads.shape[2])
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_heads.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v_heads).transpose(0, 3, 1, 2, 4)


def _cudnn(q, k, v, q_segment_ids, kv_segment_ids, causal, q_offset):
    """cuDNN's fused flash attention; the XLA reference where cuDNN cannot run it.

    `jax.nn.dot_product_attention` without `implementation` runs XLA's unfused attention (it
    materialises the [B, H, T, S] probabilities), so cuDNN is asked for by name. Causality goes
    to the kernel as its mask type (it skips the blocks above the diagonal); only segment
    structure, when there is any, travels as a mask (cuDNN takes it as an additive bias). A
    q_offset (cached decoding) is folded into that mask instead. Off GPU, in float32, or for
    shapes the flash kernel does not cover (jax raises while tracing) the XLA path runs.
    """
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return _xla(q, k, v, q_segment_ids, kv_segment_ids, causal, q_offset)
    b, t, kv, g, hd = q.shape
    kernel_causal = causal and isinstance(q_offset, int) and q_offset == 0
    mask = attention_mask(q_segment_ids, kv_segment_ids, causal and not kernel_causal, q_offset, t, k.shape[1])
    try:
        out = jax.nn.dot_product_attention(q.reshape(b, t, kv * g, hd), k, v,
                                           mask=None if mask is None else mask[:, None],
                                           is_causal=kernel_causal, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError):
        return _xla(q, k, v, q_segment_ids, kv_segment_ids, causal, q_offset)
    return out.reshape(b, t, kv, g, hd)


def _splash(q, k, v, q_segment_ids, kv_segment_ids, causal, interpret):
    """Splash attention per (example, kv head) as MQA over the G query heads of the group.

    Sequences are padded to a multiple of the block size with segment 0; q is pre-scaled since
    the kernel applies no scale. Under a mesh, runs per shard (batch on data/fsdp, kv heads on
    tensor) through shard_map.
    """
    mesh = jax.sharding.get_abstract_mesh()
    kernel_fn = functools.partial(_splash_local, causal=causal, interpret=interpret)
    if mesh.empty:
        return kernel_fn(q, k, v, q_segment_ids, kv_segment_ids)
    q_spec = logical_to_spec(("act_batch", None, "act_kv_heads", None, None), q.shape, mesh)
    kv_spec = P(q_spec[0], None, q_spec[2], None)
    seg_spec = P(q_spec[0], None)
    return jax.shard_map(kernel_fn, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


def _splash_local(q, k, v, q_segment_ids, kv_segment_ids, *, causal, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, kv, g, hd = q.shape
    padded = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    pad = padded - t
    q = jnp.pad(q * (1.0 / math.sqrt(hd)), ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_seg = jnp.pad(q_segment_ids, ((0, 0), (0, pad)))
    kv_seg = jnp.pad(kv_segment_ids, ((0, 0), (0, pad)))
    head_mask = sm.CausalMask((padded, padded)) if causal else sm.FullMask((padded, padded))
    block = sk.BlockSizes(block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK, block_kv_compute=SPLASH_BLOCK,
                          block_q_dkv=SPLASH_BLOCK, block_kv_dkv=SPLASH_BLOCK,
                          block_kv_dkv_compute=SPLASH_BLOCK, block_q_dq=SPLASH_BLOCK,
                          block_kv_dq=SPLASH_BLOCK)
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([head_mask] * g), block_sizes=block,
                                              interpret=interpret)

    def one_group(q_g, k_g, v_g, segments):  # q_g [G, T, hd], k_g/v_g [T, hd]
        return kernel(q_g, k_g, v_g, segment_ids=segments)

    def one_example(q_b, k_b, v_b, q_seg_b, kv_seg_b):  # q_b [T, KV, G, hd]
        segments = sk.SegmentIds(q=q_seg_b, kv=kv_seg_b)
        per_group = jax.vmap(one_group, in_axes=(0, 0, 0, None))
        out = per_group(q_b.transpose(1, 2, 0, 3), k_b.transpose(1, 0, 2), v_b.transpose(1, 0, 2), segments)
        return out.transpose(2, 0, 1, 3)  # [T, KV, G, hd]

    out = jax.vmap(one_example)(q, k, v, q_seg, kv_seg)
    return out[:, :t].astype(v.dtype)

