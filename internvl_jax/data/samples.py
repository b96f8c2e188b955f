"""One training sample, from its record to token ids, labels and uint8 tiles.

Two steps, so a packer can plan without decoding any pixels:

* :func:`measure` decides tile counts (from the annotation's sizes or the image headers) and
  tokenises the conversation: everything that fixes the sample's token and tile counts.
* :func:`load_tiles` decodes and tiles the images, and checks they give the planned counts.

Each failure raises :class:`SampleDrop` with the record's location and a short reason key, so
callers can count, log, resample or stop, and never train on a silently wrong sample.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import ExifTags, Image

from internvl_jax.data.conversation import (
    SampleError, SampleErrorReason, Template, get_template, max_tiles_per_image, preprocess)
from internvl_jax.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image, opened_image
from internvl_jax.data.sources import DataError, DatasetSpec, ImageRef, Record, Size
from internvl_jax.data.tiling import jpeg_recompress, num_tiles, tile_image, tiles_to_array
from internvl_jax.data.tokenizer import IMG_CONTEXT_TOKEN, Tokenizer

# Reasons a sample is dropped: conversation problems, image problems, an image whose real size
# gives another tile count than planned, a record that no longer parses, and (set by the packer)
# more tiles than a packed row holds.
DROP_REASONS = (tuple(reason.name.lower() for reason in SampleErrorReason)
                + tuple(f"image_{reason}" for reason in ImageError.REASONS)
                + ("size_mismatch", "bad_record", "too_many_tiles"))
# EXIF orientations that swap width and height (transposed or rotated by 90°).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class SampleDrop(Exception):
    """A sample that cannot be trained on; ``reason`` is one of DROP_REASONS."""

    def __init__(self, where: str, reason: str, detail: str = ""):
        super().__init__(f"{where}: {reason}" + (f": {detail}" if detail else ""))
        self.where = where
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # Pickled by its fields, so it crosses from a worker process intact.
        return SampleDrop, (self.where, self.reason, self.detail)


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """How records become tokens and tiles (from ModelConfig, the sequence length and DataConfig)."""

    template: str
    max_length: int
    image_size: int
    num_image_token: int
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    exif_transpose: bool = False
    alpha_on_white: bool = False
    use_annotation_sizes: bool = True

    @classmethod
    def from_configs(cls, model, max_length: int, data) -> SampleSpec:
        """From a ``ModelConfig``, T and a ``DataConfig``."""
        return cls(template=model.template, max_length=max_length, image_size=model.vision.image_size,
                   num_image_token=model.num_image_token, min_tiles=model.min_dynamic_patch,
                   max_tiles=model.max_dynamic_patch, use_thumbnail=model.use_thumbnail,
                   max_pixels=data.max_pixels, exif_transpose=data.exif_transpose,
                   alpha_on_white=data.alpha_on_white, use_annotation_sizes=data.use_annotation_sizes)

    def dataset_max_tiles(self, dataset: DatasetSpec) -> int:
        """Tile cap of a data set: its meta ``max_dynamic_patch``, else the model's."""
        return dataset.max_dynamic_patch or self.max_tiles


@dataclasses.dataclass(frozen=True)
class Measured:
    """A tokenised sample and its planned tiles.

    Attributes:
        input_ids: int32 [L], L <= max_length.
        labels: int32 [L], IGNORE_INDEX where not supervised.
        tiles: tile count of each image (thumbnail included).
        max_tiles_per_image: the tile cap each image was planned with.
        truncated: whether tokens were cut at max_length.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    tiles: tuple[int, ...]
    max_tiles_per_image: int
    truncated: bool

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_tiles(self) -> int:
        return sum(self.tiles)


def tokenize(conversations: list, tokenizer: Tokenizer, template: Template, num_image_tokens: Sequence[int],
             max_length: int) -> dict:
    """Same result as :func:`conversation.preprocess`, with much less tokenising for image samples.

    ``<IMG_CONTEXT>`` is an added token: the text between two of them is tokenised on its own, so
    a prompt with one context token per image tokenises to the same ids with each context token
    standing for its whole run. That short prompt is tokenised and the runs are widened; a sample
    that would be truncated takes the full path, which decides what truncation cuts.
    """
    if not num_image_tokens:
        return preprocess(conversations, tokenizer, template, num_image_tokens, max_length)
    short = preprocess(conversations, tokenizer, template, [1] * len(num_image_tokens), sys.maxsize)
    ids = short["input_ids"]
    if len(ids) + sum(num_image_tokens) - len(num_image_tokens) > max_length:
        return preprocess(conversations, tokenizer, template, num_image_tokens, max_length)
    repeats = np.ones(len(ids), np.int64)
    repeats[ids == tokenizer.special_ids[IMG_CONTEXT_TOKEN]] = num_image_tokens
    input_ids = np.repeat(ids, repeats)
    return {"input_ids": input_ids, "labels": np.repeat(short["labels"], repeats),
            "attention_mask": np.ones_like(input_ids), "truncated": False}


def _image_name(record: Record, index: int) -> str:
    ref = record.images[index]
    return ref if isinstance(ref, str) else f"{record.where} image {index}"


def _read_target(ref: ImageRef, name: str):
    """What PIL should open: a URL's bytes, else the path or bytes as they are."""
    if isinstance(ref, str) and "://" in ref:
        try:
            return epath.Path(ref).read_bytes()
        except FileNotFoundError as error:
            raise ImageError(name, "missing", "no such file") from error
    return ref


def _header_size(ref: ImageRef, name: str, spec: SampleSpec) -> Size:
    """(width, height) from the file header alone, as :func:`load_image` would decode it."""
    target = _read_target(ref, name)
    with opened_image(target, name) as image:
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation) if spec.exif_transpose else None
    if width * height > spec.max_pixels:
        raise ImageError(name, "too_many_pixels", f"{width}x{height} = {width * height} pixels > limit "
                                                  f"{spec.max_pixels}")
    if width < 1 or height < 1:
        raise ImageError(name, "corrupt", f"empty image {width}x{height}")
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def _planned_size(record: Record, index: int, spec: SampleSpec) -> Size:
    ref = record.images[index]
    if isinstance(ref, np.ndarray):
        return ref.shape[1], ref.shape[0]
    annotated = record.sizes[index] if index < len(record.sizes) else None
    if annotated is not None and spec.use_annotation_sizes and not spec.exif_transpose:
        return annotated
    return _header_size(ref, _image_name(record, index), spec)


def measure(record: Record, spec: SampleSpec, tokenizer: Tokenizer, max_tiles: int) -> Measured:
    """Plans a sample's tiles and tokenises it; no pixel is decoded.

    Args:
        max_tiles: tile cap of the sample's data set; a multi-image sample splits it per image.

    Raises:
        SampleDrop: the sample cannot be trained on (reason in DROP_REASONS).
    """
    per_image = max_tiles_per_image(max_tiles, len(record.images))
    try:
        tiles = tuple(num_tiles(*_planned_size(record, index, spec), min(spec.min_tiles, per_image), per_image,
                                spec.use_thumbnail, spec.image_size) for index in range(len(record.images)))
    except ImageError as error:
        raise SampleDrop(record.where, f"image_{error.reason}", str(error)) from None
    try:
        tokens = tokenize(record.conversations, tokenizer, get_template(spec.template),
                          [count * spec.num_image_token for count in tiles], spec.max_length)
    except SampleError as error:
        raise SampleDrop(record.where, error.reason.name.lower(), error.detail) from None
    return Measured(tokens["input_ids"], tokens["labels"], tiles, per_image, tokens["truncated"])


def _decode(ref: ImageRef, name: str, spec: SampleSpec) -> tuple[Image.Image, bool]:
    """RGB image and whether the EXIF/alpha switches changed it (see :func:`load_image`)."""
    if isinstance(ref, np.ndarray):
        if ref.shape[0] * ref.shape[1] > spec.max_pixels:
            raise ImageError(name, "too_many_pixels", f"{ref.shape[1]}x{ref.shape[0]} > limit {spec.max_pixels}")
        pixels = ref[..., 0] if ref.ndim == 3 and ref.shape[-1] == 1 else ref
        return Image.fromarray(pixels).convert("RGB"), False
    return load_image(_read_target(ref, name), max_pixels=spec.max_pixels, exif_transpose=spec.exif_transpose,
                      alpha_on_white=spec.alpha_on_white)


def load_tiles(record: Record, measured: Measured, spec: SampleSpec,
               augment_rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
    """Decodes and tiles a measured sample's images.

    Args:
        augment_rng: when given, every tile is JPEG re-compressed at a random quality (§9.5).

    Returns:
        uint8 [tiles, S, S, 3] (images in order, each thumbnail last; [0, S, S, 3] for text), and
        how many images the EXIF/alpha switches changed.

    Raises:
        SampleDrop: an image does not decode, or its size gives another tile count than planned.
    """
    arrays, changed = [], 0
    for index, ref in enumerate(record.images):
        name = _image_name(record, index)
        try:
            image, was_changed = _decode(ref, name, spec)
        except ImageError as error:
            raise SampleDrop(record.where, f"image_{error.reason}", str(error)) from None
        per_image = measured.max_tiles_per_image
        tiles = tile_image(image, min(spec.min_tiles, per_image), per_image, spec.use_thumbnail, spec.image_size)
        if len(tiles) != measured.tiles[index]:
            raise SampleDrop(record.where, "size_mismatch",
                             f"image {index} is {image.width}x{image.height} and gives {len(tiles)} tiles; its "
                             f"annotated size {record.sizes[index]} gave {measured.tiles[index]}")
        if augment_rng is not None:
            tiles = [jpeg_recompress(tile, augment_rng) for tile in tiles]
        arrays.append(tiles_to_array(tiles))
        changed += was_changed
    if not arrays:
        return np.zeros((0, spec.image_size, spec.image_size, 3), np.uint8), 0
    return np.concatenate(arrays), changed


def read_record(source: Sequence[Record], index: int) -> Record:
    """``source[index]``, with a record that no longer parses turned into a SampleDrop."""
    try:
        return source[index]
    except DataError as error:
        raise SampleDrop(error.where, "bad_record", str(error)) from None
