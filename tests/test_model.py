"""Model core behaviour on the tiny config (single device, float32)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import IMG_CONTEXT_ID
from internvl_jax.models.internvl import image_token_mismatch, merge_image_features
from internvl_jax.models.layers import LoRAParam, drop_path
from internvl_jax.models.params import abstract_model, count_params, create_model
from internvl_jax.models.rope import rope_tables, segment_lengths
from internvl_jax.models.vision import InternViT, normalize_uint8_tiles, resize_position_grid


def with_config(model, config):
    """The same parameters under another (shape-compatible) config."""
    return nnx.merge(nnx.graphdef(abstract_model(config)), nnx.state(model))


@nnx.jit
def forward(model, input_ids, pixel_values, image_flags, segment_ids=None, positions=None):
    return model(input_ids, pixel_values, image_flags, segment_ids, positions)


def make_batch(config, seed=0, batch=2, length=56):
    """Two rows: row 0 holds two tiles' image tokens, row 1 one tile; a padded 4th tile."""
    rng = np.random.default_rng(seed)
    tokens = config.num_image_token
    ids = rng.integers(3, 900, (batch, length)).astype(np.int32)
    ids[0, 4:4 + 2 * tokens] = IMG_CONTEXT_ID
    ids[1, 2:2 + tokens] = IMG_CONTEXT_ID
    size = config.vision.image_size
    pixels = rng.normal(size=(4, 3, size, size)).astype(np.float32)
    flags = np.array([1, 1, 1, 0], np.int32)
    return jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(flags)


def test_scanned_equals_unrolled(tiny_model, tiny_config):
    ids, pixels, flags = make_batch(tiny_config)
    unrolled = with_config(tiny_model, dataclasses.replace(tiny_config, scan_layers=False))
    scanned_logits = forward(tiny_model, ids, pixels, flags)
    np.testing.assert_allclose(forward(unrolled, ids, pixels, flags), scanned_logits, atol=1e-5, rtol=0)
    remat = with_config(tiny_model, dataclasses.replace(tiny_config, remat_policy="full"))
    np.testing.assert_allclose(forward(remat, ids, pixels, flags), scanned_logits, atol=1e-5, rtol=0)


def test_kv_cache_decoding_matches_full_forward(tiny_model, tiny_config):
    ids, pixels, flags = make_batch(tiny_config)
    full = np.asarray(forward(tiny_model, ids, pixels, flags))
    prompt = 40  # covers every image token of both rows
    cache = tiny_model.init_cache(batch=2, max_length=64)
    step = nnx.jit(lambda m, i, c, px=None, fl=None: m.forward_cached(i, c, pixel_values=px, image_flags=fl))
    logits, cache = step(tiny_model, ids[:, :prompt], cache, pixels, flags)
    np.testing.assert_allclose(logits, full[:, :prompt], atol=1e-4, rtol=0)
    for t in range(prompt, ids.shape[1]):
        logits, cache = step(tiny_model, ids[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4, rtol=0)
    assert int(cache.index) == ids.shape[1]


def test_packed_row_gives_each_sample_its_own_logits(tiny_model, tiny_config):
    """Two samples in one row (segments 1, 2, then padding) = each run alone.

    Uses dynamic-NTK RoPE with a 24-position limit: sample A (30 tokens) is past it and sample
    B (12 tokens) is not, so the per-segment scaling decision is checked too.
    """
    llm = dataclasses.replace(tiny_config.llm, max_position_embeddings=24,
                              rope=dataclasses.replace(tiny_config.llm.rope, scaling="dynamic", factor=2.0))
    model = with_config(tiny_model, dataclasses.replace(tiny_config, llm=llm))
    rng = np.random.default_rng(1)
    tokens = tiny_config.num_image_token
    a = rng.integers(3, 900, 30).astype(np.int32)
    a[2:2 + tokens] = IMG_CONTEXT_ID
    b = rng.integers(3, 900, 12).astype(np.int32)
    size = tiny_config.vision.image_size
    tile = rng.normal(size=(1, 3, size, size)).astype(np.float32)
    pixels = jnp.asarray(np.concatenate([tile, np.zeros_like(tile)]))
    flags_a, flags_none = jnp.asarray([1, 0]), jnp.asarray([0, 0])
    alone_a = forward(model, jnp.asarray(a[None]), pixels, flags_a)[0]
    alone_b = forward(model, jnp.asarray(b[None]), pixels, flags_none)[0]
    row = np.concatenate([a, b, np.zeros(6, np.int32)])[None]
    segments = np.concatenate([np.full(30, 1), np.full(12, 2), np.zeros(6)])[None].astype(np.int32)
    positions = np.concatenate([np.arange(30), np.arange(12), np.zeros(6)])[None].astype(np.int32)
    packed = forward(model, jnp.asarray(row), pixels, flags_a, jnp.asarray(segments), jnp.asarray(positions))[0]
    np.testing.assert_allclose(packed[:30], alone_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[30:42], alone_b, atol=1e-5, rtol=0)
    # The limit really changes A's logits (so the check above is not vacuous).
    plain_a = forward(tiny_model, jnp.asarray(a[None]), pixels, flags_a)[0]
    assert np.abs(np.asarray(plain_a) - np.asarray(alone_a)).max() > 1e-3


def test_image_features_fill_context_positions_in_order():
    d, tokens = 3, 2
    features = jnp.arange(3 * tokens * d, dtype=jnp.float32).reshape(3, tokens, d) + 100
    flags = jnp.asarray([1, 0, 1])  # the middle tile is padding
    ids = jnp.asarray([[5, 9, 9, 6], [9, 9, 7, 8]])
    embeds = jnp.zeros((2, 4, d))
    merged = np.asarray(merge_image_features(embeds, ids, features, flags, 9))
    np.testing.assert_array_equal(merged[0, 1], features[0, 0])
    np.testing.assert_array_equal(merged[0, 2], features[0, 1])
    np.testing.assert_array_equal(merged[1, 0], features[2, 0])
    np.testing.assert_array_equal(merged[1, 1], features[2, 1])
    assert not merged[0, 0].any() and not merged[1, 3].any()
    assert not image_token_mismatch(ids, flags, tokens, 9)
    assert image_token_mismatch(ids, jnp.asarray([1, 1, 1]), tokens, 9)


def test_uint8_tiles_equal_normalised_float(tiny_model, tiny_config):
    size = tiny_config.vision.image_size
    tiles = np.random.default_rng(2).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    reference = ((tiles.astype(np.float32) / np.float32(255.0) - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(normalize_uint8_tiles(jnp.asarray(tiles)), reference, atol=1e-6, rtol=0)
    extract = nnx.jit(lambda m, x: m.extract_feature(x))
    np.testing.assert_allclose(extract(tiny_model, jnp.asarray(tiles)), extract(tiny_model, jnp.asarray(reference)),
                               atol=1e-5, rtol=0)


def test_padded_vocab_is_masked(tiny_config):
    llm = dataclasses.replace(tiny_config.llm, vocab_size=1001, pad_vocab_to_multiple_of=8)
    config = dataclasses.replace(tiny_config, llm=llm)
    model = create_model(config, seed=3)
    assert model.language_model.embed[...].shape[0] == 1008
    assert count_params(model) == count_params(abstract_model(dataclasses.replace(
        config, llm=dataclasses.replace(llm, pad_vocab_to_multiple_of=1))))
    # Make the padded rows as attractive as possible: they must still never win.
    head = model.language_model.lm_head.kernel
    head[...] = head[...].at[:, 1001:].set(100.0)
    ids, pixels, flags = make_batch(config)
    logits = forward(model, ids, pixels, flags)
    assert logits.shape[-1] == 1008
    assert int(jnp.argmax(logits, -1).max()) < 1001
    assert float(jax.nn.softmax(logits, -1)[..., 1001:].sum()) == 0.0


def test_padded_vit_heads_equal_unpadded():
    """6B-style ViT (rms_norm + qk-norm over all heads) with 3 heads padded to 4."""
    from internvl_jax.config import VisionConfig
    base = VisionConfig(hidden_size=48, num_layers=2, num_heads=3, intermediate_size=96, patch_size=14,
                        image_size=56, norm_type="rms_norm", qkv_bias=False, qk_normalization=True,
                        layer_scale_init=0.5)
    padded_config = dataclasses.replace(base, pad_heads_to_multiple_of=2)

    def build(config):
        state = jax.jit(lambda: nnx.state(InternViT(config, rngs=nnx.Rngs(0))))()
        return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: InternViT(config, rngs=nnx.Rngs(0)))), state)

    small, padded = build(base), build(padded_config)
    flat_small = dict(nnx.to_flat_state(nnx.state(small)))

    def pad_like(path, variable):
        value = flat_small[path].get_value()
        target = variable.get_value().shape
        return variable.replace(jnp.pad(value, [(0, t - s) for s, t in zip(value.shape, target)]))

    padded_flat = {p: pad_like(p, v) for p, v in nnx.to_flat_state(nnx.state(padded))}
    nnx.update(padded, nnx.from_flat_state(padded_flat))
    pixels = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 56, 56)).astype(np.float32))
    run = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(run(padded, pixels), run(small, pixels), atol=1e-5, rtol=0)


def test_lora_merge_preserves_outputs(tiny_config):
    config = dataclasses.replace(tiny_config, lora=dataclasses.replace(tiny_config.lora, rank=4, alpha=8.0,
                                                                        vision_rank=2, vision_alpha=2.0))
    model = create_model(config, seed=5)
    lora_state = nnx.state(model, LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: x + 0.05, lora_state))  # b starts at zero: make it matter
    ids, pixels, flags = make_batch(config)
    with_adapters = forward(model, ids, pixels, flags)
    from internvl_jax.models.lora import merge_lora
    merged = merge_lora(model)
    assert not jax.tree.leaves(nnx.state(merged, LoRAParam))
    np.testing.assert_allclose(forward(merged, ids, pixels, flags), with_adapters, atol=1e-4, rtol=0)
    plain = with_config(merged, tiny_config)
    np.testing.assert_allclose(forward(plain, ids, pixels, flags), with_adapters, atol=1e-4, rtol=0)


def test_rope_su_decision_is_per_segment(tiny_config):
    hd = tiny_config.llm.resolved_head_dim
    rope = dataclasses.replace(tiny_config.llm.rope, scaling="su", theta=1e4, original_max_position_embeddings=16,
                               short_factor=tuple(np.linspace(1, 2, hd // 2)),
                               long_factor=tuple(np.linspace(2, 8, hd // 2)))
    llm = dataclasses.replace(tiny_config.llm, rope=rope, max_position_embeddings=64)
    positions = jnp.asarray(np.concatenate([np.arange(20), np.arange(10)])[None])
    segments = jnp.asarray(np.concatenate([np.full(20, 1), np.full(10, 2)])[None])
    lengths = segment_lengths(positions, segments)
    np.testing.assert_array_equal(lengths[0], [20] * 20 + [10] * 10)
    cos, sin = rope_tables(positions, lengths, llm)
    cos_a, _ = rope_tables(positions[:, :20], jnp.full((1, 20), 20), llm)
    cos_b, _ = rope_tables(positions[:, 20:], jnp.full((1, 10), 10), llm)
    np.testing.assert_array_equal(cos[:, :20], cos_a)
    np.testing.assert_array_equal(cos[:, 20:], cos_b)
    # Long factors for A (20 > 16), short for B; both carry the sqrt(1 + ln 4 / ln 16) multiplier.
    multiplier = np.sqrt(1 + np.log(64 / 16) / np.log(16))
    inv_long = 1.0 / (np.asarray(rope.long_factor) * 1e4 ** (np.arange(0, hd, 2) / hd))
    np.testing.assert_allclose(cos_a[0, 5, :hd // 2], np.cos(5 * inv_long) * multiplier, rtol=1e-5)
    np.testing.assert_allclose(cos_b[0, 0], multiplier, rtol=1e-6)


def test_drop_path_is_per_sample_and_rescaled():
    x = jnp.ones((4000, 3, 2))
    out = np.asarray(drop_path(x, 0.25, jax.random.key(0)))
    per_sample = out.reshape(4000, -1)
    values = np.unique(per_sample)
    assert len(values) == 2 and values[0] == 0.0 and np.isclose(values[1], 1 / 0.75)
    assert (per_sample.min(1) == per_sample.max(1)).all()
    assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.03
    np.testing.assert_array_equal(drop_path(x, 0.25, None), x)


def test_position_embedding_interpolation_matches_torch_bicubic():
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(6).normal(size=(8, 8, 5)).astype(np.float32)
    for out_h, out_w in ((12, 6), (4, 4), (8, 8), (16, 11)):
        ours = np.asarray(resize_position_grid(jnp.asarray(grid), out_h, out_w))
        reference = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None],
                                                    size=(out_h, out_w), mode="bicubic", align_corners=False)
        np.testing.assert_allclose(ours, reference[0].permute(1, 2, 0).numpy(), atol=1e-5, rtol=0)
