"""A synthetic VQA data set in the official InternVL format (spec §10.5), for end-to-end checks.

Every question type has a closed answer set drawn uniformly, so its chance level is
1 / len(answers); a model that learns the task beats it by a wide margin. Image sizes and aspect
ratios vary (wide and tall), so dynamic tiling yields 1 to 12+1 tiles. Text-only arithmetic rows
exercise the text-only path.

Output layout under `out_dir`:
  images/{split}/{index:06d}.{png,jpg}
  {split}.jsonl             one sample per line (id, image, width, height, conversations,
                            question_type); text rows have no image keys
  {split}_qa.jsonl          the same samples as evaluation questions (id, image, question,
                            answers, question_type): `python -m internvl_jax.eval
                            --benchmarks jsonl:{split}_qa.jsonl` reads it
  meta_{split}.json         {name: {root, annotation, data_augment, repeat_time, length}}
  synthetic_meta.json       question types, answer sets, chance levels, per-split counts

Each sample is drawn from its own RNG stream (seed, split, index), so outputs are identical for
a seed, and a larger `num_train` only appends samples. Only numpy and PIL are used; the text is
drawn with PIL's built-in bitmap font, scaled up with nearest-neighbour, so no font file or
FreeType rendering is involved.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Silhouettes that 8×8 patches tell apart: models probed on this set took a hexagon for a circle.
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "orange": (245, 140, 20),
    "purple": (140, 60, 180),
    "black": (25, 25, 25),
}
MAX_COUNT = 4
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
WORDS = ("apple", "bread", "chair", "cloud", "grape", "horse", "lemon", "mouse", "ocean",
         "piano", "river", "robot", "stone", "tiger", "train", "zebra")
MAX_ADDEND = 9
DEFAULT_IMAGE_SIZES = (64, 896)
DEFAULT_MAX_ASPECT = 4.0
SPLITS = ("train", "test")

# The largest object's radius is at least twice any other's, so "largest" is unambiguous for
# every pair of shapes (smallest big-shape area 1.30·R² vs largest small-shape area 0.79·R²).
_DISTRACTOR_SCALE = (0.4, 0.5)
_MIN_RADIUS = 3
_GAP = 2
_PLACEMENT_TRIES = 200
_TEXT_COLOURS = ((0, 0, 0), (20, 30, 110), (120, 20, 20), (20, 90, 30))
_JPEG_QUALITY = 90


@dataclasses.dataclass(frozen=True)
class Drawn:
    """One object on the canvas; `radius` bounds the whole shape (circumscribed circle)."""
    shape: str
    colour: str
    x: float
    y: float
    radius: float


@dataclasses.dataclass(frozen=True)
class Sample:
    """A generated answer with its image (None for text-only rows) and the values that fill
    the question template."""
    image: Image.Image | None
    answer: str
    question_fields: dict = dataclasses.field(default_factory=dict)
    # Answers of the other question types this image also answers ({type name: answer}), for
    # rows that ask several questions about one image.
    also: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class QuestionType:
    name: str
    question: str  # str.format template, filled with Sample.question_fields
    answers: tuple[str, ...]
    make: Callable[[np.random.Generator, int, int], Sample]
    has_image: bool = True

    @property
    def chance(self) -> float:
        """Accuracy of guessing: answers are drawn uniformly from the closed set."""
        return 1.0 / len(self.answers)


def _sample_size(rng: np.random.Generator, min_side: int, max_side: int,
                 max_aspect: float = DEFAULT_MAX_ASPECT) -> tuple[int, int]:
    """(width, height): long side uniform, aspect ratio log-uniform in 1..max_aspect, wide or tall."""
    long_side = int(rng.integers(min_side, max_side + 1))
    aspect = math.exp(rng.uniform(0.0, math.log(max_aspect)))
    short_side = max(min_side, round(long_side / aspect))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    tint = tuple(int(v) for v in rng.integers(225, 256, 3))
    return Image.new("RGB", (width, height), tint)


def _regular_polygon(x, y, radius, sides, start_degrees, inner_ratio=None):
    """Vertices of a regular polygon (or a star when inner_ratio is given), clockwise."""
    points = []
    steps = sides * 2 if inner_ratio else sides
    for k in range(steps):
        angle = math.radians(start_degrees + 360.0 * k / steps)
        r = radius * inner_ratio if inner_ratio and k % 2 else radius
        points.append((x + r * math.cos(angle), y + r * math.sin(angle)))
    return points


def _cross(x, y, r):
    """A plus sign: two bars 0.72·r wide reaching 0.95·r from the centre (corners inside radius r)."""
    arm, reach = 0.36 * r, 0.95 * r
    outline = [(-arm, -reach), (arm, -reach), (arm, -arm), (reach, -arm), (reach, arm), (arm, arm),
               (arm, reach), (-arm, reach), (-arm, arm), (-reach, arm), (-reach, -arm), (-arm, -arm)]
    return [(x + dx, y + dy) for dx, dy in outline]


# Vertices of each non-circle shape centred on (x, y), all inside the circle of radius r.
_POLYGONS = {
    "square": lambda x, y, r: _regular_polygon(x, y, r, 4, 45),
    "triangle": lambda x, y, r: _regular_polygon(x, y, r, 3, -90),
    "diamond": lambda x, y, r: [(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)],
    "cross": _cross,
    "star": lambda x, y, r: _regular_polygon(x, y, r, 5, -90, inner_ratio=0.45),
}


def _draw_object(draw: ImageDraw.ImageDraw, item: Drawn, outline=None, outline_width=0):
    fill = COLOURS[item.colour]
    x, y, r = item.x, item.y, item.radius
    if item.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=outline, width=outline_width)
    else:
        draw.polygon(_POLYGONS[item.shape](x, y, r), fill=fill, outline=outline,
                     width=outline_width)


def _place(rng, radius, placed, region):
    """Centre (x, y) for a circle of `radius` inside region (x0, y0, x1, y1), clear of `placed`.

    Returns None when no free spot turned up; the caller then shrinks the object.
    """
    x0, y0, x1, y1 = region
    if x1 - x0 < 2 * radius or y1 - y0 < 2 * radius:
        return None
    for _ in range(_PLACEMENT_TRIES):
        x = rng.uniform(x0 + radius, x1 - radius)
        y = rng.uniform(y0 + radius, y1 - radius)
        if all(math.hypot(x - p.x, y - p.y) >= radius + p.radius + _GAP for p in placed):
            return x, y
    return None


def _add_object(rng, placed, shape, colour, radius, region) -> bool:
    """Append one more object to `placed`, shrinking it until it fits; False if it never does."""
    while radius >= _MIN_RADIUS:
        centre = _place(rng, radius, placed, region)
        if centre is not None:
            placed.append(Drawn(shape, colour, centre[0], centre[1], radius))
            return True
        radius *= 0.8
    return False


def _random_object(rng):
    return str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))


def _scene(rng, width, height, num_objects):
    """Exactly num_objects non-overlapping objects, the largest first.

    A crowded small image may have no room left for every distractor; the whole scene is then
    redrawn with a smaller largest object.
    """
    full = (1, 1, width - 1, height - 1)
    # 70-90% of the short side across: a ViT trained from scratch in `make demo` sees its
    # silhouette at 8×8 patches per tile (32-60% across: colour named at 32.5%, 14.3% chance).
    big_radius = min(width, height) * rng.uniform(0.35, 0.45)
    # Distractors of at least _MIN_RADIUS must stay within half the largest radius.
    while big_radius >= 2 * _MIN_RADIUS:
        placed: list[Drawn] = []
        _add_object(rng, placed, *_random_object(rng), big_radius, full)
        for _ in range(num_objects - 1):
            radius = max(_MIN_RADIUS, big_radius * rng.uniform(*_DISTRACTOR_SCALE))
            if not _add_object(rng, placed, *_random_object(rng), radius, full):
                break
        else:
            return placed
        big_radius *= 0.8
    raise RuntimeError(f"no room for {num_objects} objects in a {width}x{height} image")


def _render(rng, width, height, objects, outlined=()):
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    for index, item in enumerate(objects):
        if index in outlined:
            _draw_object(draw, item, outline=(0, 0, 0), outline_width=max(1, int(item.radius // 5)))
        else:
            _draw_object(draw, item)
    return image


def _scene_sample(rng, width, height, num_objects: int, asked: str) -> Sample:
    """A scene of shapes, which answers the shape, colour and count questions alike."""
    objects = _scene(rng, width, height, num_objects)
    answers = {"shape": objects[0].shape, "colour": objects[0].colour, "count": str(len(objects))}
    also = {name: answer for name, answer in answers.items() if name != asked}
    return Sample(_render(rng, width, height, objects), answers[asked], also=also)


def make_shape(rng, width, height) -> Sample:
    return _scene_sample(rng, width, height, int(rng.integers(1, 5)), "shape")


def make_colour(rng, width, height) -> Sample:
    return _scene_sample(rng, width, height, int(rng.integers(1, 5)), "colour")


def make_count(rng, width, height) -> Sample:
    return _scene_sample(rng, width, height, int(rng.integers(1, MAX_COUNT + 1)), "count")


def _quadrant_region(quadrant, width, height):
    half_w, half_h = width / 2, height / 2
    left = 1 if quadrant.endswith("left") else half_w + 1
    top = 1 if quadrant.startswith("top") else half_h + 1
    return (left, top, left + half_w - 2, top + half_h - 2)


def make_position(rng, width, height) -> Sample:
    """A red circle with a black outline, wholly inside one quadrant, among other shapes.

    The circle spans 38-48% of the short side: a tiny model trained from scratch finds a smaller
    one only after far more steps than a CPU demo has (radius 8-16% stayed at chance for 400
    steps of position-only training; 19-24% reached 85% against 25% chance).
    """
    quadrant = str(rng.choice(QUADRANTS))
    radius = max(_MIN_RADIUS + 1, min(width, height) * rng.uniform(0.19, 0.24))
    placed: list[Drawn] = []
    # The first object in an empty quadrant always fits.
    _add_object(rng, placed, "circle", "red", radius, _quadrant_region(quadrant, width, height))
    other_shapes = [s for s in SHAPES if s != "circle"]
    other_colours = [c for c in COLOURS if c != "red"]
    for _ in range(int(rng.integers(0, 4))):
        # A distractor that finds no room is left out: the answer does not depend on it.
        _add_object(rng, placed, str(rng.choice(other_shapes)), str(rng.choice(other_colours)),
                    radius * rng.uniform(0.6, 1.0), (1, 1, width - 1, height - 1))
    return Sample(_render(rng, width, height, placed, outlined=(0,)), quadrant, also={"count": str(len(placed))})


def make_word(rng, width, height) -> Sample:
    """A word in PIL's bitmap font, centred like a sign and scaled (nearest neighbour) until it
    spans 90% of the width or 80% of the height. A tiny ViT trained from scratch reads it there;
    placed anywhere at an integer scale it stayed at chance (`make demo`)."""
    word = str(rng.choice(WORDS))
    font = ImageFont.load_default_imagefont()
    left, top, right, bottom = font.getbbox(word)
    glyphs = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(glyphs).text((-left, -top), word, font=font, fill=255)
    scale = min(0.9 * width / glyphs.width, 0.8 * height / glyphs.height)
    glyphs = glyphs.resize((round(glyphs.width * scale), round(glyphs.height * scale)), Image.Resampling.NEAREST)
    image = _background(rng, width, height)
    x, y = (width - glyphs.width) // 2, (height - glyphs.height) // 2
    colour = _TEXT_COLOURS[int(rng.integers(len(_TEXT_COLOURS)))]
    image.paste(colour, (x, y, x + glyphs.width, y + glyphs.height), glyphs)
    return Sample(image, word)


def make_arithmetic(rng, width, height) -> Sample:
    """Text only: the sum is drawn uniformly from 0..2·MAX_ADDEND, then split into addends."""
    total = int(rng.integers(0, 2 * MAX_ADDEND + 1))
    first = int(rng.integers(max(0, total - MAX_ADDEND), min(MAX_ADDEND, total) + 1))
    return Sample(None, str(total), {"first": first, "second": total - first})


# Short questions: every token costs training time, and the model learns only from the answers.
# With full sentences ("What shape is the largest object in the image? Answer with one word.", 16
# tokens) a `make demo` step held 22 samples, with these 30; in the same training time shape went
# from 43% to 59%, count from 68% to 80% and arithmetic from 83% to 95% (README).
QUESTION_TYPES = (
    QuestionType("shape", "Shape of the largest object?", SHAPES, make_shape),
    QuestionType("colour", "Colour of the largest object?", tuple(COLOURS), make_colour),
    QuestionType("count", "How many shapes?", tuple(str(n) for n in range(1, MAX_COUNT + 1)), make_count),
    QuestionType("position", "Red circle: top-left, top-right, bottom-left or bottom-right?", QUADRANTS,
                 make_position),
    QuestionType("word", "Which word is written?", WORDS, make_word),
    QuestionType("arithmetic", "What is {first} + {second}?", tuple(str(n) for n in range(2 * MAX_ADDEND + 1)),
                 make_arithmetic, has_image=False),
)


_QUESTIONS = {qtype.name: qtype.question for qtype in QUESTION_TYPES if qtype.has_image}


def _type_schedule(seed: int, split_code: int, num_samples: int,
                   type_weights: dict[str, int] | None = None) -> list[QuestionType]:
    """Question type per sample: each block holds every type `type_weights[name]` times (1 by
    default) in a random order, so every type appears once the split has a block's worth."""
    weights = type_weights or {}
    block_types = [qtype for qtype in QUESTION_TYPES for _ in range(weights.get(qtype.name, 1))]
    schedule = []
    for block in range(math.ceil(num_samples / len(block_types))):
        order = np.random.default_rng([seed, split_code, 1, block]).permutation(len(block_types))
        schedule.extend(block_types[i] for i in order)
    return schedule[:num_samples]


def _save_image(image: Image.Image, path: pathlib.Path, as_jpeg: bool) -> None:
    if as_jpeg:
        image.save(path, format="JPEG", quality=_JPEG_QUALITY)
    else:
        image.save(path, format="PNG")


def _follow_ups(sample: Sample, count: int, rng: np.random.Generator) -> list[dict]:
    """Up to `count` more turns about the same image: other question types it answers, random order."""
    names = list(sample.also)
    chosen = [names[i] for i in rng.permutation(len(names))[:count]]
    turns = []
    for name in chosen:
        turns += [{"from": "human", "value": _QUESTIONS[name]}, {"from": "gpt", "value": sample.also[name]}]
    return turns


def _write_split(out_dir: pathlib.Path, split: str, num_samples: int, seed: int,
                 image_sizes: tuple[int, int], max_aspect: float, questions_per_image: int = 1,
                 type_weights: dict[str, int] | None = None) -> dict[str, int]:
    """Write images, `{split}.jsonl` and `{split}_qa.jsonl`; returns the number of samples per
    question type (of each row's first question)."""
    split_code = SPLITS.index(split)
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    per_type = {qtype.name: 0 for qtype in QUESTION_TYPES}
    with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as annotation, \
            open(out_dir / f"{split}_qa.jsonl", "w", encoding="utf-8") as questions:
        for index, qtype in enumerate(_type_schedule(seed, split_code, num_samples, type_weights)):
            rng = np.random.default_rng([seed, split_code, 0, index])
            width, height = _sample_size(rng, *image_sizes, max_aspect)
            sample = qtype.make(rng, width, height)
            row = {"id": f"synthetic_{split}_{index:06d}", "question_type": qtype.name}
            question = qtype.question.format(**sample.question_fields)
            qa = {"id": row["id"], "question": question, "answers": [sample.answer], "question_type": qtype.name}
            prompt = question
            if sample.image is not None:
                name = f"{index:06d}." + ("jpg" if rng.random() < 0.5 else "png")
                _save_image(sample.image, image_dir / name, name.endswith(".jpg"))
                row.update(image=f"{split}/{name}", width=width, height=height)
                qa["image"] = f"images/{split}/{name}"
                prompt = "<image>\n" + prompt
            # Follow-ups draw from their own stream, so images do not depend on questions_per_image.
            follow_ups = _follow_ups(sample, questions_per_image - 1, np.random.default_rng([seed, split_code, 2, index]))
            row["conversations"] = [{"from": "human", "value": prompt},
                                    {"from": "gpt", "value": sample.answer}] + follow_ups
            annotation.write(json.dumps(row) + "\n")
            questions.write(json.dumps(qa) + "\n")
            per_type[qtype.name] += 1
    return per_type


def _write_json(path: pathlib.Path, content) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def write_synthetic_vqa(out_dir, num_train: int, num_test: int, seed: int,
                        image_sizes: tuple[int, int] = DEFAULT_IMAGE_SIZES,
                        max_aspect: float = DEFAULT_MAX_ASPECT,
                        train_questions_per_image: int = 1,
                        train_type_weights: dict[str, int] | None = None) -> pathlib.Path:
    """Generate the data set under out_dir; returns the path of the training meta file.

    Args:
      out_dir: output folder (created; files of an earlier run with the same names are replaced).
      num_train, num_test: samples per split; with at least len(QUESTION_TYPES) samples a split
        holds every question type.
      seed: non-negative int; the same seed gives byte-identical files.
      image_sizes: (min_side, max_side) in pixels for image width and height; min_side >= 48.
      max_aspect: largest long/short side ratio (>= 1), drawn log-uniformly, wide or tall.
      train_questions_per_image: questions per training row: the row's own, then up to this many
        minus one others the same image answers (a shape scene also answers colour and count; the
        position scene, count) as later turns. More supervision per image at little cost. Test rows
        always ask one question, so accuracy stays per type.
      train_type_weights: {question type: images of that type per block of the training split}
        (1 for a type not named; each at least 1). With follow-ups a scene image answers three
        questions and a word image one, so `{"word": 3}` asks each as often as shape or colour.
        The test split keeps every type equally often.

    Returns:
      `out_dir/meta_train.json`; the test split is described by `meta_test.json` beside it, and
      `synthetic_meta.json` lists question types, answer sets and chance levels.
    """
    min_side, max_side = image_sizes
    # Below 48 px the smallest distractor (3 px radius) could reach half the largest object.
    if not 48 <= min_side <= max_side:
        raise ValueError(f"need 48 <= min_side <= max_side, got {image_sizes}")
    if not max_aspect >= 1.0:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    if seed < 0 or num_train < 0 or num_test < 0:
        raise ValueError("seed and sample counts must be non-negative")
    if train_questions_per_image < 1:
        raise ValueError(f"train_questions_per_image must be >= 1, got {train_questions_per_image}")
    names = [qtype.name for qtype in QUESTION_TYPES]
    for name, weight in (train_type_weights or {}).items():
        if name not in names:
            raise ValueError(f"train_type_weights: unknown question type '{name}' (types: {', '.join(names)})")
        if not isinstance(weight, int) or weight < 1:
            raise ValueError(f"train_type_weights: '{name}' must be an int >= 1, got {weight!r}")
    out_dir = pathlib.Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    splits = {}
    for split, num_samples in zip(SPLITS, (num_train, num_test)):
        train = split == "train"
        per_type = _write_split(out_dir, split, num_samples, seed, (min_side, max_side), max_aspect,
                                questions_per_image=train_questions_per_image if train else 1,
                                type_weights=train_type_weights if train else None)
        _write_json(out_dir / f"meta_{split}.json", {
            f"synthetic_vqa_{split}": {
                "root": str(out_dir / "images"),
                "annotation": str(out_dir / f"{split}.jsonl"),
                "data_augment": False,
                "repeat_time": 1,
                "length": num_samples,
            }
        })
        splits[split] = {"meta": f"meta_{split}.json", "annotation": f"{split}.jsonl",
                         "questions": f"{split}_qa.jsonl", "num_samples": num_samples, "per_type": per_type}

    _write_json(out_dir / "synthetic_meta.json", {
        "generator": "internvl_jax.data.synthetic",
        "seed": seed,
        "image_sizes": [min_side, max_side],
        "max_aspect": max_aspect,
        "train_questions_per_image": train_questions_per_image,
        "train_type_weights": {name: (train_type_weights or {}).get(name, 1) for name in names},
        "question_types": {
            qtype.name: {"question": qtype.question, "answers": list(qtype.answers),
                         "chance": qtype.chance, "has_image": qtype.has_image}
            for qtype in QUESTION_TYPES
        },
        "splits": splits,
    })
    return out_dir / "meta_train.json"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, required=True, help="training samples")
    parser.add_argument("--test", type=int, required=True, help="test samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=DEFAULT_IMAGE_SIZES[0],
                        help="smallest image side in pixels")
    parser.add_argument("--max-size", type=int, default=DEFAULT_IMAGE_SIZES[1],
                        help="largest image side in pixels")
    parser.add_argument("--max-aspect", type=float, default=DEFAULT_MAX_ASPECT,
                        help="largest ratio of long to short image side")
    parser.add_argument("--train-questions", type=int, default=1,
                        help="questions per training image (later turns ask what else the image shows)")
    parser.add_argument("--train-type-weights", default="", metavar="TYPE=N,...",
                        help="images of a question type per block of the training split, e.g. word=3 (default 1 each)")
    args = parser.parse_args(argv)
    weights = {}
    for item in filter(None, args.train_type_weights.split(",")):
        name, _, value = item.partition("=")
        if not value.isdigit():
            parser.error(f"--train-type-weights: '{item}' is not TYPE=N with N a whole number")
        weights[name] = int(value)
    meta = write_synthetic_vqa(args.out, args.train, args.test, args.seed,
                               (args.min_size, args.max_size), args.max_aspect, args.train_questions, weights)
    print(meta)


if __name__ == "__main__":
    main()
