"""load_pretrained: tokenizer ids read from the checkpoint, no-tokenizer folders, meshes, and the CLI."""
import io
import json
import logging
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx

import internvl_jax
from internvl_jax.config import MeshConfig
from internvl_jax.convert.__main__ import main as convert_main
from internvl_jax.convert.checkpoint import CheckpointReader
from internvl_jax.convert.load import load_state, read_config
from internvl_jax.sharding import make_mesh, state_shardings

# The nine InternVL tokens at shuffled ids (the official order would be <img>, </img>, <IMG_CONTEXT>,
# <quad>, ... ascending). The fixture's inputs use 597 / 599 / 598 for <img> / <IMG_CONTEXT> / </img>.
SHUFFLED = {"</quad>": 591, "<box>": 592, "<quad>": 593, "</ref>": 594, "</box>": 595, "<ref>": 596,
            "<img>": 597, "</img>": 598, "<IMG_CONTEXT>": 599}


@pytest.fixture(scope="module")
def official(fixtures_dir):
    directory = fixtures_dir / "official_tiny_internlm2"
    return directory, dict(np.load(directory / "reference_io.npz"))


def write_tokenizer(directory):
    """A tiny SentencePiece tokenizer (trained here) with the InternVL tokens added at SHUFFLED ids."""
    corpus = [f"user question {i}: what is in image {i % 7}? answer {i * 13} cats and dogs\n" for i in range(300)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buffer, model_type="bpe", vocab_size=300,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    (directory / "tokenizer.model").write_bytes(buffer.getvalue())
    (directory / "added_tokens.json").write_text(json.dumps(SHUFFLED))
    decoder = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                        "single_word": False} for t, i in SHUFFLED.items()}
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": True, "added_tokens_decoder": decoder}))


def test_special_ids_come_from_the_tokenizer(official, tmp_path):
    source, _ = official
    directory = tmp_path / "ckpt"
    shutil.copytree(source, directory)
    write_tokenizer(directory)
    model, tokenizer, config = internvl_jax.load_pretrained(directory)
    assert {t: tokenizer.special_ids[t] for t in SHUFFLED} == SHUFFLED
    assert config.img_context_token_id == 599
    assert tokenizer.encode("<img><IMG_CONTEXT></img>") == [tokenizer.bos_id, 597, 599, 598]
    # The config and weights of the fixture loaded with the id given explicitly, which reproduces the
    # official logits (test_convert_parity.py): so this folder does too.
    explicit, _, explicit_config = internvl_jax.load_pretrained(source, img_context_token_id=599)
    assert config == explicit_config
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(explicit))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_folder_without_tokenizer(official, caplog):
    source, _ = official
    with caplog.at_level(logging.WARNING):
        _, tokenizer, config = internvl_jax.load_pretrained(source)
    assert tokenizer is None and config.img_context_token_id == -1
    assert "running without a tokenizer" in caplog.text and "pass img_context_token_id" in caplog.text
    _, _, config = internvl_jax.load_pretrained(source, img_context_token_id=599)
    assert config.img_context_token_id == 599


def test_load_onto_a_mesh_places_every_parameter_by_the_rules(official):
    source, _ = official
    single, _, _ = internvl_jax.load_pretrained(source, img_context_token_id=599)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    sharded, _, _ = internvl_jax.load_pretrained(source, mesh, img_context_token_id=599)
    state = nnx.state(sharded, nnx.Param)
    expected = dict(nnx.to_flat_state(state_shardings(state, mesh)))
    single_values = dict(nnx.to_flat_state(nnx.state(single, nnx.Param)))
    for path, variable in nnx.to_flat_state(state):
        value = variable.get_value()
        assert value.sharding.is_equivalent_to(expected[path], value.ndim), path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(single_values[path].get_value()))
    # Into a concrete model (as `train.init_from` does): each parameter lands in the model's sharding.
    _, layout = read_config(source)
    reloaded = load_state(source, sharded.config, layout, sharded)
    for path, variable in nnx.to_flat_state(reloaded):
        assert variable.get_value().sharding.is_equivalent_to(expected[path], variable.get_value().ndim), path


def test_dtype_and_config_overrides(official):
    source, _ = official
    model, _, config = internvl_jax.load_pretrained(source, dtype="bfloat16", img_context_token_id=599,
                                                    scan_layers=False, llm__pad_vocab_to_multiple_of=256)
    assert config.dtype == config.param_dtype == "bfloat16" and not config.scan_layers
    embed = model.language_model.embed
    assert embed.get_value().shape == (768, 128) and embed.get_value().dtype == jax.numpy.bfloat16
    assert not np.asarray(embed.get_value()[600:]).any()  # padded rows are zero
    with pytest.raises(ValueError, match="unknown ModelConfig field 'nope'"):
        internvl_jax.load_pretrained(source, nope=1)


def test_command_line_import_then_export(official, tmp_path):
    source, _ = official
    help_text = subprocess.run([sys.executable, "-m", "internvl_jax.convert", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "import SRC DST" in help_text and "export SRC DST" in help_text
    assert convert_main(["import", str(source), str(tmp_path / "native"), "--img-context-token-id", "599"]) == 0
    assert (tmp_path / "native" / "source" / "config.json").exists()
    assert convert_main(["export", str(tmp_path / "native"), str(tmp_path / "official"), "--layout", "official",
                         "--max-shard-size", "1MB"]) == 0
    index = json.loads((tmp_path / "official" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    assert config["model_type"] == "internvl_chat" and config["ps_version"] == "v2"
    with CheckpointReader(source) as a, CheckpointReader(tmp_path / "official") as b:
        assert a.keys() == b.keys()
        for key in a.keys():
            n = int(np.prod(a.info(key).shape))
            np.testing.assert_array_equal(a.read_rows(key, 0, 1, n), b.read_rows(key, 0, 1, n), err_msg=key)
    with pytest.raises(FileExistsError):
        convert_main(["export", str(tmp_path / "native"), str(tmp_path / "official"), "--layout", "hf"])
