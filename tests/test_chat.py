"""`chat`, `batch_chat` and the command line, with a tiny SentencePiece tokenizer trained here.

Prompt construction is checked against hand-written spec strings (§8.2, §11) through a recording
stand-in for the generator; the tiny model then runs the real thing. Its prompts (one tile, the
default system message) land in the buckets test_generate.py already compiled (T=128, N=1 or 2).
"""
import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from conftest import IMG_CONTEXT_ID, REPO
from internvl_jax import chat as chat_lib
from internvl_jax.data.conversation import INTERNLM2_SYSTEM_MESSAGE, get_template, parse_response
from internvl_jax.data.tiling import tile_image, tiles_to_array
from internvl_jax.data.tokenizer import INTERNVL_TOKENS, load_tokenizer
from internvl_jax.models import generate as gen
from test_tokenizer import train_sentencepiece, write_checkpoint

MAX_NEW = 12
SEP = "<|im_end|>"
# A short system message that keeps both turns of the REPL test within the 128-token prompt bucket.
BRIEF = "You are a brief assistant."


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_config):
    """Covers all 1024 model ids: SentencePiece pieces, InternVL tokens from IMG_CONTEXT_ID on, and
    non-special fillers elsewhere, so whatever the random model produces decodes to text."""
    proto = train_sentencepiece(user_defined_symbols=["<|im_start|>", SEP])
    pieces = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    internvl = ["<IMG_CONTEXT>"] + [token for token in INTERNVL_TOKENS if token != "<IMG_CONTEXT>"]
    added = {token: IMG_CONTEXT_ID + i for i, token in enumerate(internvl)}
    fillers = {f"<x{i}>": i for i in range(pieces, tiny_config.llm.vocab_size) if i not in added.values()}
    return write_checkpoint(tmp_path_factory.mktemp("tokenizer"), proto, added | fillers,
                            flags={token: {"special": False} for token in fillers})


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def image():
    """A 56×56 image: one tile at the tiny config's size."""
    pixels = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def spec_prompt(turns, images=(), system=INTERNLM2_SYSTEM_MESSAGE):
    """§8.2 by hand: turns = [(question, answer or None)], `images` = context tokens per <image>."""
    text = f"<|im_start|>system\n{system}{SEP}"
    for question, answer in turns:
        text += f"<|im_start|>user\n{question}{SEP}<|im_start|>assistant\n"
        if answer is not None:
            text += answer + SEP
    for count in images:
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * count + "</img>", 1)
    return text


@pytest.fixture
def recorded(monkeypatch, tokenizer):
    """Replaces the generator: records its arguments and produces `answer<|im_end|>trailing`."""
    calls = []

    def fake_stream(model, prompts, tiles, *, stop_ids, config, mesh, chunk):
        calls.append(dict(prompts=prompts, tiles=tiles, stop_ids=stop_ids, config=config))
        yield [tokenizer.encode(" the cat sat" + SEP + " ignored", add_bos=False)] * len(prompts)

    monkeypatch.setattr(chat_lib, "stream_generate", fake_stream)
    return calls


def test_first_turn_and_history_follow_the_official_template(tiny_model, tiny_config, tokenizer, image, recorded):
    answer, history = chat_lib.chat(tiny_model, tokenizer, tiny_config, image, "describe the picture")
    assert answer == "the cat sat"
    assert history == [("<image>\ndescribe the picture", "the cat sat")]
    call = recorded[-1]
    assert call["prompts"] == [tokenizer.encode(spec_prompt([("<image>\ndescribe the picture", None)], [16]))]
    assert call["stop_ids"] == [tokenizer.token_to_id(SEP)]
    np.testing.assert_array_equal(call["tiles"][0], tiles_to_array(tile_image(image, 1, 6, True, 56)))

    # Second turn: no new <image>; the first question's image is expanded again.
    _, history = chat_lib.chat(tiny_model, tokenizer, tiny_config, image, "and the colour?", history,
                               {"max_new_tokens": 7, "do_sample": False, "num_beams": 1})
    assert recorded[-1]["prompts"] == [tokenizer.encode(spec_prompt(
        [("<image>\ndescribe the picture", "the cat sat"), ("and the colour?", None)], [16]))]
    assert recorded[-1]["config"] == gen.GenerationConfig(max_new_tokens=7)
    assert history[-1] == ("and the colour?", "the cat sat")
    with pytest.raises(ValueError, match="pass the conversation's images again on every turn"):
        chat_lib.chat(tiny_model, tokenizer, tiny_config, None, "and then?", history)

    # Text only, and a caller-placed <image> is not doubled.
    chat_lib.chat(tiny_model, tokenizer, tiny_config, None, "hello", system_message=BRIEF)
    assert recorded[-1]["prompts"] == [tokenizer.encode(spec_prompt([("hello", None)], system=BRIEF))]
    assert recorded[-1]["tiles"] == [None]
    chat_lib.chat(tiny_model, tokenizer, tiny_config, image, "look: <image> what?")
    assert recorded[-1]["prompts"] == [tokenizer.encode(spec_prompt([("look: <image> what?", None)], [16]))]


def test_multi_image_prompts_and_tile_budget(tiny_model, tiny_config, tokenizer, image, recorded):
    wide = image.resize((112, 56))
    tiles, patches = chat_lib.tile_images([image, wide], tiny_config)
    assert patches == [1, 3] and tiles.shape == (4, 56, 56, 3)  # the wide one: 2×1 grid + thumbnail
    assert chat_lib.tile_images([wide], tiny_config, max_tiles=1)[1] == [1]

    question = "Image-1: <image>\nImage-2: <image>\nCompare."
    chat_lib.chat(tiny_model, tokenizer, tiny_config, tiles, question, num_patches_list=patches)
    assert recorded[-1]["prompts"] == [tokenizer.encode(spec_prompt([(question, None)], [16, 48]))]
    chat_lib.chat(tiny_model, tokenizer, tiny_config, [image, wide], question)  # images are tiled alike
    np.testing.assert_array_equal(recorded[-1]["tiles"][0], tiles)

    with pytest.raises(ValueError, match="one <image> per image"):
        chat_lib.chat(tiny_model, tokenizer, tiny_config, tiles, "Compare.", num_patches_list=patches)
    with pytest.raises(ValueError, match="sums to 3, but there are 4 tiles"):
        chat_lib.chat(tiny_model, tokenizer, tiny_config, tiles, question, num_patches_list=[1, 2])
    with pytest.raises(ValueError, match="num_beams=4"):
        chat_lib.chat(tiny_model, tokenizer, tiny_config, None, "hi", generation_config={"num_beams": 4})


def test_batch_chat_forms(tiny_model, tiny_config, tokenizer, image, recorded):
    tiles = chat_lib.tile_images([image], tiny_config)[0]
    questions = ["what is it?", "Image: <image> colour?"]
    answers = chat_lib.batch_chat(tiny_model, tokenizer, tiny_config, np.concatenate([tiles, tiles]), questions,
                                  num_patches_list=[1, 1])
    assert answers == ["the cat sat"] * 2
    official = recorded[-1]
    assert official["prompts"] == [tokenizer.encode(spec_prompt([("<image>\nwhat is it?", None)], [16])),
                                   tokenizer.encode(spec_prompt([(questions[1], None)], [16]))]
    chat_lib.batch_chat(tiny_model, tokenizer, tiny_config, [image, tiles], questions)
    assert recorded[-1]["prompts"] == official["prompts"]
    np.testing.assert_array_equal(recorded[-1]["tiles"][0], tiles)
    chat_lib.batch_chat(tiny_model, tokenizer, tiny_config, [None, image], ["hi", questions[1]])
    assert recorded[-1]["tiles"][0] is None
    with pytest.raises(ValueError, match="image_counts"):
        chat_lib.batch_chat(tiny_model, tokenizer, tiny_config, tiles, questions, num_patches_list=[1])


def test_streaming_text_holds_back_partial_characters():
    shown = []
    state = chat_lib._stream_text("  the", "", shown.append)
    state = chat_lib._stream_text("  the ca\ufffd", state, shown.append)
    state = chat_lib._stream_text("  the caé", state, shown.append)
    assert shown == ["the", " ca", "é"] and state == "the caé"


def test_chat_with_the_tiny_model(tiny_model, tiny_config, tokenizer, image):
    config = {"max_new_tokens": MAX_NEW}
    tiles = chat_lib.tile_images([image], tiny_config)[0]
    ids = tokenizer.encode(spec_prompt([("<image>\nwhat is it?", None)], [16]))
    [direct] = gen.generate(tiny_model, [ids], [tiles], stop_ids=[tokenizer.token_to_id(SEP)], config=config)
    pieces = []
    answer, _ = chat_lib.chat(tiny_model, tokenizer, tiny_config, image, "what is it?", None, config,
                              streamer=pieces.append)
    assert answer == parse_response(get_template("internlm2-chat"), tokenizer.decode(direct)) != ""
    assert len(pieces) > 1 and "".join(pieces).strip() == answer

    questions = ["what is it?", "describe the picture"]
    batched = chat_lib.batch_chat(tiny_model, tokenizer, tiny_config, [image, image], questions, config)
    assert batched == [chat_lib.chat(tiny_model, tokenizer, tiny_config, image, q, None, config)[0]
                       for q in questions]


def test_repl_streams_a_multi_turn_conversation(tiny_model, tiny_config, tokenizer, image):
    config = gen.GenerationConfig(max_new_tokens=MAX_NEW)
    tiles, patches = chat_lib.tile_images([image], tiny_config)
    output = io.StringIO()
    lines = ["what is it?", "", "and then?", "/reset", "what is it?", "/exit", "never read"]
    chat_lib.run_repl(tiny_model, tokenizer, tiny_config, tiles, patches, config, lines, output,
                      system_message=BRIEF)
    first, history = chat_lib.chat(tiny_model, tokenizer, tiny_config, tiles, "what is it?", None, config,
                                   system_message=BRIEF)
    second, _ = chat_lib.chat(tiny_model, tokenizer, tiny_config, tiles, "and then?", history, config,
                              system_message=BRIEF)
    replies = [line.removeprefix("Assistant: ").strip() for line in output.getvalue().splitlines()
               if line.startswith("Assistant: ")]
    assert replies == [first, second, first] and "[new conversation]" in output.getvalue()


def test_command_line_chat(tmp_path, tiny_model, tokenizer, image):
    export = pytest.importorskip("internvl_jax.convert.export", reason="checkpoint export not available")
    checkpoint = export.export_model(tiny_model, tmp_path / "ckpt", tokenizer=tokenizer)
    image.save(tmp_path / "image.png")
    # The child shares this process's compilation cache: its one-turn prompt is in a bucket compiled here.
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    command = [sys.executable, "-m", "internvl_jax.chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "4"]
    result = subprocess.run(command + ["--image", str(tmp_path / "image.png")], input="what is it?\n",
                            capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Assistant: ") and result.stdout.count("Assistant: ") == 1
    assert "tiles per image [1]" in result.stderr



def test_command_line_rejects_a_missing_image_before_loading(tmp_path, capsys):
    assert chat_lib.main(["--checkpoint", str(tmp_path / "none"), "--image", str(tmp_path / "nope.png")]) == 2
    assert "nope.png: missing" in capsys.readouterr().err
