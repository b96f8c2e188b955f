"""Meta files, JSONL parsing with file:line errors, TFDS array_record sources, length-grouped order."""
import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_fixtures import TINY_SPEC, bad_meta, tokenizer, tokenizer_dir, turns  # noqa: F401 (fixtures)
from internvl_jax.data import sources
from internvl_jax.data.samples import load_tiles, measure
from internvl_jax.data.sources import DataError, Record, open_meta, parse_record


def write_meta(path, entries):
    path.write_text(json.dumps(entries))
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_meta_fields_paths_and_repeat_time(tmp_path):
    (tmp_path / "ann").mkdir()
    write_jsonl(tmp_path / "ann" / "a.jsonl", [{"image": f"{i}.png", "conversations": turns("<image>\nq")}
                                               for i in range(4)])
    write_jsonl(tmp_path / "ann" / "b.jsonl", [{"conversations": turns(f"text {i}")} for i in range(3)])
    meta = write_meta(tmp_path / "meta.json", {
        "half": {"root": "imgs", "annotation": "ann/a.jsonl", "repeat_time": 0.5, "max_dynamic_patch": 4,
                 "data_augment": True},
        "twice": {"root": "", "annotation": str(tmp_path / "ann" / "b.jsonl"), "repeat_time": 2, "length": 3},
    })
    mixture = open_meta(meta)
    half, twice = mixture.specs
    assert (half.max_dynamic_patch, half.data_augment, twice.max_dynamic_patch, twice.length) == (4, True, None, 3)
    assert len(mixture) == 2 + 6
    # Relative paths are relative to the meta file's folder; < 1 keeps the first lines, 2 repeats.
    assert mixture[0].images == (str(tmp_path / "imgs" / "0.png"),)
    assert mixture[1].where == f"{tmp_path / 'ann' / 'a.jsonl'}:2"
    assert [mixture[i].conversations[0]["value"] for i in range(2, 8)] == [f"text {i}" for i in (0, 1, 2) * 2]
    assert mixture[5].dataset == 1 and mixture[5].images == ()
    with pytest.raises(IndexError):
        mixture[8]


@pytest.mark.parametrize("content, message", [
    (None, "meta file not found"),
    ("{not json", "not valid JSON"),
    ({"x": {"annotation": "a.json"}}, "annotation must be the path of a .jsonl file"),
    ({"x": {"annotation": "a.jsonl", "repeat_time": 1.5}}, "repeat_time above 1 must be a whole number"),
    ({"x": {"annotation": "a.jsonl", "repeat_time": 0}}, "repeat_time must be a positive number"),
    ({"x": {"annotation": "a.jsonl", "max_dynamic_patch": 0}}, "max_dynamic_patch must be a positive integer"),
    ({"x": {"annotation": "absent.jsonl"}}, "annotation file of data set 'x' not found"),
])
def test_meta_errors_name_the_file(tmp_path, content, message):
    meta = tmp_path / "meta.json"
    if content is not None:
        meta.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=message) as error:
        open_meta(meta)
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("line, reason", [
    ('{"conversations": [', "invalid_json"),
    ("[1, 2]", "not_an_object"),
    ('{"image": "a.png"}', "no_conversations"),
    ('{"image": 3, "conversations": [{}]}', "bad_image"),
    ('{"image": ["a.png", ""], "conversations": [{}]}', "bad_image"),
    ('{"image": "a.png", "width": 0, "height": 5, "conversations": [{}]}', "bad_size"),
    ('{"image": ["a", "b"], "width_list": [1], "height_list": [1], "conversations": [{}]}', "bad_size"),
    ('{"conversations": [{}], "length": -1}', "bad_length"),
    ('{"video": "v.mp4", "conversations": [{}]}', "video"),
])
def test_bad_lines_name_file_line_and_reason(line, reason):
    with pytest.raises(DataError, match=f"^data.jsonl:7: {reason}: "):
        parse_record(line, "data.jsonl:7")


def test_record_fields():
    single = parse_record(json.dumps({"image": "a.png", "width": 30, "height": 20, "length": 9,
                                      "conversations": turns("q")}), "f:1", root="/r")
    assert (single.images, single.sizes, single.length) == (("/r/a.png",), ((30, 20),), 9)
    multi = parse_record(json.dumps({"image": ["a.png", "gs://b/c.png"], "width_list": [1, 2],
                                     "height_list": [3, 4], "conversations": turns("q")}), "f:2", root="/r")
    assert multi.images == ("/r/a.png", "gs://b/c.png") and multi.sizes == ((1, 3), (2, 4))
    for text_only in ({}, {"image": ""}, {"image": []}, {"image": None}):
        record = parse_record(json.dumps({**text_only, "conversations": turns("q")}), "f:3")
        assert record.images == () and record.sizes == ()
    assert parse_record(json.dumps({"image": "a.png", "conversations": turns("q")}), "f:4").sizes == (None,)
    remote = parse_record(json.dumps({"image": "x/a.png", "conversations": turns("q")}), "f:5", root="gs://b/imgs")
    assert remote.images == ("gs://b/imgs/x/a.png",)


def test_malformed_line_raises_or_is_skipped(bad_meta):
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid_json: "):
        open_meta(bad_meta)
    expected = json.loads((bad_meta.parent / "expected.json").read_text())
    mixture = open_meta(bad_meta, on_bad_line="skip")
    assert [line.where.rsplit(":", 1)[1] for line in mixture.bad_lines] == ["2"]
    assert len(mixture) == len(expected) - 1
    assert mixture[1].where.endswith("bad.jsonl:3")


def test_estimate_length(tokenizer):
    text = parse_record(json.dumps({"conversations": turns("hello", "red")}), "f:1")
    assert sources.estimate_length(text, tokenizer, 16, 6, True) == len(tokenizer.encode("hello\nred"))
    image = parse_record(json.dumps({"image": "a.png", "conversations": turns("hello", "red")}), "f:2")
    assert sources.estimate_length(image, tokenizer, 16, 6, True) == len(tokenizer.encode("hello\nred")) + 16 * 7
    given = parse_record(json.dumps({"image": "a.png", "length": 5, "conversations": turns("q")}), "f:3")
    assert sources.estimate_length(given, tokenizer, 16, 6, True) == 5


def test_length_grouped_order():
    lengths = np.random.default_rng(0).integers(1, 1000, 103)
    order = sources.length_grouped_order(lengths, 16, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(103))
    for start in range(0, 103, 16):
        group = lengths[order[start:start + 16]]
        assert (np.diff(group) <= 0).all()
    # Dealt to 4 consumers: equal counts, each chunk's lengths still descending.
    dealt = sources.length_grouped_order(lengths[:96], 16, np.random.default_rng(1), num_chunks=4)
    assert sorted(dealt.tolist()) == list(range(96))
    assert all((np.diff(lengths[dealt[i:i + 4]]) <= 0).all() for i in range(0, 96, 4))
    assert not np.array_equal(sources.epoch_order(103, 0, 0, True), sources.epoch_order(103, 1, 0, True))
    assert np.array_equal(sources.epoch_order(5, 3, 0, False), np.arange(5))


def _png(width, height, colour):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


CONVERSATION = json.dumps(turns("<image>\nWhat colour?"))


class TinyVqa(tfds.core.GeneratorBasedBuilder):
    """Single-image samples; the Image feature is read back as encoded bytes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "conversations": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png")}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(4):
            yield i, {"conversations": CONVERSATION, "image": _png(100 + 60 * i, 90, (40 * i, 90, 200))}


class TinyMultiVqa(tfds.core.GeneratorBasedBuilder):
    """Zero to two images per sample; a Sequence of Images is decoded by TFDS."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "conversations": tfds.features.Text(),
            "image": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3), encoding_format="png"))}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(3):
            conversation = json.dumps(turns("<image>" * i + "\nHow many?", str(i)))
            yield i, {"conversations": conversation, "image": [_png(50 + 30 * k, 70, (9, 9, 9)) for k in range(i)]}


def test_tfds_array_record_source(tmp_path, tokenizer):
    for builder in (TinyVqa, TinyMultiVqa):
        builder(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    meta = write_meta(tmp_path / "meta.json", {
        "single": {"tfds": {"name": "tiny_vqa", "split": "train", "data_dir": "tfds"}, "repeat_time": 1},
        "multi": {"tfds": {"name": "tiny_multi_vqa", "split": "train", "data_dir": "tfds"}},
    })
    mixture = open_meta(meta)
    assert len(mixture) == 4 + 3
    seen = []
    for index in range(len(mixture)):
        record = mixture[index]
        assert record.where.startswith("tfds:tiny_")
        measured = measure(record, TINY_SPEC, tokenizer, max_tiles=6)
        tiles, _ = load_tiles(record, measured, TINY_SPEC)
        assert len(tiles) == measured.num_tiles
        if record.dataset == 0:
            assert isinstance(record.images[0], bytes)
            # The same image as a file gives the same tokens and tiles.
            path = tmp_path / f"{index}.png"
            path.write_bytes(record.images[0])
            from_file = Record("f:1", 0, record.conversations, (str(path),), (None,))
            expected = measure(from_file, TINY_SPEC, tokenizer, max_tiles=6)
            assert np.array_equal(expected.input_ids, measured.input_ids)
            assert np.array_equal(load_tiles(from_file, expected, TINY_SPEC)[0], tiles)
        else:
            seen.append(len(record.images))
            assert all(isinstance(image, np.ndarray) for image in record.images)
    assert sorted(seen) == [0, 1, 2]
    with pytest.raises(DataError, match="cannot open the TFDS data set"):
        len(sources.TfdsSource(sources.DatasetSpec("x", tfds={"name": "absent_set", "data_dir": str(tmp_path)})))
