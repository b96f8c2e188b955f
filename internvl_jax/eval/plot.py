"""A PNG line plot drawn with PIL alone (matplotlib is not a dependency): one panel per series.

Used for the tile-budget sweep (score against tiles, one panel per benchmark, since benchmarks
use different scales). X values are placed evenly, as categories, because budgets such as
1, 6, 12, 24, 40 would crowd together on a linear axis.
"""
from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

PANEL_SIZE = (360, 260)
MAX_COLUMNS = 3
# Inside a panel: room for the title (top), tick labels (left, bottom) and a right border.
_MARGIN = {"left": 56, "right": 16, "top": 28, "bottom": 44}
_Y_TICKS = 5
_POINT_RADIUS = 4
_BACKGROUND = (255, 255, 255)
_AXIS = (0, 0, 0)
_GRID = (225, 225, 225)
_LINE = (31, 119, 180)


def plot_panels(path: pathlib.Path, panels: Sequence[tuple[str, Sequence[float], Sequence[float | None]]],
                x_label: str, y_label: str) -> None:
    """Writes a PNG with one line chart per (title, xs, ys); a None y is a gap (no point)."""
    columns = min(MAX_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    width, height = PANEL_SIZE
    image = Image.new("RGB", (columns * width, rows * height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for number, (title, xs, ys) in enumerate(panels):
        origin = ((number % columns) * width, (number // columns) * height)
        _panel(draw, font, origin, title, xs, ys, x_label, y_label)
    image.save(path, format="PNG")


def _y_range(values: Sequence[float]) -> tuple[float, float]:
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (high - low) * 0.1 or max(abs(high) * 0.05, 1.0)
    # Scores are never negative; an axis starting below 0 would only suggest they could be.
    return (low - pad if low < 0 else max(low - pad, 0.0)), high + pad


def _panel(draw: ImageDraw.ImageDraw, font, origin: tuple[int, int], title: str, xs: Sequence[float],
           ys: Sequence[float | None], x_label: str, y_label: str) -> None:
    left = origin[0] + _MARGIN["left"]
    right = origin[0] + PANEL_SIZE[0] - _MARGIN["right"]
    top = origin[1] + _MARGIN["top"]
    bottom = origin[1] + PANEL_SIZE[1] - _MARGIN["bottom"]
    low, high = _y_range([y for y in ys if y is not None])

    def to_x(position: int) -> float:
        return left + (right - left) * (position + 0.5) / len(xs)

    def to_y(value: float) -> float:
        return bottom - (bottom - top) * (value - low) / (high - low)

    for tick in range(_Y_TICKS):
        value = low + (high - low) * tick / (_Y_TICKS - 1)
        y = to_y(value)
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.text((left - 6, y), f"{value:.1f}", fill=_AXIS, font=font, anchor="rm")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_AXIS, width=1)
    for position, x in enumerate(xs):
        draw.line([(to_x(position), bottom), (to_x(position), bottom + 4)], fill=_AXIS)
        draw.text((to_x(position), bottom + 6), f"{x:g}", fill=_AXIS, font=font, anchor="ma")
    points = [(to_x(position), to_y(y)) for position, y in enumerate(ys) if y is not None]
    if len(points) > 1:
        draw.line(points, fill=_LINE, width=2)
    for x, y in points:
        draw.ellipse([(x - _POINT_RADIUS, y - _POINT_RADIUS), (x + _POINT_RADIUS, y + _POINT_RADIUS)], fill=_LINE)
    draw.text(((left + right) / 2, origin[1] + 8), title, fill=_AXIS, font=font, anchor="ma")
    draw.text(((left + right) / 2, bottom + 24), x_label, fill=_AXIS, font=font, anchor="ma")
    draw.text((origin[0] + 4, origin[1] + 8), y_label, fill=_AXIS, font=font, anchor="la")
