"""Tokenizer loading: ids read from the files, slow-tokenizer splitting, offsets, decode, tokenizer.json."""
import io
import json
import logging
import pickle
import random

import pytest
import sentencepiece as spm
import tokenizers

from internvl_jax.data.tokenizer import (
    INTERNVL_TOKENS, NO_SPAN, MissingTokenError, SentencePieceTokenizer, TokenizersJsonTokenizer, load_tokenizer)

# InternVL and template tokens that live inside the SentencePiece vocabulary, deliberately not in spec order.
IN_VOCAB_TOKENS = ["<|im_end|>", "</img>", "<box>", "<|im_start|>", "<img>"]
TEXTS = [
    "the cat sat on a mat",
    " leading space and  two spaces\tand a tab\n\n",
    "a<img><IMG_CONTEXT><IMG_CONTEXT></img>b",
    "<|im_start|>user\n书生·浦语 42<|im_end|>",
    "x <ref>y</ref> <box>[[1, 2, 30, 400]]</box><quad></quad>",
]


def train_sentencepiece(**options) -> bytes:
    """A tiny BPE model with byte fallback (toolchain.md §8); identity normalisation unless overridden."""
    rng = random.Random(0)
    words = "the cat sat on a mat image picture describe square circle red blue answer yes no 42 书生 浦语".split()
    corpus = [" ".join(rng.choice(words) for _ in range(8)) + "\n" * (i % 3 == 0) for i in range(1000)]
    settings = dict(
        model_type="bpe", vocab_size=320, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True, allow_whitespace_only_pieces=True, pad_id=3, num_threads=1, minloglevel=2,
        hard_vocab_limit=False)
    settings.update(options)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buffer, **settings)
    return buffer.getvalue()


def decoder_entry(content, special=True, **flags):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special, **flags}


def write_checkpoint(directory, model_proto, added_ids, config=None, flags=None, as_added_tokens_json=False):
    """Writes tokenizer.model and the HF side files; ``added_ids`` = {content: id} of tokens beyond the model."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model_proto)
    config = {"tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>", **(config or {})}
    flags = flags or {}
    if as_added_tokens_json:
        (directory / "added_tokens.json").write_text(json.dumps(added_ids))
        (directory / "special_tokens_map.json").write_text(
            json.dumps({"additional_special_tokens": list(added_ids)}))
    else:
        config["added_tokens_decoder"] = {str(i): decoder_entry(c, **flags.get(c, {})) for c, i in added_ids.items()}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def shuffled_proto():
    # Control ids moved away from the usual unk=0, bos=1, eos=2.
    return train_sentencepiece(user_defined_symbols=IN_VOCAB_TOKENS, bos_id=0, pad_id=1, unk_id=2, eos_id=3)


@pytest.fixture(scope="module")
def shuffled_added_ids(shuffled_proto):
    size = spm.SentencePieceProcessor(model_proto=shuffled_proto).get_piece_size()
    # Out of spec order and with a gap (size + 5 and size + 6 are unused).
    return {"</box>": size, "</ref>": size + 1, "</quad>": size + 2, "<quad>": size + 3, "<ref>": size + 4,
            "<IMG_CONTEXT>": size + 7}


@pytest.fixture(scope="module")
def shuffled_dir(tmp_path_factory, shuffled_proto, shuffled_added_ids):
    return write_checkpoint(tmp_path_factory.mktemp("shuffled"), shuffled_proto, shuffled_added_ids)


@pytest.fixture(scope="module")
def shuffled(shuffled_dir):
    return load_tokenizer(shuffled_dir)


@pytest.fixture(scope="module")
def official(fixtures_dir):
    return load_tokenizer(fixtures_dir / "official_template")


def test_official_fixture_ids(official):
    assert isinstance(official, SentencePieceTokenizer)
    assert (official.bos_id, official.eos_id, official.pad_id) == (1, 2, 2)
    assert official.vocab_size == 409
    assert official.add_bos_token
    assert official.special_ids == {**{token: 400 + i for i, token in enumerate(INTERNVL_TOKENS)},
                                    "<|im_start|>": 3, "<|im_end|>": 4}


def test_ids_are_read_from_the_files(shuffled, shuffled_proto, shuffled_added_ids):
    processor = spm.SentencePieceProcessor(model_proto=shuffled_proto)
    expected = {token: processor.piece_to_id(token) for token in IN_VOCAB_TOKENS} | shuffled_added_ids
    assert shuffled.special_ids == expected
    assert len(set(expected.values())) == len(expected)
    assert (shuffled.bos_id, shuffled.pad_id, shuffled.eos_id) == (0, 1, 3)
    assert shuffled.vocab_size == processor.get_piece_size() + 8
    text = "".join(INTERNVL_TOKENS) + "<|im_start|><|im_end|>"
    assert shuffled.encode(text) == [0] + [expected[token] for token in INTERNVL_TOKENS] + [
        expected["<|im_start|>"], expected["<|im_end|>"]]
    assert all(shuffled.token_to_id(token) == token_id for token, token_id in expected.items())
    assert shuffled.token_to_id("<no such token>") is None


def test_added_tokens_json_gives_the_same_ids(tmp_path, shuffled, shuffled_proto, shuffled_added_ids):
    from_json = load_tokenizer(write_checkpoint(tmp_path, shuffled_proto, shuffled_added_ids,
                                                as_added_tokens_json=True))
    assert from_json.special_ids == shuffled.special_ids
    assert all(from_json.encode(text) == shuffled.encode(text) for text in TEXTS)


def test_conflicting_added_token_ids_raise(tmp_path, shuffled_proto, shuffled_added_ids):
    write_checkpoint(tmp_path, shuffled_proto, shuffled_added_ids)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<ref>": shuffled_added_ids["<ref>"] + 1}))
    with pytest.raises(ValueError, match="<ref>"):
        load_tokenizer(tmp_path)


def test_missing_required_token_names_token_and_directory(tmp_path, shuffled_proto, shuffled_added_ids):
    without_quad = {token: i for token, i in shuffled_added_ids.items() if token != "<quad>"}
    directory = write_checkpoint(tmp_path / "ckpt", shuffled_proto, without_quad)
    with pytest.raises(MissingTokenError, match="<quad>") as error:
        load_tokenizer(directory)
    assert str(directory) in str(error.value)
    assert "<quad>" not in load_tokenizer(directory, required_tokens=()).special_ids


def test_no_tokenizer_files_returns_none(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert load_tokenizer(tmp_path) is None
    assert str(tmp_path) in caplog.text


def test_bos_follows_add_bos_token(tmp_path, shuffled, shuffled_proto, shuffled_added_ids):
    no_bos = load_tokenizer(write_checkpoint(tmp_path, shuffled_proto, shuffled_added_ids,
                                             config={"add_bos_token": False}))
    assert no_bos.encode("the cat") == shuffled.encode("the cat")[1:] == shuffled.encode("the cat", add_bos=False)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(shuffled, official, text):
    for tokenizer in (shuffled, official):
        assert tokenizer.decode(tokenizer.encode(text, add_bos=False), skip_special_tokens=False) == text


def test_decode_skips_special_tokens(official):
    ids = official.encode("<s>see <img><IMG_CONTEXT></img> here</s>")
    assert official.decode(ids) == "see  here"
    assert official.decode(ids, skip_special_tokens=False) == "<s><s>see <img><IMG_CONTEXT></img> here</s>"


def test_longest_added_token_wins(tmp_path, shuffled_proto, shuffled_added_ids):
    added = shuffled_added_ids | {"<ref><box>": max(shuffled_added_ids.values()) + 1}
    tokenizer = load_tokenizer(write_checkpoint(tmp_path, shuffled_proto, added))
    assert tokenizer.encode("<ref><box><ref>", add_bos=False) == [added["<ref><box>"], added["<ref>"]]


def test_offsets_cover_the_text(shuffled):
    text = "<|im_start|>user\n书生 <img><IMG_CONTEXT></img>\nred<|im_end|>"
    ids, offsets = shuffled.encode_with_offsets(text)
    assert offsets[0] == NO_SPAN and ids[0] == shuffled.bos_id
    assert "".join(text[start:end] for start, end in offsets[1:]) == text
    starts = [start for start, _ in offsets[1:]]
    assert starts == sorted(starts)
    assert text[slice(*offsets[ids.index(shuffled.special_ids["<IMG_CONTEXT>"])])] == "<IMG_CONTEXT>"


def test_strip_flags_of_added_tokens(tmp_path, shuffled, shuffled_proto, shuffled_added_ids):
    flags = {"<quad>": {"rstrip": True}, "</quad>": {"lstrip": True}}
    tokenizer = load_tokenizer(write_checkpoint(tmp_path, shuffled_proto, shuffled_added_ids, flags=flags))
    text = "a <quad>  the cat \n</quad> b"
    ids, offsets = tokenizer.encode_with_offsets(text, add_bos=False)
    assert ids == shuffled.encode("a <quad>the cat</quad> b", add_bos=False)
    assert "".join(text[start:end] for start, end in offsets) == "a <quad>the cat</quad> b"


def test_dummy_prefix_on_every_stretch(tmp_path, shuffled_added_ids):
    proto = train_sentencepiece(user_defined_symbols=IN_VOCAB_TOKENS, normalization_rule_name="nmt_nfkc",
                                add_dummy_prefix=True, remove_extra_whitespaces=True)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    tokenizer = load_tokenizer(write_checkpoint(tmp_path, proto, shuffled_added_ids))
    context = shuffled_added_ids["<IMG_CONTEXT>"]
    # Like the slow InternLM2Tokenizer: each stretch between added tokens is encoded on its own.
    assert tokenizer.encode("the cat<IMG_CONTEXT>red", add_bos=False) == (
        processor.encode("the cat") + [context] + processor.encode("red"))
    text = "ｔhe  cat<IMG_CONTEXT>"
    ids, offsets = tokenizer.encode_with_offsets(text, add_bos=False)
    assert ids[-1] == context and offsets[-1] == (len(text) - len("<IMG_CONTEXT>"), len(text))
    assert offsets[0][0] == 0 and all(end <= len(text) for _, end in offsets)


def test_non_legacy_llama_prefix_space(tmp_path, shuffled_added_ids):
    proto = train_sentencepiece(user_defined_symbols=IN_VOCAB_TOKENS, add_dummy_prefix=True)
    legacy = load_tokenizer(write_checkpoint(tmp_path / "legacy", proto, shuffled_added_ids,
                                             config={"tokenizer_class": "LlamaTokenizer"}))
    modern = load_tokenizer(write_checkpoint(tmp_path / "modern", proto, shuffled_added_ids,
                                             config={"tokenizer_class": "LlamaTokenizer", "legacy": False}))
    context = shuffled_added_ids["<IMG_CONTEXT>"]
    # Legacy: a dummy prefix on every stretch; non-legacy: one "▁" before the text and spaces kept as written.
    assert legacy.encode("red<IMG_CONTEXT>cat", add_bos=False) == (
        legacy.encode("red", add_bos=False) + [context] + legacy.encode("cat", add_bos=False))
    assert modern.encode("red<IMG_CONTEXT> cat", add_bos=False) == (
        legacy.encode("red", add_bos=False) + [context] + legacy.encode("cat", add_bos=False))
    assert modern.encode("<IMG_CONTEXT>cat", add_bos=False)[0] == context
    for text in ["red cat", "<IMG_CONTEXT>cat", " two  spaces <IMG_CONTEXT> x", ""]:
        assert modern.decode(modern.encode(text, add_bos=False), skip_special_tokens=False) == text


def test_pickle_round_trip(shuffled):
    restored = pickle.loads(pickle.dumps(shuffled))
    assert all(restored.encode(text) == shuffled.encode(text) for text in TEXTS)


def test_tokenizer_json_layout(tmp_path):
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    model.train_from_iterator(["the cat sat on a mat", "describe the picture", "书生 浦语"] * 20, trainer)
    shuffled_order = ["<ref>", "<IMG_CONTEXT>", "</box>", "<img>", "<quad>", "</ref>", "</img>", "<box>", "</quad>"]
    model.add_special_tokens(shuffled_order)
    (tmp_path / "tokenizer.json").write_text(model.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))

    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, TokenizersJsonTokenizer)
    assert {token: tokenizer.special_ids[token] for token in shuffled_order} == {
        token: model.token_to_id(token) for token in shuffled_order}
    assert tokenizer.bos_id is None and tokenizer.eos_id == model.token_to_id("<|im_end|>")
    assert tokenizer.vocab_size == model.get_vocab_size()
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>\n书生 the cat<|im_end|>"
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert ids == model.encode(text, add_special_tokens=False).ids
    assert text[slice(*offsets[ids.index(tokenizer.special_ids["<IMG_CONTEXT>"])])] == "<IMG_CONTEXT>"
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids) == "user\n\n书生 the cat"


def test_same_ids_as_transformers_slow_tokenizer(tmp_path, fixtures_dir, shuffled_dir, shuffled_proto,
                                                 shuffled_added_ids):
    """transformers' SentencePiece backend is the v5 descendant of the 4.37 slow tokenizers the official code ran.

    ``AutoTokenizer``/``LlamaTokenizer`` are not used: in transformers 5 they are converted ``tokenizers`` models
    that put a "▁" in front of the text even when the SentencePiece model has no dummy prefix.
    """
    backend = pytest.importorskip("transformers.tokenization_utils_sentencepiece").SentencePieceBackend
    strip_flags = {"<quad>": {"rstrip": True}, "</quad>": {"lstrip": True}}
    directories = [
        fixtures_dir / "official_template",
        shuffled_dir,
        write_checkpoint(tmp_path / "strip", shuffled_proto, shuffled_added_ids, flags=strip_flags),
        write_checkpoint(tmp_path / "dummy_prefix", train_sentencepiece(
            user_defined_symbols=IN_VOCAB_TOKENS, add_dummy_prefix=True), shuffled_added_ids),
    ]
    texts = TEXTS + ["<s>hi</s>", "a <quad>  b \n</quad> c"]
    for directory in directories:
        reference = backend.from_pretrained(str(directory))
        ours = load_tokenizer(directory)
        for text in texts:
            assert ours.encode(text, add_bos=False) == reference(text, add_special_tokens=False).input_ids, (
                directory, text)
