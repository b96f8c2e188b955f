"""KV-cache generation on the tiny model: exactness, left padding, stopping, sampling, compile counts, in-place cache,
sharding.

Prompts are chosen so the tests share few compiled programs: 65..128 tokens, one tile per row,
at most 16 new tokens, so a batch of two rows uses the buckets (B=2, T=128, N=2, M=16) and a
single row (B=1, T=128, N=1, M=16), as test_chat.py's prompts do.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import IMG_CONTEXT_ID
from internvl_jax.config import MeshConfig
from internvl_jax.models import generate as gen
from internvl_jax.sharding import make_mesh, state_shardings

MAX_NEW = 12
REF_LENGTH = 144  # fixed length of the reference forward (right-padded with segment 0)


def make_prompt(rng, config, text_tokens, tiles):
    """BOS-like id, 2 ids, the tiles' IMG_CONTEXT ids, then text; uint8 tiles (or None)."""
    text = rng.integers(3, 900, text_tokens).tolist()
    ids = [1] + text[:2] + [IMG_CONTEXT_ID] * (config.num_image_token * tiles) + text[2:]
    size = config.vision.image_size
    pixels = rng.integers(0, 256, (tiles, size, size, 3), dtype=np.uint8) if tiles else None
    return ids, pixels


@pytest.fixture(scope="module")
def prompts(tiny_config):
    """Four prompts of 65..128 tokens: two 1-tile prompts of different lengths, a text-only one, a 2-tile one."""
    rng = np.random.default_rng(0)
    return [make_prompt(rng, tiny_config, n_text, n_tiles) for n_text, n_tiles in ((60, 1), (90, 1), (70, 0), (50, 2))]


@nnx.jit
def _forward(model, ids, segment_ids, pixel_values, image_flags):
    return model(ids, pixel_values, image_flags, segment_ids)


def reference_greedy(model, config, ids, pixels, steps):
    """Greedy continuation by re-running the full (uncached) forward and taking the argmax."""
    size = config.vision.image_size
    tiles = np.zeros((2, size, size, 3), np.uint8)
    flags = np.zeros(2, np.int32)
    if pixels is not None:
        tiles[:len(pixels)], flags[:len(pixels)] = pixels, 1
    ids, out = list(ids), []
    for _ in range(steps):
        row = np.zeros((1, REF_LENGTH), np.int32)
        row[0, :len(ids)] = ids
        segment_ids = (np.arange(REF_LENGTH) < len(ids)).astype(np.int32)[None]
        logits = _forward(model, jnp.asarray(row), jnp.asarray(segment_ids), jnp.asarray(tiles), jnp.asarray(flags))
        out.append(int(np.argmax(np.asarray(logits[0, len(ids) - 1]))))
        ids.append(out[-1])
    return out


@pytest.fixture(scope="module")
def references(tiny_model, tiny_config, prompts):
    return [reference_greedy(tiny_model, tiny_config, ids, pixels, MAX_NEW) for ids, pixels in prompts]


def run(model, rows, stop_ids=(), mesh=None, **config):
    """New tokens of each (ids, tiles) row; `config` overrides GenerationConfig fields."""
    ids, tiles = zip(*rows)
    return gen.generate(model, list(ids), list(tiles), stop_ids=stop_ids, config={"max_new_tokens": MAX_NEW, **config},
                        mesh=mesh)


def test_buckets_and_left_padding(prompts):
    assert [gen.bucket(n, 16) for n in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, 128]
    # The module docstring's count: one image of n = 1..31 tiles (256 tokens each) and a 60-token question.
    pairs = {(gen.bucket(256 * n + 60, 16), gen.bucket(n)) for n in range(1, 32)}
    assert len(pairs) == 9 and len({length for length, _ in pairs}) == 5
    (ids_a, tiles_a), (ids_b, tiles_b), (ids_c, _), (ids_d, tiles_d) = prompts
    batch = gen.pack_prompts([ids_a, ids_c], [tiles_a, None], 16, IMG_CONTEXT_ID)
    assert batch.input_ids.shape == (2, 128) and batch.pixel_values.shape[0] == 1
    for row, ids in enumerate([ids_a, ids_c]):
        pad = 128 - len(ids)
        np.testing.assert_array_equal(batch.input_ids[row, pad:], ids)
        np.testing.assert_array_equal(batch.segment_ids[row], np.arange(128) >= pad)
        np.testing.assert_array_equal(batch.positions[row, pad:], np.arange(len(ids)))
    three = gen.pack_prompts([ids_d, ids_c, ids_b], [tiles_d, None, tiles_b], 16, IMG_CONTEXT_ID)
    assert three.input_ids.shape[0] == 4 and three.pixel_values.shape[0] == 4
    np.testing.assert_array_equal(three.pixel_values[2], tiles_b[0])  # tiles in row order
    np.testing.assert_array_equal(three.image_flags, [1, 1, 1, 0])
    with pytest.raises(ValueError, match="prompt 1 has 32 IMG_CONTEXT tokens but its 1 tiles need 16"):
        gen.pack_prompts([ids_a, ids_d], [tiles_a, tiles_b], 16, IMG_CONTEXT_ID)


def test_greedy_equals_full_forward_argmax(tiny_model, prompts, references):
    assert run(tiny_model, prompts[:2]) == references[:2]


def test_left_padded_batch_equals_each_prompt_alone(tiny_model, prompts, references):
    for row in range(2):
        assert run(tiny_model, [prompts[row]]) == [references[row]]


def test_stops_on_stop_ids_and_max_new_tokens(tiny_model, prompts, references):
    first, second = references[:2]
    stop = next(t for t in first[3:] if t not in first[:3])
    cut = [r[:r.index(stop)] if stop in r else r for r in (first, second)]
    assert run(tiny_model, prompts[:2], stop_ids=[stop]) == cut
    # Several stop ids: each row stops at the first of any of them.
    both = [stop, second[0]]
    assert run(tiny_model, prompts[:2], stop_ids=both) == [
        r[:min([r.index(s) for s in both if s in r] + [MAX_NEW])] for r in (first, second)]
    assert run(tiny_model, prompts[:2], max_new_tokens=5) == [first[:5], second[:5]]
    # The first token itself is a stop id: nothing is produced, unless min_new_tokens forbids it.
    assert run(tiny_model, prompts[:2], stop_ids=[first[0]])[0] == []
    forced = run(tiny_model, prompts[:2], stop_ids=[first[0]], min_new_tokens=1)[0]
    assert forced and forced[0] != first[0]


def test_streaming_yields_the_same_tokens(tiny_model, prompts, references):
    ids, tiles = zip(*prompts[:2])
    chunks = list(gen.stream_generate(tiny_model, list(ids), list(tiles), config={"max_new_tokens": MAX_NEW},
                                      chunk=5))
    assert [len(c[0]) for c in chunks] == [1, 5, 5, 1]
    assert [sum((c[row] for c in chunks), []) for row in range(2)] == references[:2]


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_model, prompts, references):
    sample = lambda **kw: run(tiny_model, prompts[:2], do_sample=True, **kw)
    first = sample(seed=1)
    assert first == sample(seed=1)
    assert first != sample(seed=2)
    assert first != references[:2]
    assert sample(seed=3, top_k=1) == references[:2]
    # A random model's top logits lie within ~1e-4 of each other: the temperature must be far below that.
    assert sample(seed=3, temperature=1e-6, top_k=0) == references[:2]


def test_filter_logits_top_k_top_p():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)
    logits = jnp.asarray(np.log(probs))
    kept = lambda k, p: np.isfinite(np.asarray(gen.filter_logits(logits, jnp.int32(k), jnp.float32(p))))[0]
    np.testing.assert_array_equal(kept(0, 1.0), [1, 1, 1, 1])
    np.testing.assert_array_equal(kept(3, 1.0), [1, 1, 1, 0])
    np.testing.assert_array_equal(kept(0, 0.5), [1, 0, 0, 0])  # 0.5 already reaches p
    np.testing.assert_array_equal(kept(0, 0.6), [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(0, 0.9), [1, 1, 1, 0])
    np.testing.assert_array_equal(kept(2, 0.99), [1, 1, 0, 0])  # top-k first, then top-p
    # Sampled frequencies follow the renormalised kept probabilities.
    knobs = gen.make_knobs(gen.GenerationConfig(do_sample=True, top_k=2), [])
    draws = jax.jit(lambda: gen.select_tokens(jnp.tile(logits, (2000, 1)), knobs, 0, jax.random.key(0)))()
    counts = np.bincount(np.asarray(draws), minlength=4) / 2000
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.04)


def test_compiles_a_bounded_number_of_programs(tiny_model, tiny_config):
    """Two programs per bucket combination; new lengths, settings or limits inside it compile nothing."""
    rng = np.random.default_rng(1)

    def sweep(text_lengths):
        """Alternating 1 and 2 rows of 1-tile, 65..128-token prompts: buckets (1, 128, 1, 16), (2, 128, 2, 16)."""
        for index, n_text in enumerate(text_lengths):
            batch = [make_prompt(rng, tiny_config, n_text + row, 1) for row in range(index % 2 + 1)]
            run(tiny_model, batch, max_new_tokens=2 + index % 15, stop_ids=list(range(index % 3)),
                min_new_tokens=index % 2, do_sample=index % 4 > 1, seed=index, top_k=index % 5,
                top_p=1 - index / 100, temperature=1 + index)

    start = gen.compiled_programs()
    sweep([50, 60])  # warm-up
    warm = gen.compiled_programs()
    with gen.count_compilations() as traced:
        sweep([48, 55, 61, 70, 77, 85, 93, 99, 104, 110])
    assert gen.compiled_programs() == warm and traced == []
    assert warm - start <= 4


def test_decode_loop_never_copies_the_cache(tiny_model, tiny_config, prompts):
    """Each token's keys/values go into the donated per-layer cache arrays in place: the compiled
    decode program holds no copy of a cache array (a scan over stacked layers copies it every token)."""
    ids, tiles = zip(*prompts[:2])
    batch = gen.pack_prompts(list(ids), list(tiles), tiny_config.num_image_token, IMG_CONTEXT_ID)
    knobs = gen.make_knobs(gen.GenerationConfig(max_new_tokens=MAX_NEW), [])
    graphdef, params = nnx.split(tiny_model)
    state = gen._prefill_jit(graphdef, params, batch, knobs, new_bucket=gen.MIN_NEW_BUCKET)
    hlo = gen._decode_jit.lower(graphdef, params, state, knobs, np.int32(MAX_NEW)).compile().as_text()
    dims = ",".join(map(str, state.cache.k[0].shape))

    def ops_making(shape: str) -> set[str]:
        """Opcodes of the HLO instructions (fused ones included) whose result has this shape."""
        return set(re.findall(r"= \w+\[%s\]\{[\d,]*\} ([\w-]+)\(" % shape, hlo))

    assert "dynamic-update-slice" in ops_making(dims)
    assert not ops_making(dims) & {"copy", "broadcast", "concatenate", "slice"}
    assert not ops_making(f"{len(state.cache.k)},{dims}")  # nothing stacks the layers' caches


def test_sharded_equals_single_device(tiny_model, prompts, references):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, state = nnx.split(tiny_model)
    sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    assert sharded.language_model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert run(sharded, prompts, mesh=mesh) == references
