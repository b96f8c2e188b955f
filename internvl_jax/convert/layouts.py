"""Checkpoint layouts: how each parameter of ours maps to tensors of an HF checkpoint.

Two layouts are known: `official` (the InternVL remote-code names: `vision_model.*`, `mlp1.*`,
`language_model.*` with InternLM2's grouped `wqkv`, Phi-3's fused `qkv_proj`/`gate_up_proj`, or
Llama/Qwen2's separate projections) and `hf` (transformers' native
`InternVLForConditionalGeneration` on-disk names, spec toolchain §7).

Every conversion is data, not code: a `TensorMap` views its checkpoint tensors, concatenated
row-wise, as one matrix T [rows, width], and each of our parameters (a `Part`) as a row
selection of T, transposed for torch Linears (weight [out, in] vs our kernel [in, out]). That
one description drives both directions (`to_ours`, `to_checkpoint`) and the sliced reads of
the loader, which fetch only the rows of T that a device's shard needs.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np

from internvl_jax.config import ModelConfig

LAYOUTS = ("official", "hf")
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Part:
    """One of our parameters (one layer of it, logical shape) as a block of its map's T.

    Our axes [:split] flatten to a, axes [split:] to b. Not transposed: ours[a, b] = T[rows[a], b].
    Transposed (torch Linear): ours[a, b] = T[rows[b], a], i.e. a runs over T's columns.
    """
    path: Path
    shape: tuple[int, ...]
    split: int
    transposed: bool
    rows: np.ndarray

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(prod of axes [:split], prod of axes [split:])."""
        return math.prod(self.shape[:self.split]), math.prod(self.shape[self.split:])


@dataclasses.dataclass(frozen=True, eq=False)
class TensorMap:
    """Checkpoint tensors `keys` ('{i}' = layer index when `num_layers` > 0) <-> our `parts`."""
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    width: int
    parts: tuple[Part, ...]
    num_layers: int = 0

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(part.path for part in self.parts)

    def layer_keys(self, layer: int | None) -> tuple[str, ...]:
        return tuple(k.format(i=layer) for k in self.keys)

    def layers(self) -> list[int | None]:
        return list(range(self.num_layers)) if self.num_layers else [None]

    def key_rows(self) -> np.ndarray:
        """Row offset in T where each key starts, plus the total: [len(keys) + 1]."""
        return np.concatenate([[0], np.cumsum([math.prod(s) // self.width for s in self.shapes])])

    def to_ours(self, *tensors: np.ndarray) -> tuple[np.ndarray, ...]:
        """Checkpoint tensors of one layer -> one array per part (logical shapes)."""
        matrix = np.concatenate([t.reshape(-1, self.width) for t in tensors], axis=0)
        return tuple((matrix[part.rows].T if part.transposed else matrix[part.rows]).reshape(part.shape)
                     for part in self.parts)

    def to_checkpoint(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """One array per part (one layer) -> the checkpoint tensors, in `keys` order."""
        bounds = self.key_rows()
        matrix = np.empty((bounds[-1], self.width), np.result_type(*arrays))
        for part, array in zip(self.parts, arrays):
            a, b = part.matrix_shape
            block = array.reshape(a, b)
            matrix[part.rows] = block.T if part.transposed else block
        return tuple(np.ascontiguousarray(matrix[start:stop]).reshape(shape)
                     for start, stop, shape in zip(bounds[:-1], bounds[1:], self.shapes))


# --------------------------------------------------------------------------------------------
# Constructors for the kinds of tensors that occur.


def plain(path: Path, key: str, shape: Sequence[int], key_shape: Sequence[int] | None = None,
          split: int = 1, num_layers: int = 0, rows: np.ndarray | None = None) -> TensorMap:
    """A tensor that is ours up to a reshape (norms, biases, embeddings, layer scales)."""
    shape = tuple(shape)
    width = math.prod(shape[split:])
    n = math.prod(shape[:split])
    return TensorMap((key,), (tuple(key_shape or shape),), width,
                     (Part(path, shape, split, False, np.arange(n) if rows is None else rows),), num_layers)


def linear(path: Path, keys: Sequence[str], key_shapes: Sequence[Sequence[int]], in_shape: Sequence[int],
           out_shape: Sequence[int], num_layers: int = 0, rows: np.ndarray | None = None) -> TensorMap:
    """torch Linear weight(s) [out, in] (several stacked along out) <-> our kernel [*in_shape, *out_shape]."""
    shape = tuple(in_shape) + tuple(out_shape)
    out = math.prod(out_shape)
    part = Part(path, shape, len(in_shape), True, np.arange(out) if rows is None else rows)
    return TensorMap(tuple(keys), tuple(tuple(s) for s in key_shapes), math.prod(in_shape), (part,), num_layers)


def grouped_qkv_rows(num_heads: int, num_kv_heads: int, head_dim: int) -> np.ndarray:
    """Rows of a contiguous [q | k | v] stack (each head-major) in our grouped order.

    Our qkv output axis is (KV, G+2, hd): per kv group g, slots 0..G-1 are query heads g·G + s,
    slot G its key, slot G+1 its value (InternLM2's `wqkv` order, spec §5.2).
    """
    group = num_heads // num_kv_heads
    g, s, d = np.meshgrid(np.arange(num_kv_heads), np.arange(group + 2), np.arange(head_dim), indexing="ij")
    q_row = (g * group + s) * head_dim + d
    k_row = num_heads * head_dim + g * head_dim + d
    v_row = (num_heads + num_kv_heads) * head_dim + g * head_dim + d
    return np.where(s < group, q_row, np.where(s == group, k_row, v_row)).reshape(-1)


# --------------------------------------------------------------------------------------------
# The model's maps.


def _vision_maps(config: ModelConfig, layout: str) -> list[TensorMap]:
    v = config.vision
    c, heads, hd, p, n = v.hidden_size, v.num_heads, v.head_dim, v.patch_size, v.num_layers
    root = ("vision_model",)
    blocks = root + ("layers",)
    official = layout == "official"
    prefix = "vision_model." if official else "vision_tower."
    emb = prefix + "embeddings."
    layer = prefix + ("encoder.layers.{i}." if official else "encoder.layer.{i}.")
    names = (dict(proj="attn.proj", ls1="ls1", ls2="ls2", norm1="norm1", norm2="norm2", q_norm="attn.q_norm",
                  k_norm="attn.k_norm", cls="class_embedding", pos="position_embedding", patch="patch_embedding")
             if official else
             dict(proj="attention.projection_layer", ls1="lambda_1", ls2="lambda_2", norm1="layernorm_before",
                  norm2="layernorm_after", q_norm="attention.q_norm", k_norm="attention.k_norm", cls="cls_token",
                  pos="position_embeddings", patch="patch_embeddings.projection"))
    tokens = v.grid_size ** 2 + 1
    maps = [
        plain(root + ("class_embedding",), emb + names["cls"], (c,), (1, 1, c)),
        plain(root + ("position_embedding",), emb + names["pos"], (tokens, c), (1, tokens, c)),
        linear(root + ("patch_embedding", "kernel"), [emb + names["patch"] + ".weight"], [(c, 3, p, p)],
               (3 * p * p,), (c,)),
        plain(root + ("patch_embedding", "bias"), emb + names["patch"] + ".bias", (c,)),
    ]
    for norm in ("norm1", "norm2"):
        maps.append(plain(blocks + (norm, "scale"), layer + names[norm] + ".weight", (c,), num_layers=n))
        if v.norm_type == "layer_norm":
            maps.append(plain(blocks + (norm, "bias"), layer + names[norm] + ".bias", (c,), num_layers=n))
    qkv_keys = ([layer + "attn.qkv"] if official else [layer + f"attention.{x}_proj" for x in "qkv"])
    key_rows = 3 * c // len(qkv_keys)
    maps.append(linear(blocks + ("qkv", "kernel"), [k + ".weight" for k in qkv_keys], [(key_rows, c)] * len(qkv_keys),
                       (c,), (3, heads, hd), n))
    if v.qkv_bias:
        maps.append(TensorMap(tuple(k + ".bias" for k in qkv_keys), ((key_rows,),) * len(qkv_keys), 1,
                              (Part(blocks + ("qkv", "bias"), (3, heads, hd), 3, False, np.arange(3 * c)),), n))
    if v.qk_normalization:
        for norm in ("q_norm", "k_norm"):
            maps.append(plain(blocks + (norm, "scale"), layer + names[norm] + ".weight", (heads, hd), (c,), split=2,
                              num_layers=n))
    maps += [
        linear(blocks + ("proj", "kernel"), [layer + names["proj"] + ".weight"], [(c, c)], (heads, hd), (c,), n),
        plain(blocks + ("proj", "bias"), layer + names["proj"] + ".bias", (c,), num_layers=n),
        linear(blocks + ("fc1", "kernel"), [layer + "mlp.fc1.weight"], [(v.intermediate_size, c)], (c,),
               (v.intermediate_size,), n),
        plain(blocks + ("fc1", "bias"), layer + "mlp.fc1.bias", (v.intermediate_size,), num_layers=n),
        linear(blocks + ("fc2", "kernel"), [layer + "mlp.fc2.weight"], [(c, v.intermediate_size)],
               (v.intermediate_size,), (c,), n),
        plain(blocks + ("fc2", "bias"), layer + "mlp.fc2.bias", (c,), num_layers=n),
        plain(blocks + ("ls1",), layer + names["ls1"], (c,), num_layers=n),
        plain(blocks + ("ls2",), layer + names["ls2"], (c,), num_layers=n),
    ]
    return maps


def _projector_maps(config: ModelConfig, layout: str) -> list[TensorMap]:
    root = ("mlp1",)
    factor = round(1 / config.downsample_ratio)
    c4, d = config.vision.hidden_size * factor ** 2, config.llm.hidden_size
    names = (("mlp1.0", "mlp1.1", "mlp1.3") if layout == "official" else
             ("multi_modal_projector.layer_norm", "multi_modal_projector.linear_1",
              "multi_modal_projector.linear_2"))
    return [
        plain(root + ("norm", "scale"), names[0] + ".weight", (c4,)),
        plain(root + ("norm", "bias"), names[0] + ".bias", (c4,)),
        linear(root + ("fc1", "kernel"), [names[1] + ".weight"], [(d, c4)], (c4,), (d,)),
        plain(root + ("fc1", "bias"), names[1] + ".bias", (d,)),
        linear(root + ("fc2", "kernel"), [names[2] + ".weight"], [(d, d)], (d,), (d,)),
        plain(root + ("fc2", "bias"), names[2] + ".bias", (d,)),
    ]


def _llm_maps(config: ModelConfig, layout: str) -> list[TensorMap]:
    llm = config.llm
    d, n, hd = llm.hidden_size, llm.num_layers, llm.resolved_head_dim
    h, kv, inter, vocab = llm.num_heads, llm.num_kv_heads, llm.intermediate_size, llm.vocab_size
    group = h // kv
    qkv_shape = (kv, group + 2, hd)
    qkv_rows = (h + 2 * kv) * hd
    root = ("language_model",)
    blocks = root + ("layers",)
    base = "language_model.model."
    layer = base + "layers.{i}."
    if layout == "official" and llm.family == "internlm2":
        qkv = [layer + "attention.wqkv"]
        names = dict(embed="tok_embeddings", o="attention.wo", gate="feed_forward.w1", up="feed_forward.w3",
                     down="feed_forward.w2", attn_norm="attention_norm", mlp_norm="ffn_norm",
                     head="language_model.output")
        rows = np.arange(qkv_rows)  # wqkv is stored in our grouped order
    else:
        # transformers' Phi-3 fuses q|k|v and gate|up in both layouts; Llama / Qwen2 keep them apart.
        qkv = [layer + "self_attn.qkv_proj"] if llm.family == "phi3" else [layer + f"self_attn.{x}_proj" for x in "qkv"]
        names = dict(embed="embed_tokens", o="self_attn.o_proj", gate="mlp.gate_proj", up="mlp.up_proj",
                     down="mlp.down_proj", attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
                     head="language_model.lm_head")
        rows = grouped_qkv_rows(h, kv, hd)
    qkv_key_rows = [qkv_rows] if len(qkv) == 1 else [h * hd, kv * hd, kv * hd]
    maps = [
        plain(root + ("embed",), base + names["embed"] + ".weight", (vocab, d)),
        plain(blocks + ("attn_norm", "scale"), layer + names["attn_norm"] + ".weight", (d,), num_layers=n),
        linear(blocks + ("qkv", "kernel"), [k + ".weight" for k in qkv], [(r, d) for r in qkv_key_rows], (d,),
               qkv_shape, n, rows),
    ]
    if llm.qkv_bias:
        maps.append(TensorMap(tuple(k + ".bias" for k in qkv), tuple((r,) for r in qkv_key_rows), 1,
                              (Part(blocks + ("qkv", "bias"), qkv_shape, 3, False, rows),), n))
    maps += [
        linear(blocks + ("o", "kernel"), [layer + names["o"] + ".weight"], [(d, h * hd)], (kv, group, hd), (d,), n),
        plain(blocks + ("mlp_norm", "scale"), layer + names["mlp_norm"] + ".weight", (d,), num_layers=n),
    ]
    if llm.family == "phi3":
        gate_up = layer + "mlp.gate_up_proj.weight"
        maps.append(TensorMap((gate_up,), ((2 * inter, d),), d, (
            Part(blocks + ("gate", "kernel"), (d, inter), 1, True, np.arange(inter)),
            Part(blocks + ("up", "kernel"), (d, inter), 1, True, np.arange(inter, 2 * inter))), n))
    else:
        for name in ("gate", "up"):
            maps.append(linear(blocks + (name, "kernel"), [layer + names[name] + ".weight"], [(inter, d)], (d,),
                               (inter,), n))
    maps.append(linear(blocks + ("down", "kernel"), [layer + names["down"] + ".weight"], [(d, inter)], (inter,),
                       (d,), n))
    maps.append(plain(root + ("norm", "scale"), base + "norm.weight", (d,)))
    if not llm.tie_word_embeddings:
        maps.append(linear(root + ("lm_head", "kernel"), [names["head"] + ".weight"], [(vocab, d)], (d,), (vocab,)))
    return maps


def tensor_maps(config: ModelConfig, layout: str = "official") -> list[TensorMap]:
    """Every parameter of `config`'s model (LoRA excluded) with its checkpoint tensors, in the
    checkpoint's module order (official: vision, LLM, mlp1; hf: vision, projector, LLM)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout '{layout}'; known: {LAYOUTS}")
    vision, projector, llm = _vision_maps(config, layout), _projector_maps(config, layout), _llm_maps(config, layout)
    return vision + llm + projector if layout == "official" else vision + projector + llm


def state_dict_order(maps: list[TensorMap]) -> list[tuple[TensorMap, int | None]]:
    """(map, layer) in state-dict order: consecutive stacked maps are interleaved layer by layer."""
    order = []
    for num_layers, group in itertools.groupby(maps, key=lambda m: m.num_layers):
        group = list(group)
        order += ([(m, layer) for layer in range(num_layers) for m in group] if num_layers else
                  [(m, None) for m in group])
    return order


# The LM-head tensor that some tied-embedding checkpoints still store (a copy of the embedding).
TIED_HEAD_KEY = "language_model.lm_head.weight"


# --------------------------------------------------------------------------------------------
# LoRA adapters kept as adapters (PEFT `lora_A` [r, in], `lora_B` [out, r]; ΔW = scale · B·A).


def adapter_maps(base: TensorMap, rank: int) -> list[TensorMap] | None:
    """Maps of our `lora_a`/`lora_b` for a Linear map's adapter, or None when ours cannot hold it.

    Exact only when the map reads one checkpoint Linear (one A): our a = Aᵀ, b = (B's rows in
    our order)ᵀ. A fused Linear feeding several of our kernels (Phi-3 gate_up) gives each the
    same A. Several checkpoint Linears feeding one kernel (Llama q/k/v) have several A's: None.
    """
    if len(base.keys) != 1 or not all(part.transposed for part in base.parts):
        return None
    module = base.keys[0].removesuffix(".weight")
    out_rows = math.prod(base.shapes[0]) // base.width
    maps = []
    for part in base.parts:
        owner = part.path[:-1]
        in_shape = part.shape[:part.split]
        maps.append(TensorMap((module + ".lora_A.weight",), ((rank, base.width),), base.width,
                              (Part(owner + ("lora_a",), in_shape + (rank,), part.split, True, np.arange(rank)),),
                              base.num_layers))
        maps.append(TensorMap((module + ".lora_B.weight",), ((out_rows, rank),), rank,
                              (Part(owner + ("lora_b",), (rank,) + part.shape[part.split:], 1, True, part.rows),),
                              base.num_layers))
    return maps
