"""Synthetic VQA generator: determinism, official format, closed answer sets, chance levels."""
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from internvl_jax.data import synthetic, tiling

SMALL_SIZES = (64, 160)
TYPE_NAMES = {qtype.name for qtype in synthetic.QUESTION_TYPES}


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def file_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    meta_path = synthetic.write_synthetic_vqa(out, num_train=48, num_test=18, seed=11)
    return out, meta_path


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    out = tmp_path / "data"
    synthetic.write_synthetic_vqa(out, 14, 7, seed=5, image_sizes=SMALL_SIZES)
    first = file_bytes(out)
    for path in out.rglob("*"):
        if path.is_file():
            path.unlink()
    synthetic.write_synthetic_vqa(out, 14, 7, seed=5, image_sizes=SMALL_SIZES)
    assert file_bytes(out) == first

    other = tmp_path / "other"
    synthetic.write_synthetic_vqa(other, 14, 7, seed=6, image_sizes=SMALL_SIZES)
    assert file_bytes(other)["train.jsonl"] != first["train.jsonl"]


def test_output_does_not_depend_on_folder_except_meta_paths(tmp_path):
    synthetic.write_synthetic_vqa(tmp_path / "a", 8, 6, seed=2, image_sizes=SMALL_SIZES)
    synthetic.write_synthetic_vqa(tmp_path / "b", 8, 6, seed=2, image_sizes=SMALL_SIZES)
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert a.keys() == b.keys()
    assert {k for k in a if a[k] != b[k]} == {"meta_train.json", "meta_test.json"}


def test_more_samples_only_append(tmp_path):
    synthetic.write_synthetic_vqa(tmp_path / "few", 9, 6, seed=4, image_sizes=SMALL_SIZES)
    synthetic.write_synthetic_vqa(tmp_path / "many", 20, 6, seed=4, image_sizes=SMALL_SIZES)
    few = read_jsonl(tmp_path / "few" / "train.jsonl")
    many = read_jsonl(tmp_path / "many" / "train.jsonl")
    assert many[:9] == few
    for row in few:
        if "image" in row:
            rel = pathlib.Path("images") / row["image"]
            assert (tmp_path / "few" / rel).read_bytes() == (tmp_path / "many" / rel).read_bytes()


def test_meta_files_follow_official_format(dataset):
    out, meta_path = dataset
    assert meta_path == out.resolve() / "meta_train.json"
    for split, length in (("train", 48), ("test", 18)):
        meta = json.loads((out / f"meta_{split}.json").read_text())
        assert list(meta) == [f"synthetic_vqa_{split}"]
        entry = meta[f"synthetic_vqa_{split}"]
        assert set(entry) == {"root", "annotation", "data_augment", "repeat_time", "length"}
        assert pathlib.Path(entry["root"]).is_dir()
        assert entry["annotation"].endswith(".jsonl")
        assert len(read_jsonl(entry["annotation"])) == entry["length"] == length
        assert entry["data_augment"] is False and entry["repeat_time"] == 1


@pytest.mark.parametrize("split", ["train", "test"])
def test_jsonl_rows_are_valid(dataset, split):
    out, _ = dataset
    root = pathlib.Path(json.loads((out / f"meta_{split}.json").read_text())
                        [f"synthetic_vqa_{split}"]["root"])
    rows = read_jsonl(out / f"{split}.jsonl")
    assert len({row["id"] for row in rows}) == len(rows)
    for row in rows:
        turns = row["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"]
        assert all(isinstance(t["value"], str) and t["value"] for t in turns)
        placeholders = sum(t["value"].count("<image>") for t in turns)
        if "image" in row:
            assert placeholders == 1 and turns[0]["value"].startswith("<image>\n")
            with Image.open(root / row["image"]) as image:
                assert image.size == (row["width"], row["height"])
                assert image.format in ("PNG", "JPEG") and image.mode == "RGB"
        else:
            assert placeholders == 0 and "width" not in row and "height" not in row


def test_every_question_type_in_both_splits_with_counts_recorded(dataset):
    out, _ = dataset
    info = json.loads((out / "synthetic_meta.json").read_text())
    for split in ("train", "test"):
        rows = read_jsonl(out / f"{split}.jsonl")
        counts = {name: sum(row["question_type"] == name for row in rows) for name in TYPE_NAMES}
        assert all(count > 0 for count in counts.values()), counts
        assert info["splits"][split]["per_type"] == counts
        assert info["splits"][split]["num_samples"] == len(rows)


def test_answers_in_closed_sets_and_chance_levels_listed(dataset):
    out, _ = dataset
    info = json.loads((out / "synthetic_meta.json").read_text())
    types = info["question_types"]
    assert set(types) == TYPE_NAMES
    for name, entry in types.items():
        assert entry["chance"] == pytest.approx(1 / len(entry["answers"]))
        assert len(set(entry["answers"])) == len(entry["answers"])
    assert types["arithmetic"]["has_image"] is False
    for split in ("train", "test"):
        for row in read_jsonl(out / f"{split}.jsonl"):
            entry = types[row["question_type"]]
            answer = row["conversations"][1]["value"]
            assert answer in entry["answers"]
            assert len(answer.split()) == 1
            assert ("image" in row) == entry["has_image"]


def test_arithmetic_answers_are_correct(dataset):
    out, _ = dataset
    for row in read_jsonl(out / "train.jsonl"):
        if row["question_type"] == "arithmetic":
            question, answer = (t["value"] for t in row["conversations"])
            first, second = question.removeprefix("What is ").split("?")[0].split(" + ")
            assert int(first) + int(second) == int(answer)


def test_red_circle_is_in_the_answered_quadrant(dataset):
    out, _ = dataset
    checked = 0
    for row in read_jsonl(out / "train.jsonl") + read_jsonl(out / "test.jsonl"):
        if row["question_type"] != "position":
            continue
        with Image.open(out / "images" / row["image"]) as image:
            pixels = np.asarray(image.convert("RGB")).astype(int)
        red = (pixels[..., 0] > 170) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
        ys, xs = np.nonzero(red)
        vertical = "top" if ys.mean() < row["height"] / 2 else "bottom"
        horizontal = "left" if xs.mean() < row["width"] / 2 else "right"
        assert f"{vertical}-{horizontal}" == row["conversations"][1]["value"], row["id"]
        checked += 1
    assert checked >= 4


def test_word_is_centred_and_large(dataset):
    out, _ = dataset
    for row in read_jsonl(out / "train.jsonl"):
        if row["question_type"] != "word":
            continue
        with Image.open(out / "images" / row["image"]) as image:
            gray = np.asarray(image.convert("L"))
        ys, xs = np.nonzero(gray < 160)
        # The glyph box spans 90 % of the width or 80 % of the height; the ink starts a few pixels in.
        assert (xs.max() - xs.min() + 1 >= 0.8 * row["width"]
                or ys.max() - ys.min() + 1 >= 0.6 * row["height"]), row["id"]
        assert abs((xs.max() + xs.min()) / 2 - row["width"] / 2) <= 0.1 * row["width"], row["id"]
        assert abs((ys.max() + ys.min()) / 2 - row["height"] / 2) <= 0.15 * row["height"], row["id"]


@pytest.mark.parametrize("num_objects", [1, 3, 6])
@pytest.mark.parametrize("sizes", [(48, 896), (48, 48)])
def test_scenes_have_disjoint_objects_inside_the_image_and_one_clear_largest(num_objects, sizes):
    for seed in range(60):
        rng = np.random.default_rng(seed)
        width, height = synthetic._sample_size(rng, *sizes)
        objects = synthetic._scene(rng, width, height, num_objects)
        assert len(objects) == num_objects
        for index, item in enumerate(objects):
            assert item.shape in synthetic.SHAPES and item.colour in synthetic.COLOURS
            assert item.radius <= item.x <= width - item.radius
            assert item.radius <= item.y <= height - item.radius
            for other in objects[index + 1:]:
                assert math.hypot(item.x - other.x, item.y - other.y) >= item.radius + other.radius
            if index:
                assert item.radius <= 0.5 * objects[0].radius


def test_default_sizes_make_tiling_matter(dataset):
    out, _ = dataset
    sizes = [(row["width"], row["height"])
             for row in read_jsonl(out / "train.jsonl") if "image" in row]
    assert min(min(s) for s in sizes) >= 64 and max(max(s) for s in sizes) <= 896
    grids = [tiling.choose_grid(width, height, 1, 12) for width, height in sizes]
    assert any(cols > rows for cols, rows in grids) and any(rows > cols for cols, rows in grids)
    assert len({cols * rows for cols, rows in grids}) >= 4


@pytest.mark.parametrize("max_aspect", [1.0, 2.0])
def test_max_aspect_bounds_the_sides(max_aspect):
    for seed in range(200):
        width, height = synthetic._sample_size(np.random.default_rng(seed), 64, 224, max_aspect)
        assert max(width, height) / min(width, height) <= max_aspect * 1.02, (seed, width, height)


def test_type_weights_repeat_a_type_in_the_training_split_only(tmp_path):
    default = [qtype.name for qtype in synthetic._type_schedule(3, 0, 12)]
    assert sorted(default[:6]) == sorted(default[6:]) == sorted(TYPE_NAMES)  # unweighted: one each per block
    weighted = [qtype.name for qtype in synthetic._type_schedule(3, 0, 16, {"word": 3})]
    assert weighted.count("word") == 6 and all(weighted.count(name) == 2 for name in TYPE_NAMES - {"word"})
    synthetic.write_synthetic_vqa(tmp_path, 16, 6, seed=3, image_sizes=SMALL_SIZES, train_type_weights={"word": 3})
    meta = json.loads((tmp_path / "synthetic_meta.json").read_text())
    assert meta["splits"]["train"]["per_type"]["word"] == 6
    assert set(meta["splits"]["test"]["per_type"].values()) == {1}
    assert meta["train_type_weights"] == {name: 3 if name == "word" else 1 for name in meta["question_types"]}


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        synthetic.write_synthetic_vqa(tmp_path, 1, 1, seed=0, image_sizes=(40, 100))
    with pytest.raises(ValueError):
        synthetic.write_synthetic_vqa(tmp_path, 1, 1, seed=-1)
    with pytest.raises(ValueError, match="max_aspect"):
        synthetic.write_synthetic_vqa(tmp_path, 1, 1, seed=0, max_aspect=0.5)
    with pytest.raises(ValueError, match="unknown question type 'words'"):
        synthetic.write_synthetic_vqa(tmp_path, 1, 1, seed=0, train_type_weights={"words": 3})
    with pytest.raises(ValueError, match="'word' must be an int >= 1"):
        synthetic.write_synthetic_vqa(tmp_path, 1, 1, seed=0, train_type_weights={"word": 0})


def test_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "internvl_jax.data.synthetic", "--out", str(tmp_path / "cli"),
         "--train", "7", "--test", "6", "--seed", "1", "--min-size", "64", "--max-size", "128",
         "--train-type-weights", "word=2"],
        capture_output=True, text=True, check=True, timeout=60)
    meta_path = pathlib.Path(result.stdout.strip())
    assert meta_path == (tmp_path / "cli" / "meta_train.json").resolve()
    assert len(read_jsonl(tmp_path / "cli" / "test.jsonl")) == 6
    assert json.loads((tmp_path / "cli" / "synthetic_meta.json").read_text())["train_type_weights"]["word"] == 2
