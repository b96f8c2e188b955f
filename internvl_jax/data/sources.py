"""Training data sources: the official meta JSON with JSONL annotations, TFDS array_record sets.

Meta file (spec §10.5): a JSON object with one entry per data set,
``{"root", "annotation", "repeat_time", "max_dynamic_patch", "data_augment", "length"}``.
``annotation`` is a ``.jsonl`` file, one sample per line; image paths are joined to ``root``.
Paths may be local or anything ``etils.epath`` opens (``gs://...``); relative paths are taken
relative to the meta file's folder. As an extension, an entry may name a TFDS data set prepared
in the array_record format instead of an annotation file:
``{"tfds": {"name": ..., "split": ..., "data_dir": ...}, ...}``; it is read without TensorFlow.

Data sets are concatenated in meta order, each cut or repeated by its ``repeat_time`` (< 1 keeps
that fraction of its first lines, > 1 must be an integer and repeats the whole list).

Lines are checked for structure when the annotation is read (valid JSON object, a conversation
list, well-formed image and size fields); whether a sample can be trained on (placeholders,
turns, token budget, decodable images) is decided later, per sample, by the pipeline.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

logger = logging.getLogger(__name__)

# An image as a record holds it: a path, encoded file bytes, or decoded uint8 [H, W, C] pixels.
ImageRef = str | bytes | np.ndarray
Size = tuple[int, int]


class DataError(ValueError):
    """Unusable data; the message starts with where it is (``file:line`` or ``file``)."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message

    def __reduce__(self):
        # Pickled by its fields, so it crosses from a worker process intact.
        return DataError, (self.where, self.message)


@dataclasses.dataclass(frozen=True)
class BadLine:
    """A skipped annotation line: where it is, why (a short reason key) and the details."""

    where: str
    reason: str
    detail: str


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One meta-file entry; ``annotation`` is empty for a TFDS entry, ``tfds`` empty otherwise."""

    name: str
    root: str = ""
    annotation: str = ""
    tfds: Mapping[str, str] = dataclasses.field(default_factory=dict)
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None
    data_augment: bool = False
    length: int | None = None


@dataclasses.dataclass(frozen=True)
class Record:
    """One sample as read from its source.

    Attributes:
        where: ``file:line`` (or ``tfds:name/split[index]``), used in every message about it.
        dataset: index of its data set in the meta file.
        conversations: the ``conversations`` list as stored (checked when tokenised).
        images: one entry per image, in placeholder order; empty for a text-only sample.
        sizes: (width, height) per image from the annotation, None where not given.
        length: the line's precomputed ``length`` field (for the length-grouped order), if any.
    """

    where: str
    dataset: int
    conversations: list
    images: tuple[ImageRef, ...] = ()
    sizes: tuple[Size | None, ...] = ()
    length: int | None = None


class _LineError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _resolve(path: str, base: str) -> str:
    """``path`` as given when absolute or a URL, else joined to ``base``."""
    if "://" in path or os.path.isabs(path) or not base:
        return path
    return os.fspath(epath.Path(base) / path)


def load_meta(path: str | os.PathLike) -> list[DatasetSpec]:
    """Reads a meta file; errors name the file and the entry."""
    path = os.fspath(path)
    try:
        meta = json.loads(epath.Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise DataError(path, "meta file not found") from error
    except json.JSONDecodeError as error:
        raise DataError(path, f"not valid JSON: {error}") from error
    if not isinstance(meta, dict) or not meta:
        raise DataError(path, "a meta file is a non-empty JSON object {name: {root, annotation, ...}}")
    base = os.path.dirname(path)
    return [_dataset_spec(path, name, entry, base) for name, entry in meta.items()]


def _dataset_spec(path: str, name: str, entry: Any, base: str) -> DatasetSpec:
    where = f"{path} [{name!r}]"
    if not isinstance(entry, dict):
        raise DataError(where, "an entry is a JSON object")
    repeat_time = entry.get("repeat_time", 1)
    if isinstance(repeat_time, bool) or not isinstance(repeat_time, (int, float)) or repeat_time <= 0:
        raise DataError(where, f"repeat_time must be a positive number, got {repeat_time!r}")
    if repeat_time > 1 and repeat_time != int(repeat_time):
        raise DataError(where, f"repeat_time above 1 must be a whole number, got {repeat_time}")
    max_patch = entry.get("max_dynamic_patch")
    if max_patch is not None and (isinstance(max_patch, bool) or not isinstance(max_patch, int) or max_patch < 1):
        raise DataError(where, f"max_dynamic_patch must be a positive integer, got {max_patch!r}")
    common = dict(name=name, repeat_time=float(repeat_time), max_dynamic_patch=max_patch,
                  data_augment=bool(entry.get("data_augment", False)), length=entry.get("length"))
    if "tfds" in entry:
        tfds_entry = entry["tfds"]
        if not isinstance(tfds_entry, dict) or not isinstance(tfds_entry.get("name"), str):
            raise DataError(where, 'tfds must be {"name": ..., "split": ..., "data_dir": ...}')
        tfds_entry = dict(tfds_entry)
        if "data_dir" in tfds_entry:
            tfds_entry["data_dir"] = _resolve(tfds_entry["data_dir"], base)
        return DatasetSpec(tfds=tfds_entry, **common)
    annotation = entry.get("annotation")
    if not isinstance(annotation, str) or not annotation.endswith(".jsonl"):
        raise DataError(where, f"annotation must be the path of a .jsonl file, got {annotation!r}")
    root = entry.get("root", "")
    if not isinstance(root, str):
        raise DataError(where, f"root must be a path, got {root!r}")
    return DatasetSpec(root=_resolve(root, base) if root else "", annotation=_resolve(annotation, base), **common)


# ---------------------------------------------------------------------------------------------
# JSONL annotations.


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _image_paths(sample: dict, root: str) -> tuple[str, ...]:
    image = sample.get("image")
    if image in (None, "", []):
        return ()
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise _LineError("bad_image", f"image must be a path or a list of paths, got {image!r}"[:200])
    return tuple(_resolve(p, root) for p in paths)


def _sizes(sample: dict, num_images: int) -> tuple[Size | None, ...]:
    """(width, height) per image from ``width``/``height`` or ``width_list``/``height_list``."""
    if num_images == 1 and "width" in sample and "height" in sample:
        widths, heights = [sample["width"]], [sample["height"]]
    elif num_images > 1 and "width_list" in sample and "height_list" in sample:
        widths, heights = sample["width_list"], sample["height_list"]
    else:
        return (None,) * num_images
    if not (isinstance(widths, list) and isinstance(heights, list) and len(widths) == len(heights) == num_images
            and all(map(_positive_int, widths + heights))):
        raise _LineError("bad_size", f"width/height must be positive integers, one per image; got {widths!r} x "
                                     f"{heights!r} for {num_images} images")
    return tuple(zip(widths, heights))


def parse_record(text: str, where: str, root: str = "", dataset: int = 0) -> Record:
    """Parses one JSONL line; raises :class:`DataError` naming ``where`` with the reason."""
    try:
        return _parse_record(text, where, root, dataset)
    except _LineError as error:
        raise DataError(where, f"{error.reason}: {error}") from None


def _parse_record(text: str, where: str, root: str, dataset: int) -> Record:
    try:
        sample = json.loads(text)
    except json.JSONDecodeError as error:
        raise _LineError("invalid_json", f"{error.msg} at column {error.colno}") from None
    if not isinstance(sample, dict):
        raise _LineError("not_an_object", f"a line is a JSON object, got {type(sample).__name__}")
    if "video" in sample:
        raise _LineError("video", "video samples are an InternVL 2.0 feature and not supported")
    conversations = sample.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise _LineError("no_conversations", "conversations must be a non-empty list of turns")
    length = sample.get("length")
    if length is not None and not _positive_int(length):
        raise _LineError("bad_length", f"length must be a positive integer, got {length!r}")
    images = _image_paths(sample, root)
    return Record(where=where, dataset=dataset, conversations=conversations, images=images,
                  sizes=_sizes(sample, len(images)), length=length)


class JsonlSource(Sequence):
    """The checked lines of one annotation file, parsed into a :class:`Record` on access.

    Only the raw lines are kept (not parsed records), so the source is small to hold and cheap to
    send to worker processes.
    """

    def __init__(self, spec: DatasetSpec, dataset: int, lines: list[str], line_numbers: np.ndarray):
        self._spec = spec
        self._dataset = dataset
        self._lines = lines
        self._line_numbers = line_numbers

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> Record:
        where = f"{self._spec.annotation}:{self._line_numbers[index]}"
        return parse_record(self._lines[index], where, self._spec.root, self._dataset)


def read_jsonl(spec: DatasetSpec, dataset: int = 0, on_bad_line: str = "raise") -> tuple[JsonlSource, list[BadLine]]:
    """Reads and checks an annotation file.

    Blank lines are ignored. A line that does not parse raises :class:`DataError` (``file:line:
    reason: detail``) with ``on_bad_line="raise"``; with ``"skip"`` it is left out, logged and
    returned among the bad lines.
    """
    try:
        text = epath.Path(spec.annotation).read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise DataError(spec.annotation, f"annotation file of data set {spec.name!r} not found") from error
    except UnicodeDecodeError as error:
        raise DataError(spec.annotation, f"not UTF-8 text: {error}") from error
    lines, numbers, bad = [], [], []
    # Split on "\n" only: str.splitlines would also split inside JSON strings at U+2028 and friends.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{spec.annotation}:{number}"
        try:
            _parse_record(line, where, spec.root, dataset)
        except _LineError as error:
            if on_bad_line == "raise":
                raise DataError(where, f"{error.reason}: {error}") from None
            logger.warning("skipping %s: %s: %s", where, error.reason, error)
            bad.append(BadLine(where, error.reason, str(error)))
            continue
        lines.append(line)
        numbers.append(number)
    return JsonlSource(spec, dataset, lines, np.asarray(numbers, np.int64)), bad


# ---------------------------------------------------------------------------------------------
# TFDS (array_record) data sets.


class TfdsSource(Sequence):
    """Records from a TFDS data set prepared in the array_record format, read without TensorFlow.

    Expected features: ``conversations`` (Text holding the JSON list of turns) and optionally
    ``image`` (an Image, read as its encoded bytes, or a Sequence of Images, which TFDS decodes
    to uint8 arrays). The data source is opened lazily, so the object pickles to workers.
    Planning reads every record once more per worker, so prefer a plain Image feature: a
    Sequence is decoded each time it is read.
    """

    def __init__(self, spec: DatasetSpec, dataset: int = 0, conversations_key: str = "conversations",
                 image_key: str = "image"):
        self._spec = spec
        self._dataset = dataset
        self._conversations_key = conversations_key
        self._image_key = image_key
        self._source = None

    @property
    def _name(self) -> str:
        return f"tfds:{self._spec.tfds['name']}/{self._spec.tfds.get('split', 'train')}"

    def _data_source(self):
        if self._source is None:
            import tensorflow_datasets as tfds  # Lazily: only TFDS entries need it.

            try:
                # Read from the prepared files: no builder class needs to be importable (workers).
                builder = tfds.builder(self._spec.tfds["name"], data_dir=self._spec.tfds.get("data_dir"))
                feature = builder.info.features[self._image_key] if self._image_key in builder.info.features else None
                # A plain Image feature can stay encoded (decoded later, bounded by max_pixels);
                # TFDS cannot skip decoding inside a Sequence without TensorFlow.
                decoders = {self._image_key: tfds.decode.SkipDecoding()} if isinstance(
                    feature, tfds.features.Image) else None
                self._source = builder.as_data_source(split=self._spec.tfds.get("split", "train"), decoders=decoders)
            except Exception as error:  # TFDS raises many types for a missing or unprepared data set.
                raise DataError(self._name, f"cannot open the TFDS data set: {error}") from error
        return self._source

    def __len__(self) -> int:
        return len(self._data_source())

    def __getitem__(self, index: int) -> Record:
        where = f"{self._name}[{index}]"
        element = self._data_source()[index]
        try:
            conversations = json.loads(element[self._conversations_key])
        except (KeyError, json.JSONDecodeError) as error:
            raise DataError(where, f"{self._conversations_key} must hold a JSON list of turns: {error}") from None
        if not isinstance(conversations, list) or not conversations:
            raise DataError(where, "no_conversations: conversations must be a non-empty list of turns")
        image = element.get(self._image_key)
        images = () if image is None else tuple(image) if isinstance(image, list) else (image,)
        return Record(where=where, dataset=self._dataset, conversations=conversations, images=images,
                      sizes=(None,) * len(images))

    def __getstate__(self):
        return {**self.__dict__, "_source": None}


# ---------------------------------------------------------------------------------------------
# Concatenation.


class Mixture(Sequence):
    """The data sets of a meta file concatenated in order, each cut or repeated by ``repeat_time``.

    Attributes:
        specs: the meta entries, indexed by ``Record.dataset``.
        bad_lines: lines left out when the annotations were read (``on_bad_line="skip"``).
    """

    def __init__(self, specs: Sequence[DatasetSpec], sources: Sequence[Sequence[Record]],
                 bad_lines: Sequence[BadLine] = ()):
        self.specs = list(specs)
        self.bad_lines = list(bad_lines)
        self._sources = list(sources)
        self._base_sizes = np.asarray([len(source) for source in sources], np.int64)
        sizes = [int(size * spec.repeat_time) for size, spec in zip(self._base_sizes, specs)]
        self._ends = np.cumsum(sizes, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def source(self, dataset: int) -> Sequence[Record]:
        """The records of one data set, without its repeat_time applied."""
        return self._sources[dataset]

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        dataset = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[dataset - 1]) if dataset else 0
        # A repeated data set cycles through its records.
        return self._sources[dataset][(index - start) % int(self._base_sizes[dataset])]


def open_meta(meta_path: str | os.PathLike, on_bad_line: str = "raise") -> Mixture:
    """All samples of a meta file (see the module docstring)."""
    specs = load_meta(meta_path)
    sources, bad_lines = [], []
    for index, spec in enumerate(specs):
        if spec.tfds:
            sources.append(TfdsSource(spec, index))
            continue
        source, bad = read_jsonl(spec, index, on_bad_line)
        sources.append(source)
        bad_lines.extend(bad)
    return Mixture(specs, sources, bad_lines)


# ---------------------------------------------------------------------------------------------
# Lengths and order.


def estimate_length(record: Record, tokenizer, num_image_token: int, max_tiles: int, use_thumbnail: bool) -> int:
    """Token length used to group samples by length (the official ``group_by_length`` estimate).

    The line's ``length`` field when given, else the tokens of all turns joined by newlines plus
    ``num_image_token × (max_tiles + thumbnail)`` for a sample with images. (The official code
    also adds the image tokens to text-only samples and caches by string length; neither is kept.)
    """
    if record.length is not None:
        return record.length
    text = "\n".join(str(turn.get("value", "")) if isinstance(turn, dict) else "" for turn in record.conversations)
    image_tokens = num_image_token * (max_tiles + int(use_thumbnail)) if record.images else 0
    return len(tokenizer.encode(text)) + image_tokens


def length_grouped_order(lengths: np.ndarray, megabatch_size: int, rng: np.random.Generator,
                         num_chunks: int = 1) -> np.ndarray:
    """The official length-grouped order: a random permutation cut into megabatches, each sorted
    by length (longest first) and dealt to ``num_chunks`` consumers with balanced total length.

    Returns a permutation of ``range(len(lengths))``.
    """
    lengths = np.asarray(lengths)
    permutation = rng.permutation(len(lengths))
    order = []
    for start in range(0, len(permutation), megabatch_size):
        megabatch = permutation[start:start + megabatch_size]
        megabatch = megabatch[np.argsort(-lengths[megabatch], kind="stable")]
        for chunk in _even_chunks(megabatch, lengths, num_chunks):
            order.extend(chunk)
    return np.asarray(order, np.int64)


def _even_chunks(indices: np.ndarray, lengths: np.ndarray, num_chunks: int) -> list[list[int]]:
    """Deal longest-first indices to the chunk with the least total length, equal counts per chunk."""
    if num_chunks == 1:
        return [indices.tolist()]
    if len(indices) % num_chunks:
        return [list(indices[i::num_chunks]) for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(int(index))
        totals[shortest] += float(lengths[index])
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def epoch_order(num_samples: int, epoch: int, seed: int, shuffle: bool, lengths: np.ndarray | None = None,
                megabatch_size: int = 256) -> np.ndarray:
    """Sample order of one epoch: length-grouped when ``lengths`` is given, else a permutation
    (or the identity without ``shuffle``). Each epoch draws from its own stream of ``seed``."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    if lengths is not None:
        return length_grouped_order(lengths, megabatch_size, rng)
    return rng.permutation(num_samples).astype(np.int64)
