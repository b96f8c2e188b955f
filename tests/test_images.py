"""Image decoding: reference-exact default, EXIF/alpha switches, pixel limit, error reporting."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from internvl_jax.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image


def noise(height, width, channels, seed=0, dtype=np.uint8, high=256):
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def save(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def reference_decode(path):
    """What the reference pipeline does: Image.open(path).convert('RGB')."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def palette_image_with_transparency():
    palette = Image.new("P", (6, 4))
    palette.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * (256 * 3 - 9))
    palette.putdata([0, 1, 2] * 8)
    return palette


def mode_samples():
    """(file name, PIL image, save kwargs) for every mode the loader must handle."""
    rgba = noise(5, 7, 4, seed=1)
    rgba[0, 0] = (0, 0, 0, 0)
    return [
        ("rgb.png", Image.fromarray(noise(5, 7, 3), "RGB"), {}),
        ("rgba.png", Image.fromarray(rgba, "RGBA"), {}),
        ("la.png", Image.fromarray(noise(5, 7, 2, seed=2), "LA"), {}),
        ("p_trns.png", palette_image_with_transparency(), {"transparency": 0}),
        ("p_trns.gif", palette_image_with_transparency(), {"transparency": 0}),
        ("i16.png", Image.fromarray(noise(5, 7, 1, seed=3, dtype=np.uint16, high=65536)), {}),
        ("l.png", Image.fromarray(noise(5, 7, 1, seed=4), "L"), {}),
        ("bw.png", Image.fromarray(noise(5, 7, 1, seed=5, high=2).astype(bool)), {}),
        ("cmyk.jpg", Image.fromarray(noise(8, 8, 4, seed=6), "CMYK"), {"quality": 95}),
        ("cmyk.tif", Image.fromarray(noise(5, 7, 4, seed=7), "CMYK"), {}),
    ]


@pytest.mark.parametrize("name,image,kwargs", mode_samples(), ids=[m[0] for m in mode_samples()])
def test_default_decoding_equals_reference(tmp_path, name, image, kwargs):
    path = save(tmp_path, image, name, **kwargs)
    decoded, changed = load_image(path)
    assert decoded.mode == "RGB" and decoded.size == image.size
    assert changed is False
    np.testing.assert_array_equal(np.asarray(decoded), reference_decode(path))


def test_stored_modes_are_the_intended_ones(tmp_path):
    for name, image, kwargs in mode_samples():
        with Image.open(save(tmp_path, image, name, **kwargs)) as reopened:
            assert reopened.mode == image.mode or (name, reopened.mode) == ("bw.png", "1"), name


def test_sixteen_bit_is_clipped_like_pil(tmp_path):
    values = np.array([[0, 100, 255, 256, 1000, 65535]], dtype=np.uint16)
    decoded, _ = load_image(save(tmp_path, Image.fromarray(values), "i16.png"))
    np.testing.assert_array_equal(np.asarray(decoded)[..., 0], [[0, 100, 255, 255, 255, 255]])


def test_switches_on_reference_clean_image_change_nothing(tmp_path):
    path = save(tmp_path, Image.fromarray(noise(5, 7, 3), "RGB"), "rgb.png")
    decoded, changed = load_image(path, exif_transpose=True, alpha_on_white=True)
    assert changed is False
    np.testing.assert_array_equal(np.asarray(decoded), reference_decode(path))


def test_rgba_alpha_dropped_by_default_composited_on_white_with_switch(tmp_path):
    pixels = np.zeros((2, 3, 4), np.uint8)
    pixels[0, 0] = (0, 0, 0, 0)          # fully transparent black
    pixels[0, 1] = (200, 100, 0, 255)    # opaque
    pixels[0, 2] = (0, 0, 0, 128)        # half transparent black
    path = save(tmp_path, Image.fromarray(pixels, "RGBA"), "alpha.png")

    default, changed = load_image(path)
    assert not changed
    assert tuple(np.asarray(default)[0, 0]) == (0, 0, 0)

    white, changed = load_image(path, alpha_on_white=True)
    assert changed
    got = np.asarray(white)
    assert tuple(got[0, 0]) == (255, 255, 255)
    assert tuple(got[0, 1]) == (200, 100, 0)
    assert all(abs(int(v) - 127) <= 1 for v in got[0, 2])


def test_opaque_rgba_reports_unchanged(tmp_path):
    pixels = noise(4, 4, 4)
    pixels[..., 3] = 255
    path = save(tmp_path, Image.fromarray(pixels, "RGBA"), "opaque.png")
    decoded, changed = load_image(path, alpha_on_white=True)
    assert not changed
    np.testing.assert_array_equal(np.asarray(decoded), pixels[..., :3])


@pytest.mark.parametrize("name", ["p_trns.png", "p_trns.gif"])
def test_palette_transparency_on_white(tmp_path, name):
    path = save(tmp_path, palette_image_with_transparency(), name, transparency=0)
    default, _ = load_image(path)
    white, changed = load_image(path, alpha_on_white=True)
    assert changed
    assert tuple(np.asarray(default)[0, 0]) == (0, 0, 0)
    assert tuple(np.asarray(white)[0, 0]) == (255, 255, 255)
    np.testing.assert_array_equal(np.asarray(white)[:, 1:3], np.asarray(default)[:, 1:3])


def test_la_on_white(tmp_path):
    path = save(tmp_path, Image.new("LA", (3, 2), (40, 0)), "la.png")
    default, _ = load_image(path)
    white, changed = load_image(path, alpha_on_white=True)
    assert changed and np.all(np.asarray(default) == 40) and np.all(np.asarray(white) == 255)


def image_with_orientation(orientation, pixels):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


def test_exif_orientation_ignored_by_default_applied_with_switch():
    pixels = noise(3, 5, 3, seed=9)
    encoded = image_with_orientation(6, pixels)  # 6: display rotated 90° clockwise

    default, changed = load_image(encoded)
    assert not changed and default.size == (5, 3)
    np.testing.assert_array_equal(np.asarray(default), pixels)

    upright, changed = load_image(encoded, exif_transpose=True)
    assert changed and upright.size == (3, 5)
    np.testing.assert_array_equal(np.asarray(upright), np.rot90(pixels, k=-1))


def test_exif_orientation_on_jpeg_file(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8  # display rotated 90° counter-clockwise
    path = save(tmp_path, Image.fromarray(noise(16, 32, 3), "RGB"), "rot.jpg", exif=exif)
    upright, changed = load_image(path, exif_transpose=True)
    assert changed and upright.size == (16, 32)
    np.testing.assert_array_equal(np.asarray(upright), np.rot90(reference_decode(path), k=1))


def test_exif_orientation_one_and_symmetric_flip_are_unchanged():
    _, changed = load_image(image_with_orientation(1, noise(3, 5, 3)), exif_transpose=True)
    assert not changed
    # A mirror (orientation 2) of a left-right symmetric image produces identical pixels.
    half = noise(4, 3, 3)
    symmetric = np.concatenate([half, half[:, ::-1]], axis=1)
    _, changed = load_image(image_with_orientation(2, symmetric), exif_transpose=True)
    assert not changed


def test_both_switches_together():
    pixels = np.zeros((2, 4, 4), np.uint8)  # all transparent black
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG", exif=exif)
    decoded, changed = load_image(buffer.getvalue(), exif_transpose=True, alpha_on_white=True)
    assert changed and decoded.size == (2, 4) and np.all(np.asarray(decoded) == 255)


@pytest.mark.parametrize("as_type", [bytes, bytearray, memoryview])
def test_bytes_sources(as_type):
    buffer = io.BytesIO()
    Image.fromarray(noise(3, 4, 3), "RGB").save(buffer, format="PNG")
    decoded, _ = load_image(as_type(buffer.getvalue()))
    np.testing.assert_array_equal(np.asarray(decoded), noise(3, 4, 3))


def test_path_as_string(tmp_path):
    path = save(tmp_path, Image.fromarray(noise(3, 4, 3), "RGB"), "s.png")
    decoded, _ = load_image(str(path))
    assert decoded.size == (4, 3)


def assert_image_error(reason, source, **kwargs):
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)
    assert info.value.reason == reason, str(info.value)
    return info.value


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nowhere" / "gone.jpg"
    error = assert_image_error("missing", path)
    assert str(path) in str(error) and error.source == str(path)


def test_directory_is_unreadable(tmp_path):
    assert_image_error("unreadable", tmp_path)


def test_garbage_and_empty_files_are_corrupt(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    assert str(garbage) in str(assert_image_error("corrupt", garbage))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert_image_error("corrupt", empty)
    assert "in-memory bytes" in str(assert_image_error("corrupt", b"\x00" * 40))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "GIF"])
def test_truncated_files(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    Image.fromarray(noise(64, 64, 3), "RGB").save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    error = assert_image_error("truncated", path)
    assert str(path) in str(error)


def png_bytes(width, height, idat=b"", crc_ok=True):
    """A hand-made RGB PNG: any header size, with whatever IDAT payload is given."""
    def chunk(kind, data):
        crc = zlib.crc32(kind + data) ^ (0 if crc_ok else 1)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def test_damaged_png_data_is_corrupt():
    # A valid zlib stream whose rows carry an invalid filter type (9).
    idat = zlib.compress(b"\x09" + b"\x00" * 6 + b"\x09" + b"\x00" * 6)
    assert_image_error("corrupt", png_bytes(2, 2, idat))


def test_pixel_limit_checked_before_decoding():
    # 9000×9000 = 81 Mpx: above our default limit, below PIL's own 89 Mpx warning threshold.
    # Its data is a single row: decoding would fail as truncated, so the limit must come first.
    bomb = png_bytes(9000, 9000, zlib.compress(b"\x00" * (9000 * 3 + 1)))
    error = assert_image_error("too_many_pixels", bomb)
    assert "9000x9000" in str(error)
    assert 9000 * 9000 > DEFAULT_MAX_PIXELS


def test_pixel_limit_does_not_rely_on_pil(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own guard off
    assert_image_error("too_many_pixels", png_bytes(20000, 20000))
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buffer, format="PNG")
    assert_image_error("too_many_pixels", buffer.getvalue(), max_pixels=399)
    decoded, _ = load_image(buffer.getvalue(), max_pixels=400)
    assert decoded.size == (20, 20)


def test_huge_header_caught_by_pil_first_is_reported_the_same_way():
    assert_image_error("too_many_pixels", png_bytes(100000, 100000), max_pixels=10**12)


def test_image_error_is_a_value_error_with_known_reasons():
    assert issubclass(ImageError, ValueError)
    with pytest.raises(ValueError):
        ImageError("x", "no such reason", "")
