"""Chat templates, prompts, and training tokenisation with label masking (checked against the official vectors)."""
import io
import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from internvl_jax.data.conversation import (
    IGNORE_INDEX, INTERNLM2_SYSTEM_MESSAGE, TEMPLATES, SampleError, SampleErrorReason, build_prompt, conversation_text,
    get_template, max_tiles_per_image, parse_response, preprocess, stop_token_ids)
from internvl_jax.data.tokenizer import INTERNVL_TOKENS, TEMPLATE_TOKENS, load_tokenizer

INTERNLM2 = get_template("internlm2-chat")
R = SampleErrorReason


def turns(*texts):
    """Alternating human/gpt turns in the InternVL JSONL format."""
    return [{"from": ("human", "gpt")[i % 2], "value": text} for i, text in enumerate(texts)]


def supervised_text(tokenizer, sample):
    """The supervised tokens decoded run by run."""
    labels = sample["labels"]
    runs, run = [], []
    for token, label in zip(sample["input_ids"], labels):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(int(token))
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


@pytest.fixture(scope="module")
def vectors(fixtures_dir):
    return json.loads((fixtures_dir / "official_template" / "template_vectors.json").read_text())


@pytest.fixture(scope="module")
def official(fixtures_dir):
    return load_tokenizer(fixtures_dir / "official_template")


@pytest.fixture(scope="module")
def all_templates_tokenizer(tmp_path_factory):
    """In-process SentencePiece model with every template and InternVL token as a piece, in no particular order."""
    pieces = list(TEMPLATE_TOKENS + INTERNVL_TOKENS)
    np.random.default_rng(0).shuffle(pieces)
    corpus = ["describe the picture of a red circle and a blue square, yes or no 42"] * 200
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buffer, model_type="bpe", vocab_size=320,
        user_defined_symbols=pieces, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        num_threads=1, minloglevel=2, hard_vocab_limit=False)
    directory = tmp_path_factory.mktemp("all_templates")
    (directory / "tokenizer.model").write_bytes(buffer.getvalue())
    return load_tokenizer(directory)


def test_official_vectors_are_reproduced(vectors, official):
    template = get_template(vectors["template"])
    assert template.system_message == vectors["system_message"]
    for case in vectors["cases"]:
        sample = preprocess(case["conversations"], official, template,
                            num_image_tokens=case["num_image_token_list"][:case["num_images"]], max_length=4096)
        assert sample["input_ids"].tolist() == case["input_ids"]
        assert sample["labels"].tolist() == case["labels"]
        assert int((sample["labels"] != IGNORE_INDEX).sum()) == case["num_supervised"]
        assert not sample["truncated"]


def test_training_ids_equal_the_inference_prompt(vectors, official):
    """The training ids start with exactly the ids inference feeds for the same history."""
    for case in vectors["cases"]:
        conversation = [dict(turn, value=turn["value"].strip()) for turn in case["conversations"]]
        image_tokens = case["num_image_token_list"][:case["num_images"]]
        sample = preprocess(conversation, official, INTERNLM2, image_tokens, max_length=4096)
        prompt_ids = official.encode(build_prompt(INTERNLM2, conversation[:-1], num_image_tokens=image_tokens))
        assert sample["input_ids"][:len(prompt_ids)].tolist() == prompt_ids
        assert official.decode(sample["input_ids"][len(prompt_ids):]) == conversation[-1]["value"] + "<|im_end|>"


def test_output_arrays(official):
    sample = preprocess(turns("<image>\nWhat is it?", "A cat."), official, INTERNLM2, [4], max_length=128)
    assert {key: value.dtype for key, value in sample.items() if key != "truncated"} == {
        "input_ids": np.int32, "labels": np.int32, "attention_mask": np.int32}
    assert sample["input_ids"].shape == sample["labels"].shape == sample["attention_mask"].shape
    assert sample["attention_mask"].all()
    assert supervised_text(official, sample) == ["A cat.<|im_end|>"]


def test_internlm2_prompt_string():
    question = "<image>\nWhat is this?"
    assert build_prompt(INTERNLM2, turns(question), num_image_tokens=[2]) == (
        "<|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).<|im_end|>"
        "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is this?<|im_end|><|im_start|>assistant\n")
    assert INTERNLM2.system_message == INTERNLM2_SYSTEM_MESSAGE


def test_phi3_prompt_string_with_history():
    prompt = build_prompt(TEMPLATES["phi3-chat"], turns("Image-1: <image>\nImage-2: <image>\nSame?", "No.", "Why?"),
                          num_image_tokens=[1, 3])
    assert prompt == (
        "<|system|>\nYou are an AI assistant whose name is Phi-3.<|end|>"
        "<|user|>\nImage-1: <img><IMG_CONTEXT></img>\nImage-2: <img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\n"
        "Same?<|end|><|assistant|>\nNo.<|end|><|user|>\nWhy?<|end|><|assistant|>\n")


def test_chatml_prompt_string():
    prompt = build_prompt(TEMPLATES["chatml"], turns("Hi", "Hello!", "Describe it."), system_message="Be brief.")
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nDescribe it.<|im_end|>\n<|im_start|>assistant\n")


def test_conversation_text_is_the_training_row_before_image_tokens():
    conversation = [{"from": "gpt", "value": "dropped"}] + turns("<image>\nWhat is this?", "A cat.", "Sure?", "Yes.")
    assert conversation_text(TEMPLATES["chatml"], conversation, system_message="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n")


def test_inference_prompt_gets_a_missing_placeholder():
    assert build_prompt(INTERNLM2, turns("What is it?"), num_image_tokens=[1]) == build_prompt(
        INTERNLM2, turns("<image>\nWhat is it?"), num_image_tokens=[1])
    with pytest.raises(SampleError) as error:
        build_prompt(INTERNLM2, turns("What is it?"), num_image_tokens=[1, 1])
    assert error.value.reason is R.PLACEHOLDER_MISMATCH


@pytest.mark.parametrize("name, closing", [("phi3-chat", "<|end|>"), ("chatml", "<|im_end|>\n"),
                                           ("internlm2-chat", "<|im_end|>")])
def test_labels_of_each_template(all_templates_tokenizer, name, closing):
    tokenizer, template = all_templates_tokenizer, TEMPLATES[name]
    conversation = turns("<image>\nIs the circle red?", "yes", "And the square?", "It is blue.")
    sample = preprocess(conversation, tokenizer, template, [3], max_length=512)
    prompt = build_prompt(template, conversation[:-1], num_image_tokens=[3]) + "It is blue." + template.sep
    assert sample["input_ids"].tolist() == tokenizer.encode(prompt)
    assert supervised_text(tokenizer, sample) == ["yes" + closing, "It is blue." + closing]


def test_missing_placeholder_is_prepended_for_one_image(official):
    without = preprocess(turns("  What is it?", "A cat."), official, INTERNLM2, [5], max_length=128)
    explicit = preprocess(turns("<image>\n  What is it?", "A cat."), official, INTERNLM2, [5], max_length=128)
    np.testing.assert_array_equal(without["input_ids"], explicit["input_ids"])
    np.testing.assert_array_equal(without["labels"], explicit["labels"])


def test_multi_image_tokens_in_order(official):
    conversation = turns("Image-1: <image>\nImage-2: <image>\nCompare.", "Same.", "Again <image>?", "Different.")
    sample = preprocess(conversation, official, INTERNLM2, [3, 1, 2], max_length=256)
    ids = sample["input_ids"].tolist()
    starts = [i for i, token in enumerate(ids) if token == official.special_ids["<img>"]]
    ends = [i for i, token in enumerate(ids) if token == official.special_ids["</img>"]]
    assert [end - start - 1 for start, end in zip(starts, ends)] == [3, 1, 2]
    assert all(set(ids[start + 1:end]) == {official.special_ids["<IMG_CONTEXT>"]} for start, end in zip(starts, ends))
    assert supervised_text(official, sample) == ["Same.<|im_end|>", "Different.<|im_end|>"]


def test_tile_budget_per_image():
    assert [max_tiles_per_image(12, n) for n in (1, 2, 5, 12, 13)] == [12, 6, 2, 1, 1]


def test_leading_gpt_turn_is_dropped(official):
    conversation = turns("What is it?", "A cat.")
    with_leading = [{"from": "gpt", "value": "Hello."}] + conversation
    np.testing.assert_array_equal(preprocess(with_leading, official, INTERNLM2, [], 128)["input_ids"],
                                  preprocess(conversation, official, INTERNLM2, [], 128)["input_ids"])


def test_system_message_override(official):
    sample = preprocess(turns("Hi", "Hello."), official, INTERNLM2, [], 128, system_message="Be brief.")
    assert official.decode(sample["input_ids"], skip_special_tokens=False).startswith(
        "<s><|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi")


def test_right_truncation_keeps_the_prefix(official):
    conversation = turns("Describe the picture.", "There are 3 squares.", "Is it red?", "No, it is green.")
    full = preprocess(conversation, official, INTERNLM2, [], max_length=1024)
    cut_at = len(full["input_ids"]) - 4
    cut = preprocess(conversation, official, INTERNLM2, [], max_length=cut_at)
    assert cut["truncated"] and not full["truncated"]
    np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][:cut_at])
    np.testing.assert_array_equal(cut["labels"], full["labels"][:cut_at])


def test_stop_tokens_and_response(official):
    assert stop_token_ids(INTERNLM2, official) == [2, 3, 4]
    assert parse_response(INTERNLM2, " It is a cat. <|im_end|>junk") == "It is a cat."


@pytest.mark.parametrize("conversation, images, max_length, reason", [
    (turns("<image>\n<image>\nWhat?", "Two."), [4], 512, R.PLACEHOLDER_MISMATCH),
    (turns("What?", "Two."), [4, 4], 512, R.PLACEHOLDER_MISMATCH),
    (turns("<image>\nWhat?", "<image>"), [4], 512, R.PLACEHOLDER_MISMATCH),
    (turns("What?"), [], 512, R.NO_ASSISTANT_TURN),
    ([{"from": "gpt", "value": "Hi."}], [], 512, R.NO_ASSISTANT_TURN),
    (turns("What?") * 2 + [{"from": "gpt", "value": "Hi."}], [], 512, R.NON_ALTERNATING),
    ([{"from": "human", "value": "Hi?"}, {"from": "system", "value": "x"}], [], 512, R.NON_ALTERNATING),
    (turns("What?", "Hi.", "And?"), [], 512, R.UNANSWERED_TURN),
    (turns("What?", "   "), [], 512, R.EMPTY_MESSAGE),
    (turns("<image>\nWhat?", "A cat."), [64], 70, R.IMAGE_TOKENS_TRUNCATED),
    (turns("What?", "A cat."), [], 52, R.NO_SUPERVISED_TOKENS),
    ([{"from": "human", "value": "What?"}, {"from": "gpt"}], [], 512, R.MALFORMED_TURN),
])
def test_unusable_samples_raise(official, conversation, images, max_length, reason):
    with pytest.raises(SampleError) as error:
        preprocess(conversation, official, INTERNLM2, images, max_length)
    assert error.value.reason is reason


def test_token_across_the_label_edge_raises(tmp_path, fixtures_dir):
    """A tokenizer whose added token "\\nyes" would need to be half prompt, half answer."""
    directory = tmp_path / "tokenizer"
    shutil.copytree(fixtures_dir / "official_template", directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["409"] = {"content": "\nyes", "special": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(directory)
    with pytest.raises(SampleError) as error:
        preprocess(turns("Is it?", "yes"), tokenizer, INTERNLM2, [], 512)
    assert error.value.reason is R.TOKENIZATION_MISMATCH
    assert preprocess(turns("Is it?", "no"), tokenizer, INTERNLM2, [], 512)["labels"].max() > 0
