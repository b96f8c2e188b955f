"""Dynamic high-resolution tiling of InternVL-1.5 (spec §9), bit-exact with the reference.

An image is matched to the tile grid (cols × rows) whose aspect ratio is closest to its own,
resized with PIL bicubic to (size·cols, size·rows), cut into size×size tiles in row-major order,
and followed by a size×size thumbnail of the whole image when the grid has more than one tile.

Only numpy and PIL are used: PIL's antialiased bicubic is what the reference resizes with, and
no other resampler reproduces it bit for bit.
"""
from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

IMAGE_SIZE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Qualities of the v1.5.1 JPEG re-compression augmentation (§9.5), each equally likely.
JPEG_QUALITIES = tuple(range(75, 101))

Grid = tuple[int, int]


def _check_tile_bounds(min_tiles: int, max_tiles: int) -> None:
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")


@functools.lru_cache(maxsize=None)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[Grid, ...]:
    # The reference builds a Python set with this exact insertion order and stable-sorts it by
    # tile count; the order of equal-count grids is CPython's set iteration order, which the
    # tie rule of `choose_grid` can depend on, so we rebuild the same set the same way.
    grids = set(
        (cols, rows)
        for n in range(min_tiles, max_tiles + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_tiles <= cols * rows <= max_tiles
    )
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def candidate_grids(min_tiles: int, max_tiles: int) -> list[Grid]:
    """All (cols, rows) with min_tiles <= cols·rows <= max_tiles, in reference order (§9.1)."""
    _check_tile_bounds(min_tiles, max_tiles)
    return list(_candidate_grids(min_tiles, max_tiles))


def choose_grid(width: int, height: int, min_tiles: int, max_tiles: int,
                image_size: int = IMAGE_SIZE) -> Grid:
    """The (cols, rows) grid the reference picks for a width × height image (§9.2).

    Closest aspect ratio wins; on an exactly equal ratio difference a later (larger) grid
    replaces the current one only if the image has more than half the pixels of that grid.
    """
    _check_tile_bounds(min_tiles, max_tiles)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect_ratio = width / height
    area = width * height
    best_grid: Grid = (1, 1)
    best_diff = float("inf")
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best_grid = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best_grid = (cols, rows)
    return best_grid


def num_tiles(width: int, height: int, min_tiles: int, max_tiles: int,
              use_thumbnail: bool = True, image_size: int = IMAGE_SIZE) -> int:
    """Tiles `tile_image` yields for a width × height image, thumbnail included (§8.3)."""
    cols, rows = choose_grid(width, height, min_tiles, max_tiles, image_size)
    grid_tiles = cols * rows
    return grid_tiles + 1 if use_thumbnail and grid_tiles != 1 else grid_tiles


def tile_image(image: Image.Image, min_tiles: int, max_tiles: int, use_thumbnail: bool = True,
               image_size: int = IMAGE_SIZE) -> list[Image.Image]:
    """Split an image into RGB image_size² tiles, row-major, thumbnail last (§9.3).

    A non-RGB image is converted to RGB first, as the reference only ever tiles RGB images.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    cols, rows = choose_grid(image.width, image.height, min_tiles, max_tiles, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for index in range(cols * rows):
        left = (index % cols) * image_size
        top = (index // cols) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def tiles_to_array(tiles: list[Image.Image]) -> np.ndarray:
    """Stack equal-sized square RGB tiles into uint8 [n, size, size, 3]."""
    if not tiles:
        raise ValueError("no tiles to stack")
    size = tiles[0].width
    for tile in tiles:
        if tile.mode != "RGB" or tile.size != (size, size):
            raise ValueError(f"expected RGB {size}x{size} tiles, got {tile.mode} {tile.size}")
    return np.stack([np.asarray(tile, dtype=np.uint8) for tile in tiles])


def normalize(tiles_uint8: np.ndarray) -> np.ndarray:
    """uint8 [n, size, size, 3] → float32 [n, 3, size, size] normalised with ImageNet mean/std.

    Same float32 operations in the same order as the reference's ToTensor + Normalize:
    x / 255, then (x − mean) / std, so results agree bit for bit.
    """
    if tiles_uint8.dtype != np.uint8 or tiles_uint8.ndim != 4 or tiles_uint8.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 [n, h, w, 3], got {tiles_uint8.dtype} {tiles_uint8.shape}")
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    scaled = tiles_uint8.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    return (scaled - mean) / std


def jpeg_recompress(tile: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Training augmentation (§9.5, v1.5.1+): save as JPEG at a random quality in 75..100, reload.

    Call once per tile (thumbnail included) so every tile draws its own quality.
    """
    quality = int(rng.choice(JPEG_QUALITIES))
    buffer = io.BytesIO()
    tile.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as reloaded:
        reloaded.load()
        return reloaded.convert("RGB")
