"""Evaluation samples, and the file-reading and prompt helpers every benchmark reader shares.

A `Sample` is one question exactly as the model will see it (the official prompt already built),
with its images (decoded only when the sample is predicted), its ground truth and whatever its
benchmark's scorer needs. Readers raise `BenchmarkError` for bad input, always naming the file and
the line, so a broken row in a 5,000-line file can be found at once. An image that cannot be read
is not an input error of the file: it surfaces when the sample is predicted and is recorded as that
sample's failure.
"""
from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from PIL import Image

from internvl_jax.data.images import ImageError, load_image

# Files of the official layout give image paths relative to InternVL's `internvl_chat/` folder
# ("data/textvqa/train_images/x.jpg"); with --data-dir pointing at that `data/` folder, the path
# is found after dropping this first component.
OFFICIAL_DATA_PREFIX = "data"

# Base64 images make TSV fields far longer than the csv module's 128 KiB default.
_MAX_TSV_FIELD = 2**31 - 1


class BenchmarkError(ValueError):
    """Unusable benchmark input; the message starts with the file (and line) at fault."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


def where(path: os.PathLike | str, line: int | None = None) -> str:
    """'path, line N' (or the path alone) for error messages."""
    return f"{path}, line {line}" if line is not None else str(path)


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """One image of a sample: a file path or base64-encoded file bytes (from a TSV)."""
    path: str | None = None
    data: str | None = None

    def load(self) -> Image.Image:
        """The decoded RGB image; raises ImageError (missing, corrupt, ...) naming the file."""
        if self.path is not None:
            return load_image(self.path)[0]
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ImageError("<base64 image>", "corrupt", f"invalid base64: {error}") from error
        return load_image(raw)[0]

    @property
    def key(self) -> str:
        """Identifies the image, so questions on the same image can form one conversation."""
        if self.path is not None:
            return self.path
        return "base64:" + hashlib.sha1(self.data.encode("ascii", "replace")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Sample:
    """One question of a benchmark, ready to be asked.

    id: unique within the benchmark (the data's question id, MMBench index, or line number).
    prompt: the full text the model gets (question + the benchmark's prompt construction).
    answers: ground truth; None when the split has none (test sets, exported for a server).
    source: file and line, for messages.
    subset: ChartQA human/augmented, MME subtask, POPE category, MMBench category.
    options: multiple choice letter -> option text, as shown in the prompt.
    group: the scoring group: a question and its circular rotations (MMBench), or an image's
        questions (MME acc+).
    conversation: questions sharing this key are asked as one conversation in multi-turn mode.
    export: the source row's columns (images left out) for the VLMEvalKit-style export.
    """
    id: str
    prompt: str
    images: tuple[ImageRef, ...]
    answers: tuple[str, ...] | None
    source: str
    subset: str = ""
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    group: str = ""
    conversation: str = ""
    export: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Reading files


def require_file(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.is_file():
        raise BenchmarkError(str(path), f"{what} not found (check --data-dir, or set the option "
                                        "naming this file)")
    return path


def read_jsonl(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error."""
    require_file(path, "JSONL file")
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise BenchmarkError(where(path, number), f"malformed JSON: {error}") from error
            if not isinstance(row, dict):
                raise BenchmarkError(where(path, number), f"expected a JSON object, got {type(row).__name__}")
            yield number, row


def read_json(path: pathlib.Path, what: str) -> Any:
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except json.JSONDecodeError as error:
        raise BenchmarkError(where(path, error.lineno), f"malformed JSON: {error.msg}") from error


def read_tsv(path: pathlib.Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (line number, row dict) of a TSV as pandas writes it (quoted where needed).

    Every header name in `required` must be present and every row must have one field per header
    name. Empty fields are absent values (pandas reads them as NaN).
    """
    require_file(path, "TSV file")
    csv.field_size_limit(_MAX_TSV_FIELD)
    with open(path, encoding="utf-8", newline="") as stream:
        reader = csv.reader(stream, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise BenchmarkError(str(path), "empty file, expected a header row")
        missing = [name for name in required if name not in header]
        if missing:
            raise BenchmarkError(where(path, 1), f"header lacks column(s) {missing}; it has {header}")
        rows = []
        for fields in reader:
            if not any(fields):
                continue
            if len(fields) != len(header):
                raise BenchmarkError(where(path, reader.line_num),
                                     f"{len(fields)} fields, but the header has {len(header)} columns")
            rows.append((reader.line_num, dict(zip(header, fields))))
    return header, rows


def field(row: Mapping[str, Any], name: str, location: str, kind: type | tuple[type, ...] = str) -> Any:
    """row[name], which must exist, be non-empty and of `kind`."""
    if name not in row or row[name] is None or row[name] == "":
        raise BenchmarkError(location, f"missing field '{name}'")
    value = row[name]
    if not isinstance(value, kind):
        raise BenchmarkError(location, f"field '{name}' should be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def answer_list(value: Any, location: str, name: str) -> tuple[str, ...]:
    """A ground-truth field (one string or a list of strings) as a non-empty tuple of strings."""
    values = [value] if isinstance(value, (str, int, float)) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, (str, int, float)) for v in values):
        raise BenchmarkError(location, f"field '{name}' should be a string or a non-empty list of strings, "
                                       f"got {value!r}")
    return tuple(str(v) for v in values)


def check_unique_ids(samples: Sequence[Sample]) -> None:
    """Resuming and gathering key predictions by id, so two samples may not share one."""
    seen: dict[str, str] = {}
    for sample in samples:
        if sample.id in seen:
            raise BenchmarkError(sample.source, f"sample id {sample.id!r} repeats the one at {seen[sample.id]}")
        seen[sample.id] = sample.source


def resolve_image(text: str, roots: Sequence[pathlib.Path]) -> ImageRef:
    """An image path from a data file, looked up under each root in turn.

    Tried for each root: the path as written, then without a leading 'data/' (official files hold
    paths relative to InternVL's internvl_chat/ folder). When nothing exists the first candidate
    is kept, so the sample fails with a 'missing' error naming it.
    """
    path = pathlib.PurePosixPath(text)
    if path.is_absolute():
        return ImageRef(path=text)
    relative = [pathlib.Path(path)]
    if path.parts[0] == OFFICIAL_DATA_PREFIX and len(path.parts) > 1:
        relative.append(pathlib.Path(*path.parts[1:]))
    candidates = [root / rel for root in roots for rel in relative]
    found = next((candidate for candidate in candidates if candidate.is_file()), candidates[0])
    return ImageRef(path=str(found))


# ---------------------------------------------------------------------------------------------
# Prompt construction (spec §12.1-§12.2)


def join_prompt(question: str, separator: str, prompt: str) -> str:
    """question + separator + prompt, or the question alone when there is no prompt."""
    return question + separator + prompt if prompt else question


def multiple_choice_prompt(question: str, hint: str | None, options: Mapping[str, str], separator: str,
                           prompt: str) -> str:
    """[hint + '\\n'] + question + '\\nA. ...' per option, then separator + prompt.

    The construction of the official MMBench and ScienceQA scripts, which VLMEvalKit's InternVL
    wrapper shares for every multiple choice set.
    """
    text = question if hint is None else hint + "\n" + question
    text += "".join(f"\n{letter}. {option}" for letter, option in options.items())
    return join_prompt(text, separator, prompt)
