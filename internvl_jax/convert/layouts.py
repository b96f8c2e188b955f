"""Checkpoint layouts: how each parameter of ours maps to tensors of an HF checkpoint.

Two layouts are known: `official` (the InternVL remote-code names: `vision_model.*`, `mlp1.*`,
`language_model.*` with InternLM2's grouped `wqkv`, Phi-3's fused `qkv_proj`/`gate_up_proj`, or
Llama/Qwen2's separate projections) and `hf` (transformers' native
`InternVLForConditionalGeneration` on-disk names, spec toolchain §7). A `TensorMap` converts in
both directions, one layer at a time, in logical (unpadded) shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from internvl_jax.config import ModelConfig

LAYOUTS = ("official", "hf")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """Our parameters at `paths` <-> checkpoint tensors `keys` ('{i}' = layer index when stacked).

    `to_ours(*tensors)` returns one array per path (a bare array for one path);
    `to_checkpoint(*arrays)` returns one tensor per key.
    """
    paths: tuple[tuple[str, ...], ...]
    keys: tuple[str, ...]
    to_ours: Callable[..., np.ndarray | tuple[np.ndarray, ...]]
    to_checkpoint: Callable[..., tuple[np.ndarray, ...]]
    num_layers: int = 0

    def layer_keys(self, layer: int | None) -> tuple[str, ...]:
        return tuple(k.format(i=layer) for k in self.keys)


def _identity_map(path, key, num_layers=0):
    return TensorMap((path,), (key,), lambda x: x, lambda x: (x,), num_layers)


def _linear_map(path, key, in_shape, out_shape, num_layers=0):
    """torch Linear weight [out, in] <-> our kernel [*in_shape, *out_shape]."""
    def to_ours(w):
        return w.T.reshape(tuple(in_shape) + tuple(out_shape))

    def to_checkpoint(kernel):
        return (np.ascontiguousarray(kernel.reshape(int(np.prod(in_shape)), -1).T),)
    return TensorMap((path,), (key,), to_ours, to_checkpoint, num_layers)


def _reshape_map(path, key, ours_shape, checkpoint_shape, num_layers=0):
    return TensorMap((path,), (key,), lambda x: x.reshape(ours_shape),
                     lambda x: (x.reshape(checkpoint_shape),), num_layers)


def _split_rows_map(path, keys, row_counts, in_dim, out_shape, num_layers=0):
    """Several torch Linears (or one fused one) whose rows, concatenated, form one kernel."""
    bounds = np.cumsum(row_counts)[:-1]

    def to_ours(*weights):
        return np.concatenate(weights, axis=0).T.reshape((in_dim,) + tuple(out_shape))

    def to_checkpoint(kernel):
        return tuple(np.ascontiguousarray(p.T) for p in np.split(kernel.reshape(in_dim, -1), bounds, axis=1))
    return TensorMap((path,), tuple(keys), to_ours, to_checkpoint, num_layers)


def _separate_qkv_map(path, keys, num_heads, num_kv_heads, head_dim, in_shape, num_layers=0, is_bias=False):
    """q [H·hd, ...], k/v [KV·hd, ...] (contiguous, head-major) <-> grouped [..., KV, G+2, hd]."""
    group = num_heads // num_kv_heads
    lead = tuple(in_shape)

    def to_ours(q, k, v):
        q = (q if is_bias else q.T).reshape(lead + (num_kv_heads, group, head_dim))
        k = (k if is_bias else k.T).reshape(lead + (num_kv_heads, 1, head_dim))
        v = (v if is_bias else v.T).reshape(lead + (num_kv_heads, 1, head_dim))
        return np.concatenate([q, k, v], axis=-2)

    def to_checkpoint(qkv):
        flat = lambda x: x.reshape(lead + (-1,))
        parts = (flat(qkv[..., :group, :]), flat(qkv[..., group:group + 1, :]), flat(qkv[..., group + 1:, :]))
        return tuple(np.ascontiguousarray(p if is_bias else p.T) for p in parts)
    return TensorMap((path,), tuple(keys), to_ours, to_checkpoint, num_layers)


def _fused_qkv_map(path, key, num_heads, num_kv_heads, head_dim, hidden, num_layers=0):
    """Phi-3 `qkv_proj` [(H + 2KV)·hd, D], contiguous q | k | v."""
    inner = _separate_qkv_map(path, (key,) * 3, num_heads, num_kv_heads, head_dim, (hidden,), num_layers)
    sizes = np.cumsum([num_heads * head_dim, num_kv_heads * head_dim])
    return TensorMap((path,), (key,), lambda w: inner.to_ours(*np.split(w, sizes, axis=0)),
                     lambda x: (np.concatenate(inner.to_checkpoint(x), axis=0),), num_layers)


def _vision_maps(config: ModelConfig, prefix: str, layout: str) -> list[TensorMap]:
    v = config.vision
    c, heads, hd, p, n = v.hidden_size, v.num_heads, v.head_dim, v.patch_size, v.num_layers
    root = ("vision_model",)
    blocks = root + ("layers",)
    official = layout == "official"
    emb = f"{prefix}embeddings."
    layer = f"{prefix}encoder.{'layers' if official else 'layer'}.{{i}}."
    names = (dict(qkv="attn.qkv", proj="attn.proj", ls1="ls1", ls2="ls2", norm1="norm1", norm2="norm2",
                  q_norm="attn.q_norm", k_norm="attn.k_norm", cls="class_embedding",
                  pos="position_embedding", patch="patch_embedding")
             if official else
             dict(qkv="attention.{}_proj", proj="attention.projection_layer", ls1="lambda_1", ls2="lambda_2",
                  norm1="layernorm_before", norm2="layernorm_after", q_norm="attention.q_norm",
                  k_norm="attention.k_norm", cls="cls_token", pos="position_embeddings",
                  patch="patch_embeddings.projection"))
    maps = [
        _reshape_map(root + ("class_embedding",), emb + names["cls"], (c,), (1, 1, c)),
        _reshape_map(root + ("position_embedding",), emb + names["pos"], (v.grid_size ** 2 + 1, c),
                     (1, v.grid_size ** 2 + 1, c)),
        TensorMap((root + ("patch_embedding", "kernel"),), (emb + names["patch"] + ".weight",),
                  lambda w: w.reshape(c, 3 * p * p).T,
                  lambda k: (np.ascontiguousarray(k.T.reshape(c, 3, p, p)),)),
        _identity_map(root + ("patch_embedding", "bias"), emb + names["patch"] + ".bias"),
        _identity_map(blocks + ("ls1",), layer + names["ls1"], n),
        _identity_map(blocks + ("ls2",), layer + names["ls2"], n),
        _linear_map(blocks + ("proj", "kernel"), layer + names["proj"] + ".weight", (heads, hd), (c,), n),
        _identity_map(blocks + ("proj", "bias"), layer + names["proj"] + ".bias", n),
        _linear_map(blocks + ("fc1", "kernel"), layer + "mlp.fc1.weight", (c,), (v.intermediate_size,), n),
        _identity_map(blocks + ("fc1", "bias"), layer + "mlp.fc1.bias", n),
        _linear_map(blocks + ("fc2", "kernel"), layer + "mlp.fc2.weight", (v.intermediate_size,), (c,), n),
        _identity_map(blocks + ("fc2", "bias"), layer + "mlp.fc2.bias", n),
    ]
    if official:
        maps.append(_linear_map(blocks + ("qkv", "kernel"), layer + "attn.qkv.weight", (c,), (3, heads, hd), n))
        if v.qkv_bias:
            maps.append(_reshape_map(blocks + ("qkv", "bias"), layer + "attn.qkv.bias", (3, heads, hd), (3 * c,), n))
    else:
        qkv_keys = [layer + names["qkv"].format(x) for x in "qkv"]
        maps.append(_split_rows_map(blocks + ("qkv", "kernel"), [k + ".weight" for k in qkv_keys], [c] * 3, c,
                                    (3, heads, hd), n))
        if v.qkv_bias:
            maps.append(TensorMap((blocks + ("qkv", "bias"),), tuple(k + ".bias" for k in qkv_keys),
                                  lambda *b: np.stack(b).reshape(3, heads, hd),
                                  lambda b: tuple(b.reshape(3, c)), n))
    for norm in ("norm1", "norm2"):
        maps.append(_identity_map(blocks + (norm, "scale"), layer + names[norm] + ".weight", n))
        if v.norm_type == "layer_norm":
            maps.append(_identity_map(blocks + (norm, "bias"), layer + names[norm] + ".bias", n))
    if v.qk_normalization:
        for norm in ("q_norm", "k_norm"):
            maps.append(_reshape_map(blocks + (norm, "scale"), layer + names[norm] + ".weight", (heads, hd), (c,), n))
    return maps


def _projector_maps(config: ModelConfig, layout: str) -> list[TensorMap]:
    root = ("mlp1",)
    factor = round(1 / config.downsample_ratio)
    c4, d = config.vision.hidden_size * factor ** 2, config.llm.hidden_size
    names = (("mlp1.0", "mlp1.1", "mlp1.3") if layout == "official" else
             ("multi_modal_projector.layer_norm", "multi_modal_projector.linear_1",
              "multi_modal_projector.linear_2"))
    return [
        _identity_map(root + ("norm", "scale"), names[0] + ".weight"),
        _identity_map(root + ("norm", "bias"), names[0] + ".bias"),
        _linear_map(root + ("fc1", "kernel"), names[1] + ".weight", (c4,), (d,)),
        _identity_map(root + ("fc1", "bias"), names[1] + ".bias"),
        _linear_map(root + ("fc2", "kernel"), names[2] + ".weight", (d,), (d,)),
        _identity_map(root + ("fc2", "bias"), names[2] + ".bias"),
    ]


def _llm_maps(config: ModelConfig, layout: str) -> list[TensorMap]:
    llm = config.llm
    d, n, hd = llm.hidden_size, llm.num_layers, llm.resolved_head_dim
    h, kv, inter = llm.num_heads, llm.num_kv_heads, llm.intermediate_size
    group = h // kv
    root = ("language_model",)
    blocks = root + ("layers",)
    internlm2 = layout == "official" and llm.family == "internlm2"
    phi3 = layout == "official" and llm.family == "phi3"
    base = "language_model.model."
    layer = base + "layers.{i}."
    maps = [_identity_map(root + ("norm", "scale"), base + "norm.weight")]
    if internlm2:
        maps += [
            _identity_map(root + ("embed",), base + "tok_embeddings.weight"),
            _linear_map(blocks + ("qkv", "kernel"), layer + "attention.wqkv.weight", (d,), (kv, group + 2, hd), n),
            _linear_map(blocks + ("o", "kernel"), layer + "attention.wo.weight", (kv, group, hd), (d,), n),
            _linear_map(blocks + ("gate", "kernel"), layer + "feed_forward.w1.weight", (d,), (inter,), n),
            _linear_map(blocks + ("up", "kernel"), layer + "feed_forward.w3.weight", (d,), (inter,), n),
            _linear_map(blocks + ("down", "kernel"), layer + "feed_forward.w2.weight", (inter,), (d,), n),
            _identity_map(blocks + ("attn_norm", "scale"), layer + "attention_norm.weight", n),
            _identity_map(blocks + ("mlp_norm", "scale"), layer + "ffn_norm.weight", n),
        ]
        head_key = "language_model.output.weight"
        if llm.qkv_bias:
            maps.append(_reshape_map(blocks + ("qkv", "bias"), layer + "attention.wqkv.bias",
                                     (kv, group + 2, hd), ((h + 2 * kv) * hd,), n))
    else:
        maps += [
            _identity_map(root + ("embed",), base + "embed_tokens.weight"),
            _linear_map(blocks + ("o", "kernel"), layer + "self_attn.o_proj.weight", (kv, group, hd), (d,), n),
            _linear_map(blocks + ("down", "kernel"), layer + "mlp.down_proj.weight", (inter,), (d,), n),
            _identity_map(blocks + ("attn_norm", "scale"), layer + "input_layernorm.weight", n),
            _identity_map(blocks + ("mlp_norm", "scale"), layer + "post_attention_layernorm.weight", n),
        ]
        head_key = "language_model.lm_head.weight"
        if phi3:
            maps.append(_fused_qkv_map(blocks + ("qkv", "kernel"), layer + "self_attn.qkv_proj.weight", h, kv, hd, d, n))
            maps.append(TensorMap((blocks + ("gate", "kernel"), blocks + ("up", "kernel")),
                                  (layer + "mlp.gate_up_proj.weight",),
                                  lambda w: (w[:inter].T, w[inter:].T),
                                  lambda gate, up: (np.ascontiguousarray(np.concatenate([gate, up], axis=1).T),), n))
        else:
            proj = [layer + f"self_attn.{x}_proj" for x in "qkv"]
            maps.append(_separate_qkv_map(blocks + ("qkv", "kernel"), [k + ".weight" for k in proj], h, kv, hd, (d,), n))
            if llm.qkv_bias:
                maps.append(_separate_qkv_map(blocks + ("qkv", "bias"), [k + ".bias" for k in proj], h, kv, hd, (),
                                              n, is_bias=True))
            maps.append(_linear_map(blocks + ("gate", "kernel"), layer + "mlp.gate_proj.weight", (d,), (inter,), n))
            maps.append(_linear_map(blocks + ("up", "kernel"), layer + "mlp.up_proj.weight", (d,), (inter,), n))
    if not llm.tie_word_embeddings:
        maps.append(_linear_map(root + ("lm_head", "kernel"), head_key, (d,), (llm.vocab_size,)))
    return maps


def tensor_maps(config: ModelConfig, layout: str = "official") -> list[TensorMap]:
    """Every parameter of `config`'s model (LoRA excluded) with its checkpoint tensors."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout '{layout}'; known: {LAYOUTS}")
    prefix = "vision_model." if layout == "official" else "vision_tower."
    return _vision_maps(config, prefix, layout) + _projector_maps(config, layout) + _llm_maps(config, layout)
