"""Tokenizer loading for InternVL checkpoints, with no transformers dependency at runtime.

Two on-disk layouts are understood:

* SentencePiece (InternLM2, Phi-3): ``tokenizer.model`` plus the Hugging Face side files ``added_tokens.json``,
  ``tokenizer_config.json`` (``added_tokens_decoder``) and ``special_tokens_map.json``.
* ``tokenizer.json`` (Qwen2 and other fast-only tokenizers), run by the ``tokenizers`` library.

When both exist SentencePiece wins, because the official code always loads the slow tokenizer (``use_fast=False``).

The SentencePiece path reproduces the transformers 4.37 slow tokenizers the official code ran
(``InternLM2Tokenizer``, ``LlamaTokenizer``): the text is split on every added or special token (exact string match,
longest first, leftmost first), and each stretch of text in between is encoded by SentencePiece on its own, with the
model's own normaliser. So ``<IMG_CONTEXT>`` is always a single id, and a model that adds a dummy prefix adds it to
every stretch, not just to the start of the text. ``LlamaTokenizer`` checkpoints saved with ``"legacy": false``
instead get one ``▁`` in front of the whole text and no dummy prefix per stretch (the 4.37 non-legacy rule).

Ids are always read from the files; nothing here knows the id of any token.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence

import sentencepiece
import tokenizers
from etils import epath
from sentencepiece import sentencepiece_model_pb2

logger = logging.getLogger(__name__)

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# The nine tokens InternVL adds to the LLM tokenizer, in the order the official code adds them.
INTERNVL_TOKENS = (
    IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN,
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)
# Chat-template tokens of the supported LLMs; each tokenizer has only some of them.
TEMPLATE_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>",
)

SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"

_SPIECE_UNDERLINE = "\u2581"
_NAMED_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
_ATOMIC_PIECE_TYPES = (
    sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED,
    sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL,
)

# Character span of a token in the encoded text; tokens that come from no text (the BOS) get this one.
NO_SPAN = (-1, -1)


class MissingTokenError(ValueError):
    """A token the caller needs is not a single token of the tokenizer found in ``directory``."""

    def __init__(self, token: str, directory: str):
        super().__init__(f"tokenizer in {directory} has no single token {token!r}")
        self.token = token
        self.directory = directory


@dataclasses.dataclass(frozen=True)
class AddedToken:
    """A token matched verbatim in the text before any model-specific tokenisation."""

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


class Tokenizer(abc.ABC):
    """Text <-> ids for one checkpoint. Build it with :func:`load_tokenizer`.

    Attributes:
        directory: where the files were read from (used in error messages).
        bos_id, eos_id, pad_id: ids of the configured BOS/EOS/pad tokens, ``None`` when not configured.
        add_bos_token: whether :meth:`encode` prepends ``bos_id`` (``add_bos_token`` of tokenizer_config).
        special_ids: ``{token: id}`` for every InternVL token and chat-template token that is a single token here.
    """

    def __init__(self, *, directory: str, bos_token: str | None, eos_token: str | None, pad_token: str | None,
                 add_bos_token: bool):
        """Subclasses call this last, once ``token_to_id`` works. Token arguments are ``None`` when not configured."""
        self.directory = directory
        self.bos_id = self._configured_id(bos_token)
        self.eos_id = self._configured_id(eos_token)
        self.pad_id = self._configured_id(pad_token)
        if add_bos_token and self.bos_id is None:
            raise ValueError(f"tokenizer in {directory} asks for a BOS token but defines none")
        self.add_bos_token = add_bos_token
        self.special_ids = {
            token: token_id for token in INTERNVL_TOKENS + TEMPLATE_TOKENS
            if (token_id := self._atomic_token_id(token)) is not None
        }

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the LLM embedding needs at least this many rows)."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a token or vocabulary piece, ``None`` when there is none."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; with ``skip_special_tokens`` the tokens flagged special are left out."""

    @abc.abstractmethod
    def _encode_text(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` (no BOS) and the ``[start, end)`` character span of each in ``text``."""

    @abc.abstractmethod
    def _atomic_token_id(self, token: str) -> int | None:
        """Id of ``token`` if the tokenizer always emits it as one id when it appears in text."""

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of ``text``; BOS first when ``add_bos`` and the checkpoint's tokenizer adds one."""
        return self.encode_with_offsets(text, add_bos)[0]

    def encode_with_offsets(self, text: str, add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` and, for each id, its ``[start, end)`` character span in ``text``.

        A span may be empty (e.g. the leading bytes of a byte-fallback character sit at its start); the BOS gets
        :data:`NO_SPAN`. Whitespace that an added token strips (``lstrip``/``rstrip``) belongs to no token.
        """
        ids, offsets = self._encode_text(text)
        if add_bos and self.add_bos_token:
            return [self.bos_id] + ids, [NO_SPAN] + offsets
        return ids, offsets

    def _configured_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.token_to_id(token)
        if token_id is None:
            raise MissingTokenError(token, self.directory)
        return token_id

    def require(self, tokens: Iterable[str]) -> None:
        """Raises :class:`MissingTokenError` for the first of ``tokens`` that is not a single token here."""
        for token in tokens:
            if self._atomic_token_id(token) is None:
                raise MissingTokenError(token, self.directory)


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece model plus Hugging Face added tokens, tokenising like the transformers 4.37 slow classes."""

    def __init__(self, *, model_proto: bytes, added_tokens: Sequence[AddedToken], prefix_space: bool,
                 directory: str, bos_token: str | None, eos_token: str | None, pad_token: str | None,
                 add_bos_token: bool):
        """
        Args:
            model_proto: serialized SentencePiece ``ModelProto``.
            added_tokens: tokens split off before SentencePiece runs (added tokens and named special tokens).
            prefix_space: the ``LlamaTokenizer`` non-legacy rule: one ``▁`` before the text, no dummy prefix.
            bos_token, eos_token, pad_token: token strings from the config, ``None`` when not configured.
        """
        model = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
        if prefix_space:
            model.normalizer_spec.add_dummy_prefix = False
        self._model_proto = model.SerializeToString()
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._model_proto)
        self._atomic_pieces = {piece.piece: i for i, piece in enumerate(model.pieces)
                               if piece.type in _ATOMIC_PIECE_TYPES}
        self._added_by_content = {token.content: token for token in added_tokens}
        self._added_by_id = {token.id: token for token in added_tokens}
        self._special_ids = {token.id for token in added_tokens if token.special}
        self._vocab_size = max([self._sp.get_piece_size()] + [token.id + 1 for token in added_tokens])
        self._split_pattern = _alternation_pattern(self._added_by_content)
        self._prefix_space = prefix_space
        self._unk_text = self._sp.id_to_piece(self._sp.unk_id())
        self._unk_length = len(self._sp.encode(self._unk_text))
        self._underline_id = self.token_to_id(_SPIECE_UNDERLINE)
        super().__init__(directory=directory, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         add_bos_token=add_bos_token)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        if token in self._added_by_content:
            return self._added_by_content[token].id
        token_id = self._sp.piece_to_id(token)
        if token_id == self._sp.unk_id() and token != self._unk_text:
            return None
        return token_id

    def _atomic_token_id(self, token: str) -> int | None:
        if token in self._added_by_content:
            return self._added_by_content[token].id
        return self._atomic_pieces.get(token)

    def _encode_text(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not text:
            return [], []
        if self._prefix_space:
            # Non-legacy Llama: "▁" is the prefix-space marker, so literal ones in the text are read as spaces.
            work_text, shift = _SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " "), -1
        else:
            work_text, shift = text, 0
        ids, offsets = [], []
        for start, end, token in _split_on_added_tokens(work_text, self._split_pattern, self._added_by_content):
            if token is not None:
                ids.append(token.id)
                offsets.append((start, end))
                continue
            piece_ids, piece_offsets = self._encode_stretch(work_text[start:end])
            ids.extend(piece_ids)
            offsets.extend((start + b, start + e) for b, e in piece_offsets)
        if self._prefix_space and len(ids) > 1 and ids[0] == self._underline_id and ids[1] in self._special_ids:
            # The prefix marker alone in front of a special token is dropped (4.37 LlamaTokenizer.tokenize).
            ids, offsets = ids[1:], offsets[1:]
        return ids, [(max(0, b + shift), max(0, e + shift)) for b, e in offsets]

    def _encode_stretch(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character spans of a stretch of text that contains no added token."""
        if self._prefix_space and text.startswith((_SPIECE_UNDERLINE, " ")):
            # 4.37 non-legacy trick: encode behind "<unk>" so SentencePiece keeps the leading space as it is.
            ids, offsets = _sentencepiece_encode(self._sp, self._unk_text + text)
            skip, shift = self._unk_length, len(self._unk_text)
            return ids[skip:], [(b - shift, e - shift) for b, e in offsets[skip:]]
        return _sentencepiece_encode(self._sp, text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        parts, stretch = [], []
        for token_id in ids:
            token_id = int(token_id)
            if token_id not in self._added_by_id:
                stretch.append(token_id)
                continue
            if stretch:
                parts.append(self._decode_stretch(stretch, is_first=not parts))
                stretch = []
            if not (skip_special_tokens and token_id in self._special_ids):
                parts.append(self._added_by_id[token_id].content)
        if stretch:
            parts.append(self._decode_stretch(stretch, is_first=not parts))
        return "".join(parts)

    def _decode_stretch(self, ids: list[int], is_first: bool) -> str:
        text = self._sp.decode(ids)
        if self._prefix_space and is_first and self._sp.id_to_piece(ids[0]).startswith(_SPIECE_UNDERLINE):
            return text[1:]
        return text

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_sp"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._model_proto)


class TokenizersJsonTokenizer(Tokenizer):
    """A ``tokenizer.json`` run by the ``tokenizers`` library (it handles added tokens itself)."""

    def __init__(self, *, tokenizer_json: str, directory: str, bos_token: str | None, eos_token: str | None,
                 pad_token: str | None, add_bos_token: bool):
        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        # A tokenizer.json may carry truncation/padding settings; ids must never be cut or padded silently here.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._added_ids = {added.content: token_id
                           for token_id, added in self._tokenizer.get_added_tokens_decoder().items()}
        super().__init__(directory=directory, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         add_bos_token=add_bos_token)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def _atomic_token_id(self, token: str) -> int | None:
        return self._added_ids.get(token)

    def _encode_text(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(span) for span in encoding.offsets]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | epath.PathLike,
                   required_tokens: Sequence[str] = INTERNVL_TOKENS) -> Tokenizer | None:
    """Loads the tokenizer stored in a checkpoint directory (a local path or anything ``etils.epath`` opens).

    Returns ``None`` (and logs a warning) when the directory holds neither ``tokenizer.model`` nor
    ``tokenizer.json``. Raises :class:`MissingTokenError` when one of ``required_tokens`` (by default the nine
    InternVL tokens), or a configured BOS/EOS/pad token, is not a single token of the tokenizer.
    """
    directory = epath.Path(path)
    config = _read_json(directory / TOKENIZER_CONFIG)
    # special_tokens_map.json overrides tokenizer_config.json, as in transformers' from_pretrained.
    named = {key: _content(config.get(key)) for key in _NAMED_SPECIAL_KEYS}
    special_map = _read_json(directory / SPECIAL_TOKENS_MAP)
    named.update({key: _content(special_map[key]) for key in _NAMED_SPECIAL_KEYS if key in special_map})
    additional = special_map.get("additional_special_tokens", config.get("additional_special_tokens", []))

    if (directory / SENTENCEPIECE_MODEL).exists():
        tokenizer = _load_sentencepiece(directory, config, named, additional)
    elif (directory / TOKENIZER_JSON).exists():
        tokenizer = TokenizersJsonTokenizer(
            tokenizer_json=(directory / TOKENIZER_JSON).read_text(encoding="utf-8"), directory=str(directory),
            bos_token=named["bos_token"], eos_token=named["eos_token"], pad_token=named["pad_token"],
            # Fast-only tokenizers (Qwen2) have no BOS unless the config asks for one.
            add_bos_token=bool(config.get("add_bos_token", False)))
    else:
        logger.warning("no %s or %s in %s; running without a tokenizer", SENTENCEPIECE_MODEL, TOKENIZER_JSON,
                       directory)
        return None
    tokenizer.require(required_tokens)
    return tokenizer


def _load_sentencepiece(directory: epath.Path, config: Mapping, named: Mapping[str, str | None],
                        additional: Sequence) -> SentencePieceTokenizer:
    model_proto = (directory / SENTENCEPIECE_MODEL).read_bytes()
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    # InternLM2Tokenizer takes BOS/EOS/UNK from the model when the config does not name them.
    model_ids = {"bos_token": pieces.bos_id(), "eos_token": pieces.eos_id(), "unk_token": pieces.unk_id()}
    named = dict(named)
    for key, model_id in model_ids.items():
        if named[key] is None and model_id >= 0:
            named[key] = pieces.id_to_piece(model_id)
    special_contents = {token for token in named.values() if token is not None}
    special_contents |= {_content(token) for token in additional}

    added = _read_added_tokens(directory, config, special_contents, additional)
    # transformers also splits on every named or additional special token, with its id in the vocabulary.
    for content in sorted(special_contents - added.keys()):
        token_id = pieces.piece_to_id(content)
        if token_id == pieces.unk_id() and content != pieces.id_to_piece(token_id):
            raise MissingTokenError(content, str(directory))
        added[content] = AddedToken(content, token_id, special=True)
    return SentencePieceTokenizer(
        model_proto=model_proto, added_tokens=list(added.values()),
        prefix_space=config.get("tokenizer_class") in _LLAMA_CLASSES and config.get("legacy") is False,
        directory=str(directory), bos_token=named["bos_token"], eos_token=named["eos_token"],
        pad_token=named["pad_token"], add_bos_token=bool(config.get("add_bos_token", True)))


def _read_added_tokens(directory: epath.Path, config: Mapping, special_contents: set[str],
                       additional: Sequence) -> dict[str, AddedToken]:
    """Added tokens of ``added_tokens.json`` and ``added_tokens_decoder``; the two must agree on ids.

    A token is special when ``added_tokens_decoder`` flags it so or when it is one of ``special_contents`` (the
    named and additional special tokens).
    """
    flags = {token["content"]: token for token in additional if isinstance(token, Mapping)}
    ids = dict(_read_json(directory / ADDED_TOKENS))
    for token_id, entry in config.get("added_tokens_decoder", {}).items():
        content = entry["content"]
        if ids.get(content, int(token_id)) != int(token_id):
            raise ValueError(f"{directory}: {content!r} has id {ids[content]} in {ADDED_TOKENS} but {token_id} in "
                             f"{TOKENIZER_CONFIG}")
        ids[content] = int(token_id)
        flags[content] = entry
    added = {}
    for content, token_id in ids.items():
        entry = flags.get(content, {})
        if entry.get("single_word"):
            logger.warning("%s: single_word is not supported; matching %r anywhere", directory, content)
        added[content] = AddedToken(content=content, id=token_id,
                                    special=bool(entry.get("special")) or content in special_contents,
                                    lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)))
    return added


def _split_on_added_tokens(text: str, pattern: re.Pattern | None, added: Mapping[str, AddedToken]
                           ) -> list[tuple[int, int, AddedToken | None]]:
    """``(start, end, token)`` segments of ``text``: added tokens (``token`` set) and the text between them.

    Empty stretches are dropped. A token with ``rstrip`` (``lstrip``) removes the whitespace at the start (end) of
    the stretch that follows (precedes) it.
    """
    if pattern is None:
        return [(0, len(text), None)] if text else []
    segments, cursor = [], 0
    for match in pattern.finditer(text):
        segments.append((cursor, match.start(), None))
        segments.append((match.start(), match.end(), added[match.group()]))
        cursor = match.end()
    segments.append((cursor, len(text), None))
    for i, (start, end, token) in enumerate(segments):
        if token is not None:
            continue
        if i > 0 and segments[i - 1][2].rstrip:
            start = end - len(text[start:end].lstrip())
        if i + 1 < len(segments) and segments[i + 1][2].lstrip:
            end = start + len(text[start:end].rstrip())
        segments[i] = (start, end, None)
    return [segment for segment in segments if segment[2] is not None or segment[1] > segment[0]]


def _sentencepiece_encode(processor: sentencepiece.SentencePieceProcessor, text: str
                          ) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of ``text`` and their character spans (SentencePiece reports UTF-8 byte spans)."""
    if not text:
        return [], []
    encoded = processor.encode(text, return_type="proto")
    char_at_byte = _char_index_of_bytes(text)
    ids = [piece.id for piece in encoded.pieces]
    offsets = [(char_at_byte[piece.begin], char_at_byte[piece.end]) for piece in encoded.pieces]
    return ids, offsets


def _char_index_of_bytes(text: str) -> list[int]:
    """``index[b]`` = index of the character holding UTF-8 byte ``b`` of ``text``; one extra entry for the end."""
    if text.isascii():
        return list(range(len(text) + 1))
    index = []
    for char_index, char in enumerate(text):
        index.extend([char_index] * len(char.encode("utf-8")))
    index.append(len(text))
    return index


def _alternation_pattern(contents: Iterable[str]) -> re.Pattern | None:
    """Regex matching any of ``contents``; at one position the longest wins."""
    ordered = sorted(contents, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


def _content(token) -> str | None:
    """Token string of a config entry, which is a string, an AddedToken dict or null."""
    if isinstance(token, Mapping):
        return token["content"]
    return token


def _read_json(path: epath.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
