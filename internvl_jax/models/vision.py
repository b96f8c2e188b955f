"""InternViT (6B-style and 300M-style from one module), spec §2.

Input pixel_values [N, 3, H, W] float (normalised, the official layout) or [N, H, W, 3] uint8
(raw tiles, normalised here on the device with ImageNet mean/std in float32).
Output: hidden states [N, 1 + (H/p)(W/p), C] of layer `select_layer` (no final norm).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.config import LoraConfig, VisionConfig
from internvl_jax.models import attention as attention_lib
from internvl_jax.models.layers import Dense, LayerNorm, RMSNorm, constant, drop_path, gelu, make_param, normal
from internvl_jax.models.stack import run_stack
from internvl_jax.sharding import constrain

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_uint8_tiles(tiles: jax.Array) -> jax.Array:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] float32: x/255 then (x - mean)/std, the reference order."""
    x = tiles.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    return x.transpose(0, 3, 1, 2)


@functools.lru_cache(maxsize=None)
def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of PyTorch bicubic resize (a = -0.75, align_corners=False, edge clamp)."""
    a = -0.75
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        base = int(np.floor(src))
        t = src - base
        coeffs = (
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        )
        for j, c in enumerate(coeffs):
            weights[o, min(max(base - 1 + j, 0), in_size - 1)] += c
    return weights.astype(np.float32)


def resize_position_grid(grid: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """[h, w, C] -> [out_h, out_w, C] with PyTorch's bicubic rule, in float32."""
    h, w, _ = grid.shape
    if (h, w) == (out_h, out_w):
        return grid
    rows = jnp.asarray(_bicubic_matrix(h, out_h))
    cols = jnp.asarray(_bicubic_matrix(w, out_w))
    grid = grid.astype(jnp.float32)
    return jnp.einsum("oh,hwc,pw->opc", rows, grid, cols, precision=jax.lax.Precision.HIGHEST)


class VisionBlock(nnx.Module):
    """Pre-norm block with layer scale: x += ls1·attn(norm1 x); x += ls2·mlp(norm2 x)."""

    def __init__(self, config: VisionConfig, lora: LoraConfig, *, rngs: nnx.Rngs, stack=()):
        c, heads, hd = config.hidden_size, config.padded_num_heads, config.head_dim
        real_heads = config.num_heads
        self.config = config
        norm = (functools.partial(RMSNorm, (c,), ("norm",), eps=config.layer_norm_eps)
                if config.norm_type == "rms_norm"
                else functools.partial(LayerNorm, c, ("norm",), eps=config.layer_norm_eps))
        self.norm1 = norm(rngs=rngs, stack=stack)
        self.norm2 = norm(rngs=rngs, stack=stack)

        def lora_kwargs(name):
            if lora.vision_rank and name in lora.vision_targets:
                return dict(lora_rank=lora.vision_rank, lora_alpha=lora.vision_alpha, lora_dropout=lora.dropout)
            return {}

        self.qkv = Dense((c,), (3, heads, hd), ("vit_embed",), ("qkv", "vit_heads", "head_dim"), rngs=rngs,
                         use_bias=config.qkv_bias, stack=stack, unpadded_out_shape=(3, real_heads, hd),
                         **lora_kwargs("qkv"))
        if config.qk_normalization:
            qk_norm = functools.partial(RMSNorm, (heads, hd), ("vit_heads", "head_dim"), eps=config.layer_norm_eps,
                                        real_size=c, unpadded_shape=(real_heads, hd))
            self.q_norm = qk_norm(rngs=rngs, stack=stack)
            self.k_norm = qk_norm(rngs=rngs, stack=stack)
        self.proj = Dense((heads, hd), (c,), ("vit_heads", "head_dim"), ("vit_embed",), rngs=rngs, stack=stack,
                          unpadded_in_shape=(real_heads, hd), **lora_kwargs("proj"))
        self.fc1 = Dense((c,), (config.intermediate_size,), ("vit_embed",), ("vit_mlp",), rngs=rngs,
                         stack=stack, **lora_kwargs("fc1"))
        self.fc2 = Dense((config.intermediate_size,), (c,), ("vit_mlp",), ("vit_embed",), rngs=rngs,
                         stack=stack, **lora_kwargs("fc2"))
        self.ls1 = make_param(rngs, constant(config.layer_scale_init), (c,), ("norm",), stack)
        self.ls2 = make_param(rngs, constant(config.layer_scale_init), (c,), ("norm",), stack)

    def __call__(self, x, segment_ids, drop_rate, key, backend):
        """x [N, T, C]; segment_ids [N, T] (1 real, 0 padding) or None (all real); key None = deterministic."""
        keys = jax.random.split(key, 6) if key is not None else [None] * 6
        h = self.norm1(x)
        qkv = self.qkv(h, dropout_key=keys[0])  # [N, T, 3, heads, hd]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.config.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attention_lib.attention(q[:, :, :, None], k, v, q_segment_ids=segment_ids,
                                      kv_segment_ids=segment_ids, causal=False, backend=backend)
        out = self.proj(out[:, :, :, 0], dropout_key=keys[1])
        x = x + drop_path(self.ls1[...].astype(x.dtype) * out, drop_rate, keys[2])
        x = constrain(x, ("act_tiles", "act_length", "act_embed"))
        h = self.fc2(gelu(self.fc1(self.norm2(x), dropout_key=keys[3])), dropout_key=keys[4])
        x = x + drop_path(self.ls2[...].astype(x.dtype) * h, drop_rate, keys[5])
        return constrain(x, ("act_tiles", "act_length", "act_embed"))


class InternViT(nnx.Module):
    def __init__(self, config: VisionConfig, lora: LoraConfig = LoraConfig(), *, rngs: nnx.Rngs,
                 scan_layers: bool = True, remat_policy: str = "none", attention: str = "auto",
                 dtype=jnp.float32):
        c, p = config.hidden_size, config.patch_size
        self.config = config
        self.scan_layers, self.remat_policy, self.attention, self.dtype = scan_layers, remat_policy, attention, dtype
        self.class_embedding = make_param(rngs, normal(1.0), (c,), ("vit_embed",))
        self.position_embedding = make_param(rngs, normal(1.0), (config.grid_size ** 2 + 1, c),
                                             ("vit_tokens", "vit_embed"))
        # The 14×14 patch conv as a Dense over flattened (channel, row, col) patches.
        self.patch_embedding = Dense((3 * p * p,), (c,), ("vit_patch",), ("vit_embed",), rngs=rngs)
        self.layers = VisionBlock(config, lora, rngs=rngs, stack=(config.num_layers,))

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """[N, 3, H, W] float or [N, H, W, 3] uint8 -> tokens [N, 1 + h·w, C] (CLS first)."""
        if pixel_values.dtype == jnp.uint8:
            pixel_values = normalize_uint8_tiles(pixel_values)
        n, _, height, width = pixel_values.shape
        p = self.config.patch_size
        gh, gw = height // p, width // p
        patches = pixel_values.reshape(n, 3, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, gh * gw, 3 * p * p).astype(self.dtype)
        tokens = self.patch_embedding(patches)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, tokens.shape[-1]))
        tokens = jnp.concatenate([cls, tokens], axis=1)
        pos = self.position_embedding[...]
        side = self.config.grid_size
        grid = resize_position_grid(pos[1:].reshape(side, side, -1), gh, gw).reshape(gh * gw, -1)
        pos = jnp.concatenate([pos[:1].astype(jnp.float32), grid.astype(jnp.float32)], axis=0)
        return tokens + pos.astype(self.dtype)[None]

    def __call__(self, pixel_values: jax.Array, *, select_layer: int = -1,
                 key: jax.Array | None = None) -> jax.Array:
        """Hidden states [N, T, C] after layer `select_layer` (-1 = last; 0 = embeddings)."""
        x = constrain(self.embed(pixel_values), ("act_tiles", "act_length", "act_embed"))
        num_layers = self.config.num_layers
        depth = num_layers + 1 + select_layer if select_layer < 0 else select_layer
        if not 0 <= depth <= num_layers:
            raise ValueError(f"select_layer {select_layer} out of range for {num_layers} layers")
        segment_ids = None  # every token of a tile is real: nothing to mask
        rates = jnp.linspace(0.0, self.config.drop_path_rate, num_layers)
        keys = jax.random.split(key, num_layers) if key is not None else None
        backend = attention_lib.resolve_backend(self.attention)

        def body(block, carry, per_layer):
            rate, layer_key = per_layer
            return block(carry, segment_ids, rate, layer_key, backend), None

        blocks = self.layers
        if depth < num_layers:  # only the layers up to the selected one are computed
            graphdef, state = nnx.split(blocks)
            blocks = nnx.merge(graphdef, jax.tree.map(lambda a: a[:depth], state))
            rates = rates[:depth]
            keys = keys[:depth] if keys is not None else None
        if depth == 0:
            return x
        x, _ = run_stack(blocks, x, (rates, keys), body, scan=self.scan_layers,
                         remat_policy=self.remat_policy)
        return x
