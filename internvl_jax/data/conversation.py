"""Chat templates, prompt construction and training tokenisation with label masking.

A prompt is ``system_template(system_message) + sep``, then ``role + text + sep`` per turn, and for inference an
open assistant turn (``role`` only) at the end (the "MPT" style of the official conversation.py).

Training labels are computed from character spans rather than by tokenising pieces separately: the prompt is
rendered once while recording where each supervised stretch (assistant text plus its separator) sits in it, the
whole prompt is tokenised once (so ``input_ids`` equal what inference would feed), and a token is supervised when
its text starts inside one of those stretches. A token that crosses the edge of a stretch cannot be labelled
correctly, and the sample is rejected.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence

import numpy as np

from internvl_jax.data.tokenizer import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, Tokenizer

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
HUMAN, GPT = "human", "gpt"

INTERNLM2_SYSTEM_MESSAGE = "You are an AI assistant whose name is InternLM (书生·浦语)."
PHI3_SYSTEM_MESSAGE = "You are an AI assistant whose name is Phi-3."
INTERNVL2_SYSTEM_MESSAGE = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                            "是一个有用无害的人工智能助手。")


@dataclasses.dataclass(frozen=True)
class Template:
    """A chat template.

    Attributes:
        name: registry name.
        system_template: system block with a ``{system_message}`` field.
        system_message: default system message.
        roles: (user prefix, assistant prefix) put before each message.
        sep: appended after the system block and after every message.
        sep_token: the token that ends an assistant message; generation stops on it.
        stop_strings: tokens the template metadata lists as stop tokens.
    """

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    sep_token: str
    stop_strings: tuple[str, ...]

    def system_prompt(self, system_message: str | None = None) -> str:
        message = self.system_message if system_message is None else system_message
        return self.system_template.format(system_message=message)


TEMPLATES: Mapping[str, Template] = {
    template.name: template for template in (
        Template(name="internlm2-chat", system_template="<|im_start|>system\n{system_message}",
                 system_message=INTERNLM2_SYSTEM_MESSAGE, roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
                 sep="<|im_end|>", sep_token="<|im_end|>", stop_strings=("</s>", "<|im_start|>", "<|im_end|>")),
        Template(name="phi3-chat", system_template="<|system|>\n{system_message}",
                 system_message=PHI3_SYSTEM_MESSAGE, roles=("<|user|>\n", "<|assistant|>\n"),
                 sep="<|end|>", sep_token="<|end|>", stop_strings=("</s>", "<|endoftext|>", "<|end|>")),
        # Qwen2's ChatML: unlike the two above, a newline follows every separator.
        Template(name="chatml", system_template="<|im_start|>system\n{system_message}",
                 system_message=INTERNVL2_SYSTEM_MESSAGE, roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
                 sep="<|im_end|>\n", sep_token="<|im_end|>",
                 stop_strings=("<|endoftext|>", "<|im_start|>", "<|im_end|>")),
    )
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise KeyError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


class SampleErrorReason(enum.Enum):
    MALFORMED_TURN = "a turn is not a {'from': str, 'value': str} record"
    PLACEHOLDER_MISMATCH = "image placeholders do not match the images"
    NO_ASSISTANT_TURN = "no assistant turn"
    NON_ALTERNATING = "turns do not alternate human/gpt"
    UNANSWERED_TURN = "conversation ends with a human turn"
    EMPTY_MESSAGE = "empty message"
    IMAGE_TOKENS_TRUNCATED = "truncation cuts image tokens"
    NO_SUPERVISED_TOKENS = "no supervised token left"
    TOKENIZATION_MISMATCH = "tokenisation does not line up with the template"


class SampleError(ValueError):
    """A sample that cannot be turned into a correct training example; the caller should skip and count it."""

    def __init__(self, reason: SampleErrorReason, detail: str = ""):
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


def max_tiles_per_image(max_tiles: int, num_images: int) -> int:
    """Tile budget of each image of a multi-image sample: ``max(1, max_tiles // num_images)``."""
    return max(1, max_tiles // max(1, num_images))


def image_token_string(num_context_tokens: int) -> str:
    """``<img>`` + ``<IMG_CONTEXT>`` × ``num_context_tokens`` + ``</img>``."""
    if num_context_tokens <= 0:
        raise ValueError(f"an image needs a positive number of context tokens, got {num_context_tokens}")
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * num_context_tokens + IMG_END_TOKEN


def build_prompt(template: Template, messages: Sequence[Mapping[str, str]], system_message: str | None = None,
                 num_image_tokens: Sequence[int] = ()) -> str:
    """Inference prompt: system block, the messages, then an open assistant turn.

    Args:
        messages: ``{"from": "human" | "gpt", "value": text}`` turns, alternating, starting and ending with a
            human turn (history first, the new question last). Texts are used as they are.
        system_message: overrides the template's default.
        num_image_tokens: ``<IMG_CONTEXT>`` count of each image, in order. The i-th ``<image>`` becomes that image's
            tokens; with one image and no placeholder, ``<image>\\n`` is put in front of the first message.

    Raises:
        SampleError: the turns or the placeholders do not fit.
    """
    turns = _checked_turns(messages, drop_leading_gpt=False)
    if not turns or turns[-1][0] != HUMAN:
        raise SampleError(SampleErrorReason.NON_ALTERNATING, "the last message must be a human turn")
    turns = _insert_missing_placeholder(turns, len(num_image_tokens))
    prompt, _ = _render(template, system_message, _expand_placeholders(turns, num_image_tokens))
    return prompt + template.roles[1]


def conversation_text(template: Template, conversations: Sequence[Mapping[str, str]],
                      system_message: str | None = None) -> str:
    """A training conversation as the model reads it, ``<image>`` placeholders unexpanded (a
    tokenizer's training text: the template's system block and role headers are in every row)."""
    return _render(template, system_message, _checked_turns(conversations, drop_leading_gpt=True))[0]


def stop_token_ids(template: Template, tokenizer: Tokenizer) -> list[int]:
    """Ids of the template's stop tokens that the tokenizer has."""
    return [token_id for text in template.stop_strings if (token_id := tokenizer.token_to_id(text)) is not None]


def parse_response(template: Template, decoded: str) -> str:
    """The answer in generated text: everything before the first separator, stripped."""
    return decoded.split(template.sep_token)[0].strip()


def preprocess(conversations: Sequence[Mapping[str, str]], tokenizer: Tokenizer, template: Template,
               num_image_tokens: Sequence[int], max_length: int, system_message: str | None = None
               ) -> dict[str, np.ndarray | bool]:
    """Tokenises one training conversation and marks which tokens are trained on.

    Follows the official ``preprocess_internlm``: a leading gpt turn is dropped, messages are stripped, the
    ``<image>`` placeholders are expanded (one is put in front of the first human turn of a single-image sample that
    has none), and the prompt is tokenised with BOS and cut to ``max_length`` tokens from the right. Assistant text
    and the separator that closes it are supervised; BOS, system block, human turns and role prefixes are not.

    Args:
        conversations: ``{"from": "human" | "gpt", "value": text}`` turns (the InternVL JSONL format).
        num_image_tokens: ``<IMG_CONTEXT>`` count of each image of the sample, in order; empty for text-only.
        max_length: maximum number of tokens.
        system_message: overrides the template's default.

    Returns:
        ``input_ids`` int32 [L], ``labels`` int32 [L] (``IGNORE_INDEX`` where not supervised, else the input id),
        ``attention_mask`` int32 [L] (all ones), ``truncated`` (bool, whether tokens were cut), L <= max_length.

    Raises:
        SampleError: the sample cannot be made into a correct example (see :class:`SampleErrorReason`).
    """
    turns = _checked_turns(conversations, drop_leading_gpt=True)
    if not any(speaker == GPT for speaker, _ in turns):
        raise SampleError(SampleErrorReason.NO_ASSISTANT_TURN)
    if turns[-1][0] != GPT:
        raise SampleError(SampleErrorReason.UNANSWERED_TURN)
    # The official dataset inserts the placeholder before the messages are stripped.
    turns = [(speaker, text.strip()) for speaker, text in _insert_missing_placeholder(turns, len(num_image_tokens))]
    for index, (_, text) in enumerate(turns):
        if not text:
            raise SampleError(SampleErrorReason.EMPTY_MESSAGE, f"turn {index}")
    prompt, supervised_spans = _render(template, system_message, _expand_placeholders(turns, num_image_tokens))
    input_ids, offsets = tokenizer.encode_with_offsets(prompt)
    labels = _labels(np.asarray(input_ids, np.int64), offsets, supervised_spans)

    truncated = len(input_ids) > max_length
    input_ids = np.asarray(input_ids[:max_length], np.int32)
    labels = labels[:max_length].astype(np.int32)
    _check_image_tokens(input_ids, tokenizer, num_image_tokens, truncated)
    if not (labels != IGNORE_INDEX).any():
        raise SampleError(SampleErrorReason.NO_SUPERVISED_TOKENS, f"{max_length=}" if truncated else "")
    return {"input_ids": input_ids, "labels": labels, "attention_mask": np.ones_like(input_ids),
            "truncated": truncated}


def _checked_turns(conversations: Sequence[Mapping[str, str]], drop_leading_gpt: bool) -> list[tuple[str, str]]:
    """``(speaker, text)`` pairs that alternate, human first; training data may start with a gpt turn to drop."""
    for turn in conversations:
        if not (isinstance(turn, Mapping) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise SampleError(SampleErrorReason.MALFORMED_TURN, repr(turn)[:100])
    turns = [(turn["from"], turn["value"]) for turn in conversations]
    if drop_leading_gpt and turns and turns[0][0] != HUMAN:
        turns = turns[1:]
    for index, (speaker, _) in enumerate(turns):
        expected = (HUMAN, GPT)[index % 2]
        if speaker != expected:
            raise SampleError(SampleErrorReason.NON_ALTERNATING, f"turn {index} is {speaker!r}, expected {expected!r}")
    return turns


def _insert_missing_placeholder(turns: list[tuple[str, str]], num_images: int) -> list[tuple[str, str]]:
    """Puts ``<image>\\n`` in front of the first (human) turn of a single-image sample that has no placeholder."""
    if num_images != 1 or any(IMAGE_PLACEHOLDER in text for _, text in turns):
        return turns
    return [(HUMAN, IMAGE_PLACEHOLDER + "\n" + turns[0][1])] + turns[1:]


def _expand_placeholders(turns: list[tuple[str, str]], num_image_tokens: Sequence[int]) -> list[tuple[str, str]]:
    """Replaces the i-th ``<image>`` (counted over the human turns) by the tokens of image i."""
    if any(IMAGE_PLACEHOLDER in text for speaker, text in turns if speaker == GPT):
        raise SampleError(SampleErrorReason.PLACEHOLDER_MISMATCH, "placeholder in an assistant turn")
    num_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if num_placeholders != len(num_image_tokens):
        raise SampleError(SampleErrorReason.PLACEHOLDER_MISMATCH,
                          f"{num_placeholders} placeholders for {len(num_image_tokens)} images")
    replacements = iter(num_image_tokens)
    expanded = []
    for speaker, text in turns:
        pieces = text.split(IMAGE_PLACEHOLDER)
        text = pieces[0] + "".join(image_token_string(next(replacements)) + piece for piece in pieces[1:])
        expanded.append((speaker, text))
    return expanded


def _render(template: Template, system_message: str | None, turns: list[tuple[str, str]]
            ) -> tuple[str, list[tuple[int, int]]]:
    """The prompt of ``turns`` and the ``[start, end)`` character span of every assistant text + separator."""
    parts = [template.system_prompt(system_message), template.sep]
    length = sum(map(len, parts))
    supervised_spans = []
    for speaker, text in turns:
        role = template.roles[0] if speaker == HUMAN else template.roles[1]
        message = text + template.sep
        if speaker == GPT:
            supervised_spans.append((length + len(role), length + len(role) + len(message)))
        parts += [role, message]
        length += len(role) + len(message)
    return "".join(parts), supervised_spans


def _labels(input_ids: np.ndarray, offsets: Sequence[tuple[int, int]], supervised_spans: Sequence[tuple[int, int]]
            ) -> np.ndarray:
    """``input_ids`` where a token's text starts inside a supervised span, ``IGNORE_INDEX`` elsewhere. Shape [L].

    A token starting at the very beginning of a span but carrying no text (leading bytes of a byte-fallback
    character) belongs to the span like the rest of that character.
    """
    starts = np.asarray([start for start, _ in offsets], np.int64).reshape(-1)
    ends = np.asarray([end for _, end in offsets], np.int64).reshape(-1)
    supervised = np.zeros(len(input_ids), bool)
    for span_start, span_end in supervised_spans:
        crossing = np.flatnonzero(((starts < span_start) & (ends > span_start)) |
                                  ((starts < span_end) & (ends > span_end)))
        if crossing.size:
            raise SampleError(SampleErrorReason.TOKENIZATION_MISMATCH,
                              f"token {crossing[0]} spans the edge of the supervised text at {span_start}:{span_end}")
        inside = (starts >= span_start) & (starts < span_end)
        if not inside.any():
            raise SampleError(SampleErrorReason.TOKENIZATION_MISMATCH,
                              f"no token for the supervised text at {span_start}:{span_end}")
        supervised |= inside
    return np.where(supervised, input_ids, IGNORE_INDEX)


def _check_image_tokens(input_ids: np.ndarray, tokenizer: Tokenizer, num_image_tokens: Sequence[int],
                        truncated: bool) -> None:
    """Every image must keep ``<img>``, all its context tokens and ``</img>``."""
    num_ends = int(np.sum(input_ids == tokenizer.special_ids[IMG_END_TOKEN]))
    num_context = int(np.sum(input_ids == tokenizer.special_ids[IMG_CONTEXT_TOKEN]))
    if num_ends == len(num_image_tokens) and num_context == sum(num_image_tokens):
        return
    found = f"{num_ends} {IMG_END_TOKEN} and {num_context} {IMG_CONTEXT_TOKEN} for {len(num_image_tokens)} images"
    if truncated:
        raise SampleError(SampleErrorReason.IMAGE_TOKENS_TRUNCATED, found)
    raise SampleError(SampleErrorReason.TOKENIZATION_MISMATCH, found)
