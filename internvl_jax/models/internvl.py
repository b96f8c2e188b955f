"""The InternVL chat model: InternViT -> pixel shuffle -> mlp1 -> features written into the LLM.

Static shapes throughout: the tile batch N is fixed, `image_flags` [N] marks real tiles (padded
tiles are flagged 0), and the features of the real tiles, in order, fill the `IMG_CONTEXT`
positions of `input_ids` in row-major order. No host sync, no data-dependent shape; the data
pipeline guarantees that the number of IMG_CONTEXT tokens equals real tiles × tokens per tile
(`image_token_mismatch` reports it on device when a caller wants to check).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from internvl_jax.config import ModelConfig
from internvl_jax.models.llm import DecoderBlock, KVCache, LanguageModel
from internvl_jax.models.projector import Projector, pixel_shuffle
from internvl_jax.models.vision import InternViT


class InternVLChatModel(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        common = dict(scan_layers=config.scan_layers, remat_policy=config.remat_policy,
                      attention=config.attention, dtype=dtype)
        self.vision_model = InternViT(config.vision, config.lora, rngs=rngs, **common)
        factor = round(1 / config.downsample_ratio)
        self.mlp1 = Projector(config.vision.hidden_size * factor ** 2, config.llm.hidden_size, rngs=rngs)
        self.language_model = LanguageModel(config.llm, config.lora, rngs=rngs, **common)

    def extract_feature(self, pixel_values: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """pixel_values [N, 3, H, W] float or [N, H, W, 3] uint8 -> features [N, tokens, D]."""
        hidden = self.vision_model(pixel_values, select_layer=self.config.select_layer, key=key)[:, 1:]
        n, tokens, channels = hidden.shape
        side = int(round(tokens ** 0.5))
        grid = hidden.reshape(n, side, side, channels)
        shuffled = pixel_shuffle(grid, self.config.downsample_ratio, self.config.ps_version)
        return self.mlp1(shuffled)

    def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None,
                     image_flags: jax.Array | None, key: jax.Array | None = None) -> jax.Array:
        """Token embeddings [B, T, D] with image features written at the IMG_CONTEXT positions."""
        embeds = self.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        features = self.extract_feature(pixel_values, key).astype(embeds.dtype)
        flags = jnp.ones(features.shape[0], jnp.int32) if image_flags is None else image_flags
        return merge_image_features(embeds, input_ids, features, flags.reshape(-1),
                                    self.config.img_context_token_id)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                 image_flags: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, *, return_hidden: bool = False,
                 key: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T] -> logits [B, T, V_padded] float32 (or final hidden [B, T, D]).

        segment_ids [B, T] (default all 1; 0 = padding) keep packed samples apart; positions
        [B, T] default to 0..T-1. `key` enables drop path and LoRA dropout (training).
        """
        segment_ids, positions = _default_layout(input_ids, segment_ids, positions)
        vision_key, llm_key = jax.random.split(key) if key is not None else (None, None)
        embeds = self.embed_inputs(input_ids, pixel_values, image_flags, vision_key)
        hidden, _ = self.language_model(embeds, positions, segment_ids, key=llm_key)
        return hidden if return_hidden else self.language_model.logits(hidden)

    def forward_cached(self, input_ids: jax.Array, cache: KVCache, segment_ids: jax.Array | None = None,
                       positions: jax.Array | None = None, pixel_values: jax.Array | None = None,
                       image_flags: jax.Array | None = None,
                       blocks: list[DecoderBlock] | None = None) -> tuple[jax.Array, KVCache]:
        """Prefill (T tokens, optionally with images) or one decode step (T = 1) against a KV cache.

        Writes the new keys/values at cache slots [index, index + T); returns float32 logits
        [B, T, V_padded] and the updated cache. `blocks`: see `LanguageModel.__call__`.
        """
        segment_ids, positions = _default_layout(input_ids, segment_ids, positions, offset=cache.index)
        embeds = self.embed_inputs(input_ids, pixel_values, image_flags)
        hidden, cache = self.language_model(embeds, positions, segment_ids, cache=cache, blocks=blocks)
        return self.language_model.logits(hidden), cache

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        return KVCache.empty(self.config.llm, batch, max_length, jnp.dtype(self.config.dtype))


def _default_layout(input_ids, segment_ids, positions, offset=0):
    if segment_ids is None:
        segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(offset + jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    return segment_ids.astype(jnp.int32), positions.astype(jnp.int32)


def merge_image_features(embeds: jax.Array, input_ids: jax.Array, features: jax.Array,
                         image_flags: jax.Array, img_context_token_id: int) -> jax.Array:
    """Writes the features of real tiles, in order, into the IMG_CONTEXT positions.

    embeds [B, T, D], input_ids [B, T], features [N, tokens, D], image_flags [N] (1 real, 0 pad).
    The k-th IMG_CONTEXT position (row-major over B, T) receives the k-th feature vector of the
    real tiles taken in order.
    """
    b, t, d = embeds.shape
    is_context = (input_ids == img_context_token_id).reshape(-1)
    rank = jnp.cumsum(is_context) - 1
    real_first = jnp.argsort(jnp.where(image_flags > 0, 0, 1), stable=True)
    real_features = features[real_first].reshape(-1, d)
    gathered = real_features[jnp.clip(rank, 0, real_features.shape[0] - 1)]
    merged = jnp.where(is_context[:, None], gathered, embeds.reshape(-1, d))
    return merged.reshape(b, t, d)


def image_token_mismatch(input_ids: jax.Array, image_flags: jax.Array, tokens_per_tile: int,
                         img_context_token_id: int) -> jax.Array:
    """True (on device) when IMG_CONTEXT count ≠ real tiles × tokens per tile."""
    count = jnp.sum(input_ids == img_context_token_id)
    return count != jnp.sum(image_flags > 0) * tokens_per_tile
