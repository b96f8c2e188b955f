"""Shared data-pipeline fixtures: a tiny tokenizer, the synthetic VQA set, a set of bad rows.

Import the fixtures into a test module (``from data_fixtures import ...``). The artefacts are
built once per session even when several modules import the fixtures (pytest would otherwise
build a session fixture once per importing module).
"""
import io
import json
import pathlib

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from internvl_jax.config import load_config
from internvl_jax.data import synthetic
from internvl_jax.data.config import DataConfig
from internvl_jax.data.conversation import INTERNLM2_SYSTEM_MESSAGE
from internvl_jax.data.samples import SampleSpec
from internvl_jax.data.tokenizer import INTERNVL_TOKENS, TEMPLATE_TOKENS, load_tokenizer

# The tiny model (configs/tiny.py): 56-px tiles, 16 tokens per tile, 1..6 tiles, T = 512.
TINY_MODEL = load_config("tiny").model
SEQ_LEN = 512
BAD_SET_MAX_PIXELS = 16_000_000
TINY_SPEC = SampleSpec.from_configs(TINY_MODEL, SEQ_LEN, DataConfig())
NUM_TRAIN = 96
_built: dict[str, pathlib.Path] = {}


def _once(name, tmp_path_factory, build):
    if name not in _built:
        _built[name] = build(tmp_path_factory.mktemp(name))
    return _built[name]


def _write_tokenizer(directory: pathlib.Path) -> pathlib.Path:
    """A BPE model trained on the synthetic questions and answers (toolchain.md §8 settings)."""
    corpus = [INTERNLM2_SYSTEM_MESSAGE, "user assistant system"]
    for qtype in synthetic.QUESTION_TYPES:
        corpus += [qtype.question.format(first=1, second=2)] + list(qtype.answers)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 20), model_writer=buffer, model_type="bpe", vocab_size=400,
        user_defined_symbols=list(TEMPLATE_TOKENS + INTERNVL_TOKENS), byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True, num_threads=1,
        minloglevel=2, hard_vocab_limit=False)
    (directory / "tokenizer.model").write_bytes(buffer.getvalue())
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    return _once("tokenizer", tmp_path_factory, _write_tokenizer)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def synthetic_meta(tmp_path_factory) -> pathlib.Path:
    """Meta file of a 96-sample synthetic training set with 64..448-px images."""
    return _once("synthetic", tmp_path_factory,
                 lambda out: synthetic.write_synthetic_vqa(out, NUM_TRAIN, 6, seed=0, image_sizes=(64, 448)))


def turns(question: str, answer: str = "red") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _save(image: Image.Image, path: pathlib.Path, **options) -> str:
    image.save(path, **options)
    return path.name


def _write_bad_set(out: pathlib.Path) -> pathlib.Path:
    """One row per case of issue item 6, plus good rows; ``expected.json`` maps line → outcome.

    Outcomes: "ok" (trained), a drop reason, or "bad_line" (does not parse).
    """
    images = out / "images"
    images.mkdir()
    rgb = Image.new("RGB", (300, 200), (200, 30, 30))
    good = _save(rgb, images / "good.png")
    jpeg = io.BytesIO()
    rgb.save(jpeg, format="JPEG")
    (images / "truncated.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (images / "garbage.jpg").write_bytes(b"not an image at all")
    rotated = Image.new("RGB", (320, 160), (10, 200, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rows = [
        ({"image": good, "conversations": turns("<image>\nWhat colour?")}, "ok"),
        ('{"image": "good.png", "conversations": [', "bad_line"),
        ({"image": good, "conversations": turns("<image><image>\nTwo?")}, "placeholder_mismatch"),
        ({"image": "absent.png", "conversations": turns("<image>\nWhere?")}, "image_missing"),
        ({"image": "corrupt.png", "conversations": turns("<image>\nWhat?")}, "image_unreadable"),
        ({"image": "garbage.jpg", "conversations": turns("<image>\nWhat?")}, "image_corrupt"),
        ({"image": "truncated.jpg", "conversations": turns("<image>\nWhat?")}, "image_truncated"),
        ({"image": good, "conversations": [{"from": "human", "value": "<image>\nNo answer"}]}, "no_assistant_turn"),
        ({"image": good, "conversations": turns("many words " * 400 + "<image>")}, "image_tokens_truncated"),
        # Over-long, but the cut keeps the first answer: trained, truncated.
        ({"conversations": turns("Q?", "A.") + turns("Only text, " * 300)}, "ok"),
        ({"image": _save(Image.new("CMYK", (120, 90), (0, 200, 200, 0)), images / "cmyk.jpg"),
          "conversations": turns("<image>\nCMYK?")}, "ok"),
        ({"image": _save(Image.new("RGBA", (90, 120), (0, 0, 255, 100)), images / "rgba.png"),
          "conversations": turns("<image>\nRGBA?")}, "ok"),
        ({"image": _save(Image.new("P", (60, 60), 3), images / "palette.png"),
          "conversations": turns("<image>\nPalette?")}, "ok"),
        ({"image": _save(Image.fromarray(np.full((50, 70), 40000, np.uint16)), images / "sixteen.png"),
          "conversations": turns("<image>\n16 bit?")}, "ok"),
        ({"image": _save(rotated, images / "rotated.jpg", exif=exif), "conversations": turns("<image>\nRotated?")},
         "ok"),
        ({"image": _save(Image.new("RGB", (1, 10000), (9, 9, 9)), images / "thin.png"),
          "conversations": turns("<image>\nThin?")}, "ok"),
        # Declares 5000 × 4000 = 20 Mpx: above the tests' 16 Mpx limit, never decoded.
        ({"image": _save(Image.new("L", (5000, 4000)), images / "bomb.png"), "conversations": turns("<image>\nBig?")},
         "image_too_many_pixels"),
        ({"image": good, "width": 100, "height": 100, "conversations": turns("<image>\nSize?")}, "size_mismatch"),
    ]
    lines = [row if isinstance(row, str) else json.dumps(row) for row, _ in rows]
    (out / "bad.jsonl").write_text("\n".join(lines) + "\n")
    (out / "expected.json").write_text(json.dumps({str(i + 1): outcome for i, (_, outcome) in enumerate(rows)}))
    meta = out / "meta.json"
    meta.write_text(json.dumps({"bad": {"root": "images", "annotation": "bad.jsonl", "repeat_time": 1}}))
    return meta


@pytest.fixture(scope="session")
def bad_meta(tmp_path_factory) -> pathlib.Path:
    """Meta file of the bad-input set; ``expected.json`` beside it lists each line's outcome."""
    return _once("bad", tmp_path_factory, _write_bad_set)

