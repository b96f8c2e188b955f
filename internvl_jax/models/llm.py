"""One decoder-only LLM for InternLM2, Phi-3, Qwen2 and Llama (spec §5–§6).

Families differ only in options (qkv bias, rope scaling, tied head) and in checkpoint names,
which the converter handles. Attention weights use the grouped layout of InternLM2's `wqkv`:
qkv kernel [D, KV, G+2, hd] where, per kv head, slots 0..G-1 are its query heads, G the key and
G+1 the value. Sharding kv heads over `tensor` keeps each GQA group on one shard.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from internvl_jax.config import LLMConfig, LoraConfig
from internvl_jax.models import attention as attention_lib
from internvl_jax.models.layers import Dense, RMSNorm, make_param, normal
from internvl_jax.models.rope import apply_rope, rope_tables, segment_lengths
from internvl_jax.models.stack import run_stack
from internvl_jax.sharding import constrain

ACT_AXES = ("act_batch", "act_length", "act_embed")


class KVCache(NamedTuple):
    """Keys and values, one [B, KV, S, hd] array per layer; slot segment ids [B, S] (0 = empty); next slot [].

    One array per layer (not a [L, ...] stack) lets a decode step update each in place and read it
    whole: XLA:CPU copies any slice of a stack that feeds a matmul. Head-major, so the attention
    reads each head's keys as one contiguous [S, hd] matrix.
    """
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, config: LLMConfig, batch: int, max_length: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, config.num_kv_heads, max_length, config.resolved_head_dim)
        layers = range(config.num_layers)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers),
                   jnp.zeros((batch, max_length), jnp.int32), jnp.zeros((), jnp.int32))


class DecoderBlock(nnx.Module):
    def __init__(self, config: LLMConfig, lora: LoraConfig, *, rngs: nnx.Rngs, stack=()):
        d, kv, hd = config.hidden_size, config.num_kv_heads, config.resolved_head_dim
        if config.num_heads % kv:
            raise ValueError(f"num_heads {config.num_heads} is not a multiple of num_kv_heads {kv}")
        self.group = config.num_heads // kv

        def lora_kwargs(name):
            if lora.rank and name in lora.targets:
                return dict(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout)
            return {}

        self.attn_norm = RMSNorm((d,), ("norm",), rngs=rngs, eps=config.rms_norm_eps, stack=stack)
        self.qkv = Dense((d,), (kv, self.group + 2, hd), ("embed",), ("kv_heads", "q_per_kv", "head_dim"),
                         rngs=rngs, use_bias=config.qkv_bias, stack=stack, **lora_kwargs("qkv"))
        self.o = Dense((kv, self.group, hd), (d,), ("kv_heads", "q_per_kv", "head_dim"), ("embed",),
                       rngs=rngs, use_bias=False, stack=stack, **lora_kwargs("o"))
        self.mlp_norm = RMSNorm((d,), ("norm",), rngs=rngs, eps=config.rms_norm_eps, stack=stack)
        self.gate = Dense((d,), (config.intermediate_size,), ("embed",), ("mlp",), rngs=rngs, use_bias=False,
                          stack=stack, **lora_kwargs("gate"))
        self.up = Dense((d,), (config.intermediate_size,), ("embed",), ("mlp",), rngs=rngs, use_bias=False,
                        stack=stack, **lora_kwargs("up"))
        self.down = Dense((config.intermediate_size,), (d,), ("mlp",), ("embed",), rngs=rngs, use_bias=False,
                          stack=stack, **lora_kwargs("down"))

    def __call__(self, x, cos, sin, segment_ids, layer_cache, cache_segment_ids, cache_index, key, backend):
        """x [B, T, D]; layer_cache None or (k, v) [B, KV, S, hd]. Returns (x, new layer cache)."""
        keys = jax.random.split(key, 5) if key is not None else [None] * 5
        qkv = self.qkv(self.attn_norm(x), dropout_key=keys[0])  # [B, T, KV, G+2, hd]
        q = apply_rope(qkv[..., :self.group, :], cos, sin)
        k = apply_rope(qkv[..., self.group, :], cos, sin)
        v = qkv[..., self.group + 1, :]
        if layer_cache is None:
            out = attention_lib.attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                          causal=True, backend=backend)
            new_cache = None
        else:
            cache_k, cache_v = layer_cache
            # The cache has the compute dtype (init_cache): no cast of the whole cache per step.
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3), (0, 0, cache_index, 0))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3), (0, 0, cache_index, 0))
            out = attention_lib.cached_attention(q, cache_k, cache_v, q_segment_ids=segment_ids,
                                                 kv_segment_ids=cache_segment_ids, q_offset=cache_index)
            new_cache = (cache_k, cache_v)
        x = constrain(x + self.o(out, dropout_key=keys[1]), ACT_AXES)
        h = self.mlp_norm(x)
        h = jax.nn.silu(self.gate(h, dropout_key=keys[2])) * self.up(h, dropout_key=keys[3])
        x = x + self.down(h, dropout_key=keys[4])
        return constrain(x, ACT_AXES), new_cache


class LanguageModel(nnx.Module):
    def __init__(self, config: LLMConfig, lora: LoraConfig = LoraConfig(), *, rngs: nnx.Rngs,
                 scan_layers: bool = True, remat_policy: str = "none", attention: str = "auto",
                 dtype=jnp.float32):
        self.config = config
        self.scan_layers, self.remat_policy, self.attention, self.dtype = scan_layers, remat_policy, attention, dtype
        vocab, d = config.padded_vocab_size, config.hidden_size
        self.embed = make_param(rngs, normal(0.02), (vocab, d), ("vocab", "embed"),
                                unpadded_shape=(config.vocab_size, d))
        self.layers = DecoderBlock(config, lora, rngs=rngs, stack=(config.num_layers,))
        self.norm = RMSNorm((d,), ("norm",), rngs=rngs, eps=config.rms_norm_eps)
        self.lm_head = (None if config.tie_word_embeddings else
                        Dense((d,), (vocab,), ("embed",), ("vocab",), rngs=rngs, use_bias=False,
                              unpadded_out_shape=(config.vocab_size,)))

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] int -> [B, T, D] in the compute dtype."""
        return jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)

    def layer_blocks(self) -> list[DecoderBlock]:
        """The stacked layers as one block per layer, each holding its slice of the parameters."""
        graphdef, state = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(self.config.num_layers)]

    def __call__(self, embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: KVCache | None = None, key: jax.Array | None = None,
                 blocks: list[DecoderBlock] | None = None):
        """embeds [B, T, D], positions/segment_ids [B, T] -> (final hidden [B, T, D], cache).

        With a cache, `blocks` (from `layer_blocks`, e.g. sliced once outside a decode loop) run
        the layers unrolled; without them the layers follow `scan_layers`.
        """
        config = self.config
        lengths = segment_lengths(positions, segment_ids)
        cos, sin = rope_tables(positions, lengths, config, self.dtype)
        backend = attention_lib.resolve_backend(self.attention)
        x = constrain(embeds.astype(self.dtype), ACT_AXES)
        layer_keys = jax.random.split(key, config.num_layers) if key is not None else None
        if cache is None:
            def body(block, carry, layer_key):
                out, _ = block(carry, cos, sin, segment_ids, None, None, 0, layer_key, backend)
                return out, None
            x, _ = run_stack(self.layers, x, layer_keys, body, scan=self.scan_layers,
                             remat_policy=self.remat_policy)
            new_cache = None
        else:
            cache_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache.index))

            def layer(block, carry, layer_k, layer_v, layer_key):
                return block(carry, cos, sin, segment_ids, (layer_k, layer_v), cache_segments, cache.index,
                             layer_key, backend)

            if blocks is None and self.scan_layers:
                # The scan takes and returns the cache stacked: one copy each way per call.
                x, (new_k, new_v) = run_stack(self.layers, x, (jnp.stack(cache.k), jnp.stack(cache.v), layer_keys),
                                              lambda block, carry, per_layer: layer(block, carry, *per_layer),
                                              scan=True, remat_policy="none")
            else:
                new_k, new_v = [], []
                for i, block in enumerate(blocks or self.layer_blocks()):
                    x, (k, v) = layer(block, x, cache.k[i], cache.v[i], None if key is None else layer_keys[i])
                    new_k.append(k)
                    new_v.append(v)
            new_cache = KVCache(tuple(new_k), tuple(new_v), cache_segments, cache.index + embeds.shape[1])
        return self.norm(x), new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., D] -> float32 logits [..., padded vocab]; padded rows get the float32 minimum."""
        if self.lm_head is None:
            logits = jnp.einsum("...d,vd->...v", hidden, self.embed[...].astype(hidden.dtype))
        else:
            logits = self.lm_head(hidden)
        logits = logits.astype(jnp.float32)
        if self.config.padded_vocab_size != self.config.vocab_size:
            real = jnp.arange(logits.shape[-1]) < self.config.vocab_size
            logits = jnp.where(real, logits, jnp.finfo(jnp.float32).min)
        if logits.ndim == 3:
            logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
        return logits
