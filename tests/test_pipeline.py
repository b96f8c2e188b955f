"""The packed, static-shape pipeline: contract, reference equality, packing, sharding, resume, bad input."""
import collections
import dataclasses
import json
import logging
import pickle

import numpy as np
import pytest
from PIL import Image

from data_fixtures import (  # noqa: F401 (fixtures)
    BAD_SET_MAX_PIXELS, NUM_TRAIN, SEQ_LEN, TINY_MODEL, bad_meta, synthetic_meta, tokenizer, tokenizer_dir)
from internvl_jax.config import load_config
from internvl_jax.data.batch import batch_shapes, check_batch, empty_batch
from internvl_jax.data.config import DataConfig
from internvl_jax.data.conversation import SampleError, get_template, preprocess
from internvl_jax.data.packing import Planned, Planner, Stream, pack
from internvl_jax.data.pipeline import DataPipeline
from internvl_jax.data.samples import Measured, SampleDrop, tokenize
from internvl_jax.data.sources import DataError, Record, open_meta
from internvl_jax.data.tiling import tile_image, tiles_to_array
from internvl_jax.data.tokenizer import IMG_CONTEXT_TOKEN

TOKENS_PER_TILE = TINY_MODEL.num_image_token
TILE = TINY_MODEL.vision.image_size


@pytest.fixture(scope="module")
def mixture(synthetic_meta):
    return open_meta(synthetic_meta)


def make(mixture, tokenizer, global_rows=4, process_index=0, process_count=1, group_by_length=False, **data):
    config = DataConfig(**{"num_workers": 0, "num_epochs": 1, **data})
    return DataPipeline(mixture, tokenizer, TINY_MODEL, SEQ_LEN, config, global_rows, process_index, process_count,
                        group_by_length=group_by_length)


def run(pipeline, state=None, limit=None):
    """Batches (at most ``limit``), the states after each, and the stats."""
    batches, states = [], []
    with pipeline.iterator(state) as iterator:
        for batch in iterator:
            batches.append(batch)
            states.append(iterator.get_state())
            if len(batches) == limit:
                break
        return batches, states, iterator.stats


def samples_of(batch, context_id):
    """(input_ids, labels, tiles) of every packed sample, in batch order."""
    real_tiles = batch["pixel_values"][batch["image_flags"] == 1]
    out, tile = [], 0
    for row in range(len(batch["num_samples"])):
        for segment in range(1, batch["num_samples"][row] + 1):
            mask = batch["segment_ids"][row] == segment
            ids = batch["input_ids"][row][mask]
            count = int(np.sum(ids == context_id)) // TOKENS_PER_TILE
            out.append((ids, batch["labels"][row][mask], real_tiles[tile:tile + count]))
            tile += count
    assert tile == len(real_tiles)
    return out


def key(ids, labels, tiles):
    return ids.tobytes(), labels.tobytes(), tiles.tobytes()


def same_batches(first, second):
    return len(first) == len(second) and all(
        all(np.array_equal(a[name], b[name]) for name in a) for a, b in zip(first, second))


def test_batches_follow_the_contract_and_equal_the_reference(mixture, tokenizer):
    """Every sample of the epoch appears once, with the reference's ids, labels and tiles."""
    pipeline = make(mixture, tokenizer)
    batches, _, stats = run(pipeline)
    context_id = tokenizer.special_ids[IMG_CONTEXT_TOKEN]
    shapes = pipeline.shapes()
    got = collections.Counter()
    for batch in batches:
        assert {name: (value.shape, value.dtype) for name, value in batch.items()} == shapes
        check_batch(batch, TOKENS_PER_TILE, context_id)
        got.update(key(*sample) for sample in samples_of(batch, context_id))

    template = get_template(TINY_MODEL.template)
    expected = collections.Counter()
    for index in range(len(mixture)):
        record = mixture[index]
        tiles = np.zeros((0, TILE, TILE, 3), np.uint8)
        if record.images:
            with Image.open(record.images[0]) as image:
                tiles = tiles_to_array(tile_image(image.convert("RGB"), 1, 6, True, TILE))
        reference = preprocess(record.conversations, tokenizer, template, [len(tiles) * 16] * len(record.images),
                               SEQ_LEN)
        expected[key(reference["input_ids"], reference["labels"], tiles)] += 1
    assert got == expected
    assert stats.samples == NUM_TRAIN and not stats.dropped
    assert stats.tokens == sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert stats.tiles == sum(int(b["image_flags"].sum()) for b in batches)


def test_packing_ratio_on_the_synthetic_set(mixture, tokenizer):
    _, _, stats = run(make(mixture, tokenizer))
    assert stats.packing_ratio >= 0.85, stats.as_dict()
    assert stats.padding_fraction == pytest.approx(1 - stats.packing_ratio)
    assert 0 < stats.tile_fill < 1 and stats.samples == NUM_TRAIN


def test_batch_shapes_for_abstract_inputs():
    config = load_config("tiny")
    shapes = batch_shapes(config, per_process_rows=3, tile_budget=20)
    assert shapes["input_ids"].shape == (3, config.train.max_seq_length)
    assert shapes["pixel_values"].shape == (20, TILE, TILE, 3) and shapes["pixel_values"].dtype == np.uint8
    assert shapes["image_flags"].shape == (20,) and shapes["num_samples"].shape == (3,)
    empty = empty_batch(3, 8, 2, 4)
    check_batch(empty, TOKENS_PER_TILE, 5)
    assert (empty["labels"] == -100).all()


@pytest.mark.parametrize("breakage, message", [
    (lambda b: b["segment_ids"].__setitem__((0, 3), 3), "segment ids are not"),
    (lambda b: b["segment_ids"].__setitem__((0, 1), 0), "padding positions carry"),
    (lambda b: b["positions"].__setitem__((0, 2), 7), "positions do not count"),
    (lambda b: b["num_samples"].__setitem__(0, 3), "segment ids are not 1..3"),
    (lambda b: b["image_flags"].__setitem__(0, 0), "IMG_CONTEXT tokens for"),
    (lambda b: b["labels"].__setitem__((0, 1), 9), "supervised label differs"),
])
def test_check_batch_finds_contract_breaks(breakage, message):
    batch = empty_batch(1, 6, 2, 4)
    batch["input_ids"][0, :5] = [1, 5, 5, 2, 3]  # Two samples: [1, 5, 5] (one tile of 2 tokens), [2, 3].
    batch["labels"][0, 1:3] = [5, 5]
    batch["segment_ids"][0, :5] = [1, 1, 1, 2, 2]
    batch["positions"][0, :5] = [0, 1, 2, 0, 1]
    batch["image_flags"][0] = 1
    batch["num_samples"][0] = 2
    check_batch(batch, tokens_per_tile=2, img_context_id=5)
    breakage(batch)
    with pytest.raises(ValueError, match=message):
        check_batch(batch, tokens_per_tile=2, img_context_id=5)


def test_deterministic_for_a_seed(mixture, tokenizer):
    first, _, _ = run(make(mixture, tokenizer, seed=5), limit=3)
    again, _, _ = run(make(mixture, tokenizer, seed=5), limit=3)
    other, _, _ = run(make(mixture, tokenizer, seed=6), limit=3)
    assert same_batches(first, again)
    assert not same_batches(first, other)


def test_processes_split_the_global_batch(mixture, tokenizer):
    whole, _, _ = run(make(mixture, tokenizer, global_rows=4), limit=4)
    parts = [run(make(mixture, tokenizer, global_rows=4, process_index=p, process_count=2), limit=4)[0]
             for p in range(2)]
    for batch, first, second in zip(whole, *parts):
        for name in ("input_ids", "labels", "segment_ids", "positions", "num_samples"):
            assert np.array_equal(batch[name], np.concatenate([first[name], second[name]]))
        real = [b["pixel_values"][b["image_flags"] == 1] for b in (batch, first, second)]
        assert np.array_equal(real[0], np.concatenate(real[1:]))
        assert first["pixel_values"].shape[0] * 2 == batch["pixel_values"].shape[0]


def test_resume_mid_window_with_workers_and_other_process_count(mixture, tokenizer):
    """A position saved with rows of its packing window still unused resumes exactly, with 2 workers
    and with 2 processes instead of 1."""
    settings = dict(packing_window=40, seed=3)
    straight, states, _ = run(make(mixture, tokenizer, **settings))
    cut = next(i for i, state in enumerate(states) if state["rows_done"] > 0 and i >= 2)
    state = states[cut]
    rest = straight[cut + 1:]
    assert json.loads(json.dumps(state)) == state

    resumed, _, _ = run(make(mixture, tokenizer, num_workers=2, **settings), state=state)
    assert same_batches(resumed, rest)

    parts = [run(make(mixture, tokenizer, process_index=p, process_count=2, **settings), state=state)[0]
             for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(rest)
    for batch, first, second in zip(rest, *parts):
        assert np.array_equal(batch["input_ids"], np.concatenate([first["input_ids"], second["input_ids"]]))


def test_set_state_and_a_mismatched_state(mixture, tokenizer):
    pipeline = make(mixture, tokenizer, seed=2)
    batches, states, _ = run(pipeline, limit=3)
    with pipeline.iterator() as iterator:
        next(iterator)
        iterator.set_state(states[0])
        assert same_batches([next(iterator), next(iterator)], batches[1:3])
    with pytest.raises(ValueError, match="seed"):
        make(mixture, tokenizer, seed=3).iterator(states[0])


def test_endless_stream_and_length_grouped_order(mixture, tokenizer):
    endless, states, stats = run(make(mixture, tokenizer, num_epochs=0, megabatch_size=32,
                                      group_by_length=True), limit=12)
    assert len(endless) == 12 and states[-1]["fingerprint"]["group_by_length"]
    assert stats.samples > NUM_TRAIN  # Into the second epoch.
    plain, _, _ = run(make(mixture, tokenizer, num_epochs=0), limit=12)
    assert not same_batches(endless, plain)


def test_row_tile_cap_drops_samples_that_cannot_fit(mixture, tokenizer):
    pipeline = make(mixture, tokenizer, max_tiles_per_row=5)
    assert pipeline.tile_budget == 4 * 5
    batches, _, stats = run(pipeline)
    assert stats.dropped["too_many_tiles"] > 0
    assert stats.samples + stats.dropped["too_many_tiles"] == NUM_TRAIN
    assert all(batch["image_flags"].sum() <= 20 for batch in batches)


def test_bad_input_is_dropped_counted_and_logged(bad_meta, tokenizer, caplog):
    expected = json.loads((bad_meta.parent / "expected.json").read_text())
    mixture = open_meta(bad_meta, on_bad_line="skip")
    with caplog.at_level(logging.WARNING):
        _, _, stats = run(make(mixture, tokenizer, global_rows=2, max_pixels=BAD_SET_MAX_PIXELS))
    outcomes = collections.Counter(value for value in expected.values() if value != "bad_line")
    assert stats.samples == outcomes.pop("ok")
    assert dict(stats.dropped) == dict(outcomes)
    assert stats.truncated == 1
    for line, outcome in expected.items():
        if outcome not in ("ok", "bad_line"):
            assert f"bad.jsonl:{line}: {outcome}" in caplog.text


def test_bad_input_resampled_or_raised(bad_meta, tokenizer):
    mixture = open_meta(bad_meta, on_bad_line="skip")
    _, _, stats = run(make(mixture, tokenizer, global_rows=2, max_pixels=BAD_SET_MAX_PIXELS,
                           on_bad_sample="resample"))
    ok = sum(value == "ok" for value in json.loads((bad_meta.parent / "expected.json").read_text()).values())
    assert stats.resampled > 0 and stats.samples > ok
    with pytest.raises(SampleDrop, match=r"bad\.jsonl:3: placeholder_mismatch"):
        run(make(mixture, tokenizer, global_rows=2, on_bad_sample="raise", shuffle=False))


def test_image_switches_are_counted(bad_meta, tokenizer):
    mixture = open_meta(bad_meta, on_bad_line="skip")
    _, _, plain = run(make(mixture, tokenizer, global_rows=2, max_pixels=BAD_SET_MAX_PIXELS))
    _, _, switched = run(make(mixture, tokenizer, global_rows=2, max_pixels=BAD_SET_MAX_PIXELS,
                              exif_transpose=True, alpha_on_white=True))
    assert plain.images_changed == 0
    assert switched.images_changed == 2  # The EXIF-rotated and the RGBA image.
    # EXIF orientation can swap width and height, so annotated sizes are not used: the row with a
    # wrong annotated size is planned from its header and trained.
    assert switched.samples == plain.samples + 1 and "size_mismatch" not in switched.dropped


def test_augmentation_is_deterministic(tmp_path, synthetic_meta, tokenizer):
    meta = json.loads(synthetic_meta.read_text())
    for entry in meta.values():
        entry["data_augment"] = True
    augmented_meta = tmp_path / "meta.json"
    augmented_meta.write_text(json.dumps(meta))
    augmented = open_meta(augmented_meta)
    first, _, _ = run(make(augmented, tokenizer), limit=1)
    again, _, _ = run(make(augmented, tokenizer), limit=1)
    plain, _, _ = run(make(open_meta(synthetic_meta), tokenizer), limit=1)
    assert same_batches(first, again)
    assert np.array_equal(first[0]["input_ids"], plain[0]["input_ids"])
    assert not np.array_equal(first[0]["pixel_values"], plain[0]["pixel_values"])


def test_fast_tokenize_equals_preprocess(mixture, tokenizer):
    template = get_template(TINY_MODEL.template)
    for index in range(0, len(mixture), 5):
        conversations = mixture[index].conversations
        counts = [TOKENS_PER_TILE * (1 + index % 7)] * len(mixture[index].images)
        for max_length in (SEQ_LEN, 60, 40):
            try:
                expected = preprocess(conversations, tokenizer, template, counts, max_length)
            except SampleError as error:
                with pytest.raises(SampleError) as fast_error:
                    tokenize(conversations, tokenizer, template, counts, max_length)
                assert fast_error.value.reason == error.reason
                continue
            fast = tokenize(conversations, tokenizer, template, counts, max_length)
            assert all(np.array_equal(fast[name], expected[name]) for name in ("input_ids", "labels"))
            assert fast["truncated"] == expected["truncated"]


def fake(position, tokens, tiles=0):
    measured = Measured(np.zeros(tokens, np.int32), np.zeros(tokens, np.int32), (tiles,) if tiles else (), 6, False)
    return Planned(position, None, measured)


def test_first_fit_decreasing_packing():
    # 2048 tokens that fill four rows of 512 exactly when the longest go first.
    exact = [fake(position, tokens) for position, tokens in enumerate([300, 200, 212, 312, 100, 412, 512])]
    assert [[item.position for item in row] for row in pack(exact, seq_len=512, max_tiles=8)] == [
        [0, 2], [1, 3], [4, 5], [6]]
    sizes = [(300, 2), (120, 0), (200, 7), (480, 1), (90, 3), (200, 0), (40, 5), (512, 0), (30, 1)]
    rows = pack([fake(position, *size) for position, size in enumerate(sizes)], seq_len=512, max_tiles=8)
    assert sorted(item.position for row in rows for item in row) == list(range(len(sizes)))
    for row in rows:
        assert sum(item.measured.num_tokens for item in row) <= 512
        assert sum(item.measured.num_tiles for item in row) <= 8
        assert [item.position for item in row] == sorted(item.position for item in row)
    assert [row[0].position for row in rows] == sorted(row[0].position for row in rows)
    with pytest.raises(ValueError, match="exceeds a row"):
        pack([fake(0, 10, 9)], seq_len=512, max_tiles=8)


def test_unusable_data_stops_with_the_reasons():
    def always_bad(record):
        raise SampleDrop(record.where, "image_missing", "gone")

    stream = Stream(10, 0, seed=0, shuffle=False)
    planner = Planner(stream, lambda index: Record(f"f.jsonl:{index + 1}", 0, []), always_bad, window=4,
                      seq_len=8, max_tiles=1, on_bad_sample="skip", max_resample_tries=0, seed=0)
    with pytest.raises(ValueError, match="no usable sample in 12 consecutive samples.*image_missing"):
        planner.next_row()


def test_errors_cross_process_boundaries():
    drop = pickle.loads(pickle.dumps(SampleDrop("a.jsonl:3", "image_missing", "gone")))
    assert (drop.where, drop.reason, drop.detail, str(drop)) == ("a.jsonl:3", "image_missing", "gone",
                                                                 "a.jsonl:3: image_missing: gone")
    error = pickle.loads(pickle.dumps(DataError("a.jsonl:4", "invalid_json: x")))
    assert (error.where, str(error)) == ("a.jsonl:4", "a.jsonl:4: invalid_json: x")


def test_from_config(synthetic_meta, tokenizer_dir):
    config = load_config("tiny")
    data = DataConfig(meta_path=str(synthetic_meta), tokenizer_path=str(tokenizer_dir), num_workers=0, num_epochs=1)
    pipeline = DataPipeline.from_config(config, data, global_rows=4, process_index=1, process_count=2)
    assert (pipeline.rows, pipeline.seq_len, pipeline.tile_budget) == (2, config.train.max_seq_length, 2 * 32)
    assert pipeline.num_samples == NUM_TRAIN and pipeline.lengths is None
    with pytest.raises(ValueError, match="no tokenizer files"):
        DataPipeline.from_config(config, dataclasses.replace(data, tokenizer_path=str(synthetic_meta.parent)), 4)
    with pytest.raises(ValueError, match="multiple of the process count"):
        DataPipeline.from_config(config, data, global_rows=3, process_count=2)
