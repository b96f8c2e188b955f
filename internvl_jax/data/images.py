"""Image decoding for the data pipeline: reference-exact by default, bounded, with clear errors.

The reference decodes with `Image.open(path).convert('RGB')` (spec §9.3): EXIF orientation is
ignored, alpha is dropped (transparent pixels keep their stored, often black, RGB) and 16-bit
samples are clipped to 255 by PIL's conversion. `load_image` reproduces that by default; the
`exif_transpose` and `alpha_on_white` switches fix the first two and report whether they changed
anything, so a pipeline can count how many samples differ from the reference.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Iterator

from PIL import ExifTags, Image, ImageOps

# 64 Mpx (e.g. 8192×8192): far above anything tiling needs (12 tiles of 448² ≈ 2.4 Mpx) and
# below PIL's own 89 Mpx warning threshold, so our check always fires before PIL's.
DEFAULT_MAX_PIXELS = 64 * 2**20

ImageSource = str | os.PathLike | bytes | bytearray | memoryview
_IN_MEMORY = (bytes, bytearray, memoryview)

# EXIF orientation 1 means "stored upright"; 2..8 ask for a flip and/or rotation.
_UPRIGHT_ORIENTATIONS = (None, 1)


class ImageError(ValueError):
    """An image that cannot be used; `reason` is one of REASONS, `source` names the file."""

    REASONS = ("missing", "unreadable", "corrupt", "truncated", "too_many_pixels")

    def __init__(self, source: str, reason: str, detail: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        super().__init__(f"{source}: {reason.replace('_', ' ')}: {detail}")
        self.source = source
        self.reason = reason


def _source_name(source: ImageSource) -> str:
    if isinstance(source, _IN_MEMORY):
        return f"<{len(source)} in-memory bytes>"
    return os.fspath(source)


@contextlib.contextmanager
def opened_image(source: ImageSource, name: str) -> Iterator[Image.Image]:
    """`Image.open` (header only) with every failure mapped to an ImageError naming the file."""
    stream = io.BytesIO(bytes(source)) if isinstance(source, _IN_MEMORY) else source
    try:
        image_file = Image.open(stream)
    except FileNotFoundError as error:
        raise ImageError(name, "missing", "no such file") from error
    except Image.DecompressionBombError as error:
        raise ImageError(name, "too_many_pixels", str(error)) from error
    except Image.UnidentifiedImageError as error:
        raise ImageError(name, "corrupt", "not a recognised image format") from error
    except OSError as error:
        raise ImageError(name, "unreadable", f"{type(error).__name__}: {error}") from error
    with image_file:
        yield image_file


def _decode(source: ImageSource, name: str, max_pixels: int) -> Image.Image:
    """Open, check the header's pixel count, then decode the first frame in its stored mode."""
    with opened_image(source, name) as image_file:
        width, height = image_file.size
        # The header alone gives the size; refuse before any pixel is decompressed.
        if width * height > max_pixels:
            raise ImageError(name, "too_many_pixels",
                             f"{width}x{height} = {width * height} pixels > limit {max_pixels}")
        if width < 1 or height < 1:
            raise ImageError(name, "corrupt", f"empty image {width}x{height}")
        try:
            image_file.load()
        # PIL decoders raise many types (OSError, SyntaxError, EOFError, ValueError, zlib and
        # struct errors); all of them mean the file's bytes are unusable.
        except Exception as error:
            reason = "truncated" if "truncat" in str(error).lower() else "corrupt"
            raise ImageError(name, reason, f"{type(error).__name__}: {error}") from error
    # Loaded pixels and metadata stay usable after the file is closed.
    return image_file


def _exif_orientation(image: Image.Image):
    return image.getexif().get(ExifTags.Base.Orientation)


def _on_white(image: Image.Image) -> Image.Image:
    """Composite the image's transparency over opaque white, as RGB."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               exif_transpose: bool = False,
               alpha_on_white: bool = False) -> tuple[Image.Image, bool]:
    """Decode an image file (path or encoded bytes) to RGB.

    Args:
      source: a file path or the encoded file's bytes.
      max_pixels: images whose header declares more pixels are refused before decoding.
      exif_transpose: apply the EXIF orientation tag (the reference ignores it).
      alpha_on_white: composite transparency (alpha channel or palette/colour-key
        transparency) over white (the reference drops it and keeps the stored RGB).

    Returns:
      (image, changed): an RGB PIL image, and whether the switches made it differ from the
      reference decoding `Image.open(...).convert('RGB')`.

    Raises:
      ImageError: missing, corrupt, truncated or too many pixels; the message names the file.
    """
    name = _source_name(source)
    decoded = _decode(source, name, max_pixels)
    reference = decoded.convert("RGB")

    adjusted = decoded
    if exif_transpose and _exif_orientation(decoded) not in _UPRIGHT_ORIENTATIONS:
        adjusted = ImageOps.exif_transpose(adjusted)
    if alpha_on_white and adjusted.has_transparency_data:
        adjusted = _on_white(adjusted)
    if adjusted is decoded:
        return reference, False
    adjusted = adjusted.convert("RGB")
    changed = adjusted.size != reference.size or adjusted.tobytes() != reference.tobytes()
    return adjusted, changed
