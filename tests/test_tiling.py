"""Dynamic tiling (spec §9): grid order and choice, tile pixels, normalisation, JPEG augment."""
import io
import itertools

import numpy as np
import pytest
from PIL import Image

from internvl_jax.data import tiling

# Spec §9.1, copied from the reference's CPython output.
SPEC_GRIDS_MAX_12 = [
    (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1),
    (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5),
    (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6),
]
SPEC_GRIDS_MAX_6 = [
    (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1), (2, 3),
    (1, 6), (3, 2),
]


def reference_grids(min_num, max_num):
    """The reference's candidate construction, written out literally."""
    target_ratios = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if i * j <= max_num and i * j >= min_num:
                    target_ratios.add((i, j))
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def reference_closest(width, height, target_ratios, image_size):
    """The reference's closest-ratio loop, written out literally."""
    aspect_ratio = width / height
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def noise_image(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_candidate_order_matches_spec_lists():
    assert tiling.candidate_grids(1, 12) == SPEC_GRIDS_MAX_12
    assert tiling.candidate_grids(1, 6) == SPEC_GRIDS_MAX_6


@pytest.mark.parametrize("max_tiles,count", [(12, 35), (6, 14), (24, 84), (40, 158)])
def test_candidate_counts(max_tiles, count):
    grids = tiling.candidate_grids(1, max_tiles)
    assert len(grids) == count
    assert grids == reference_grids(1, max_tiles)


def test_candidate_min_tiles_excludes_small_grids():
    grids = tiling.candidate_grids(4, 12)
    assert grids == reference_grids(4, 12)
    assert min(c * r for c, r in grids) == 4
    assert tiling.candidate_grids(3, 3) == [(3, 1), (1, 3)]


@pytest.mark.parametrize("bounds", [(0, 6), (5, 4)])
def test_candidate_bounds_rejected(bounds):
    with pytest.raises(ValueError):
        tiling.candidate_grids(*bounds)


@pytest.mark.parametrize("size,grid,tiles", [
    ((800, 1300), (2, 3), 7),
    ((1920, 1080), (4, 2), 9),
    ((1000, 1000), (3, 3), 10),
    ((300, 300), (1, 1), 1),
    ((640, 480), (4, 3), 13),
    ((2000, 500), (4, 1), 5),
])
def test_spec_worked_examples(size, grid, tiles):
    assert tiling.choose_grid(*size, 1, 12) == grid
    assert tiling.num_tiles(*size, 1, 12) == tiles


def test_worked_example_800x1300_tiles():
    tiles = tiling.tile_image(noise_image(800, 1300), 1, 12)
    assert len(tiles) == 7
    assert all(t.size == (448, 448) and t.mode == "RGB" for t in tiles)
    assert tiling.num_tiles(800, 1300, 1, 12) * 256 == 1792


def sweep_sides():
    rng = np.random.default_rng(1234)
    fixed = [1, 2, 3, 7, 64, 223, 224, 300, 447, 448, 449, 500, 633, 634, 635, 640, 800, 896,
             1000, 1080, 1300, 1344, 1920, 2000, 4000, 10000]
    return fixed + sorted(rng.integers(1, 3000, 100).tolist())


@pytest.mark.parametrize("min_tiles,max_tiles", [(1, 6), (1, 12), (1, 24), (1, 40), (2, 12)])
def test_choose_grid_matches_reference_sweep(min_tiles, max_tiles):
    grids = reference_grids(min_tiles, max_tiles)
    sides = sweep_sides()
    for width, height in itertools.product(sides, sides):
        assert tiling.choose_grid(width, height, min_tiles, max_tiles) == \
            reference_closest(width, height, grids, 448), (width, height)


@pytest.mark.parametrize("max_tiles", [6, 12, 40])
def test_choose_grid_matches_reference_on_exact_ratio_ties(max_tiles):
    """Images whose ratio equals a candidate's exactly, at scales around each area threshold."""
    grids = reference_grids(1, max_tiles)
    for cols, rows in grids:
        for scale in [1, 2, 3, 50, 100, 150, 200, 223, 224, 225, 300, 316, 317, 448, 449, 700]:
            width, height = cols * scale, rows * scale
            assert tiling.choose_grid(width, height, 1, max_tiles) == \
                reference_closest(width, height, grids, 448), (width, height)


def test_area_tie_break_is_strict_and_uses_image_size():
    # 1:1 ties (1,1),(2,2),(3,3); (2,2) needs area > 0.5·448²·4 = 401408 (633² < it < 634²).
    assert tiling.choose_grid(633, 633, 1, 12) == (1, 1)
    assert tiling.choose_grid(634, 634, 1, 12) == (2, 2)
    # Midpoint tie: ratio 1.5 is 0.5 from both 1:1 and 2:1 when 3:2 is not allowed (max 2).
    assert tiling.choose_grid(300, 200, 1, 2) == (1, 1)
    assert tiling.choose_grid(600, 400, 1, 2) == (2, 1)
    # With image_size 14 the (2,2) threshold is 0.5·14²·4 = 392: 19² < 392 < 20².
    assert tiling.choose_grid(19, 19, 1, 4, image_size=14) == (1, 1)
    assert tiling.choose_grid(20, 20, 1, 4, image_size=14) == (2, 2)


@pytest.mark.parametrize("size,grid", [((1, 1), (1, 1)), ((1, 10000), (1, 12)),
                                       ((10000, 1), (12, 1))])
def test_extreme_sizes(size, grid):
    assert tiling.choose_grid(*size, 1, 12) == grid


def test_choose_grid_rejects_empty_image():
    with pytest.raises(ValueError):
        tiling.choose_grid(0, 10, 1, 12)


@pytest.mark.parametrize("size,max_tiles", [((800, 1300), 12), ((2000, 500), 12), ((97, 211), 6),
                                            ((300, 300), 12), ((5, 3), 40)])
def test_tile_pixels_equal_plain_pil_resize_and_crop(size, max_tiles):
    image = noise_image(*size, seed=size[0])
    cols, rows = reference_closest(*size, reference_grids(1, max_tiles), 448)
    resized = image.resize((448 * cols, 448 * rows), Image.BICUBIC)
    expected = [resized.crop((c * 448, r * 448, (c + 1) * 448, (r + 1) * 448))
                for r in range(rows) for c in range(cols)]
    if cols * rows > 1:
        expected.append(image.resize((448, 448), Image.BICUBIC))

    got = tiling.tiles_to_array(tiling.tile_image(image, 1, max_tiles))
    assert got.dtype == np.uint8 and got.shape == (len(expected), 448, 448, 3)
    np.testing.assert_array_equal(got, np.stack([np.asarray(t) for t in expected]))


def test_no_thumbnail_when_disabled():
    tiles = tiling.tile_image(noise_image(900, 450), 1, 12, use_thumbnail=False)
    assert len(tiles) == 2


def test_min_tiles_forces_split_without_single_tile():
    tiles = tiling.tile_image(noise_image(300, 300), 4, 12)
    assert len(tiles) == 5  # (2,2) is the only 1:1 grid allowed, plus thumbnail


def test_non_rgb_input_is_converted_first():
    gray = noise_image(64, 48).convert("L")
    got = tiling.tiles_to_array(tiling.tile_image(gray, 1, 12))
    want = tiling.tiles_to_array(tiling.tile_image(gray.convert("RGB"), 1, 12))
    np.testing.assert_array_equal(got, want)


def test_small_image_size_tiles():
    tiles = tiling.tile_image(noise_image(60, 20), 1, 6, image_size=14)
    assert [t.size for t in tiles] == [(14, 14)] * 4  # (3,1) + thumbnail


def test_tiles_to_array_rejects_mixed_tiles():
    with pytest.raises(ValueError):
        tiling.tiles_to_array([noise_image(4, 4), noise_image(5, 5)])
    with pytest.raises(ValueError):
        tiling.tiles_to_array([])


def test_normalize_equals_scalar_float32_computation():
    tiles = np.random.default_rng(0).integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)
    tiles[0, 0, 0] = (0, 128, 255)
    got = tiling.normalize(tiles)
    assert got.dtype == np.float32 and got.shape == (2, 3, 6, 5)
    # Per channel, every uint8 value mapped with scalar float32 arithmetic in the reference order.
    for channel, (mean, std) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        table = np.array([(np.float32(v) / np.float32(255) - np.float32(mean)) / np.float32(std)
                          for v in range(256)], dtype=np.float32)
        np.testing.assert_array_equal(got[:, channel], table[tiles[..., channel]])


def test_normalize_matches_torch_to_tensor_and_normalize():
    torch = pytest.importorskip("torch")
    tiles = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    mean = torch.as_tensor(tiling.IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(tiling.IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)
    np.testing.assert_array_equal(tiling.normalize(tiles), x.sub(mean).div(std).numpy())


def test_normalize_rejects_wrong_input():
    with pytest.raises(ValueError):
        tiling.normalize(np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        tiling.normalize(np.zeros((4, 4, 3), np.uint8))


def test_jpeg_recompress_draws_quality_per_tile():
    assert tiling.JPEG_QUALITIES == tuple(range(75, 101))
    tiles = tiling.tile_image(noise_image(1000, 600, seed=3), 1, 6)
    recompressed = [tiling.jpeg_recompress(t, np.random.default_rng(7)) for t in tiles[:1]]
    # Replays the same draw by hand: one choice from 75..100, PIL save/reload.
    quality = int(np.random.default_rng(7).choice(np.arange(75, 101)))
    buffer = io.BytesIO()
    tiles[0].save(buffer, format="JPEG", quality=quality)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(recompressed[0]), expected)

    rng = np.random.default_rng(0)
    out = [tiling.jpeg_recompress(t, rng) for t in tiles]
    assert all(o.size == t.size and o.mode == "RGB" for o, t in zip(out, tiles))
    assert not np.array_equal(np.asarray(out[0]), np.asarray(tiles[0]))

