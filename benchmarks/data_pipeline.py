"""Data pipeline throughput against a plain single-process implementation of the official preprocessing.

    python benchmarks/data_pipeline.py [--quick] [--samples 160] [--workers 0,1,2] [--tokenizer DIR]

On a synthetic VQA set written for the run: the reference (PIL decode, dynamic tiling, per-tile
ToTensor + ImageNet Normalize in float32, the official tokenisation) one sample after another,
then this pipeline (uint8 tiles, packed static-shape batches) with each worker count, in steady
state (after warm-up batches). Prints samples/s and tiles/s (wall clock), the ratio to the
reference, the CPU time per sample of all processes involved (main and workers; the per-core
comparison, robust to other load on the machine), and checks that every sample's ids, labels and
normalised tiles equal the reference bit for bit, and that every worker count yields identical
batches.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import pathlib
import tempfile
import time

import numpy as np
import psutil
from PIL import Image

from internvl_jax.config import load_config
from internvl_jax.data.config import DataConfig
from internvl_jax.data.conversation import get_template, preprocess
from internvl_jax.data.pipeline import DataPipeline
from internvl_jax.data.sources import open_meta
from internvl_jax.data.synthetic import write_synthetic_vqa
from internvl_jax.data.tiling import IMAGENET_MEAN, IMAGENET_STD, normalize
from internvl_jax.data.tokenizer import IMG_CONTEXT_TOKEN, load_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO.parent / "shared" / "fixtures" / "official_template"


# ---------------------------------------------------------------------------------------------
# The reference: the official preprocessing written out plainly, one sample at a time.


def reference_tiles(image: Image.Image, max_num: int, image_size: int) -> list[Image.Image]:
    """The official dynamic_preprocess (min 1 tile, thumbnail on)."""
    width, height = image.size
    aspect_ratio = width / height
    ratios = sorted(set((i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                        if 1 <= i * j <= max_num), key=lambda ratio: ratio[0] * ratio[1])
    best_diff, best = float("inf"), (1, 1)
    for ratio in ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    resized = image.resize((image_size * best[0], image_size * best[1]))
    tiles = []
    for k in range(best[0] * best[1]):
        box = ((k % best[0]) * image_size, (k // best[0]) * image_size,
               (k % best[0] + 1) * image_size, (k // best[0] + 1) * image_size)
        tiles.append(resized.crop(box))
    if len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def reference_transform(tile: Image.Image, image_size: int) -> np.ndarray:
    """Resize((s, s), bicubic), ToTensor, Normalize(ImageNet): float32 [3, s, s]."""
    tensor = np.asarray(tile.resize((image_size, image_size), Image.BICUBIC)).transpose(2, 0, 1)
    tensor = tensor.astype(np.float32) / np.float32(255)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return (tensor - mean) / std


def reference_sample(record, tokenizer, template, model, seq_len: int) -> tuple[dict, np.ndarray]:
    """(official preprocess output, float32 pixel values [tiles, 3, s, s]) of one record."""
    size = model.vision.image_size
    tiles = [tile for path in record.images
             for tile in reference_tiles(Image.open(path).convert("RGB"), model.max_dynamic_patch, size)]
    pixel_values = np.stack([reference_transform(tile, size) for tile in tiles]) if tiles else np.zeros(
        (0, 3, size, size), np.float32)
    tokens = preprocess(record.conversations, tokenizer, template,
                        [model.num_image_token * len(tiles)] * len(record.images), seq_len)
    return tokens, pixel_values


# ---------------------------------------------------------------------------------------------
# Measurements.


def packed_samples(batch: dict, context_id: int, tokens_per_tile: int) -> list[tuple[bytes, bytes, bytes]]:
    """(ids, labels, normalised tiles) of every sample packed in a batch, as bytes."""
    tiles = batch["pixel_values"][batch["image_flags"] == 1]
    out, cursor = [], 0
    for row in range(len(batch["num_samples"])):
        for segment in range(1, batch["num_samples"][row] + 1):
            mask = batch["segment_ids"][row] == segment
            ids = batch["input_ids"][row][mask]
            count = int(np.sum(ids == context_id)) // tokens_per_tile
            out.append((ids.tobytes(), batch["labels"][row][mask].tobytes(),
                        normalize(tiles[cursor:cursor + count]).tobytes()))
            cursor += count
    return out


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and its live children (the workers)."""
    process = psutil.Process()
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


@dataclasses.dataclass
class Run:
    name: str
    samples: int
    tiles: int
    seconds: float
    cpu_seconds: float
    first_batch: float | None = None


def time_pipeline(mixture, tokenizer, model, seq_len: int, workers: int, warmup: int, timed: int,
                  rows: int) -> tuple[Run, list]:
    """Steady-state measurement (after ``warmup`` batches) and all batches handed out."""
    data = DataConfig(num_workers=workers, num_epochs=0, seed=0)
    pipeline = DataPipeline(mixture, tokenizer, model, seq_len, data, global_rows=rows)
    start = time.perf_counter()
    batches = []
    with pipeline.iterator() as iterator:
        for _ in range(warmup):
            batches.append(next(iterator))
            if len(batches) == 1:
                first = time.perf_counter() - start
        samples, tiles = iterator.stats.samples, iterator.stats.tiles
        begin, cpu = time.perf_counter(), cpu_seconds()
        for _ in range(timed):
            batches.append(next(iterator))
        elapsed, cpu = time.perf_counter() - begin, cpu_seconds() - cpu
        run = Run(f"pipeline, {workers} worker{'s' * (workers != 1)}", iterator.stats.samples - samples,
                  iterator.stats.tiles - tiles, elapsed, cpu, first)
    return run, batches


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mini_internvl_chat_2b_v1_5", help="model settings (tiles, template)")
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--max-side", type=int, default=896, help="largest synthetic image side")
    parser.add_argument("--max-tiles", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=1, help="rows per batch")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--warmup", type=int, default=4, help="batches before timing")
    parser.add_argument("--timed", type=int, default=40, help="timed batches")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    parser.add_argument("--quick", action="store_true", help="small run for the test suite")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.max_side, args.max_tiles, args.timed, args.warmup = 16, 512, 6, 6, 1
    workers = [int(w) for w in args.workers.split(",")]

    model = dataclasses.replace(load_config(args.config).model, max_dynamic_patch=args.max_tiles)
    tokenizer = load_tokenizer(args.tokenizer)
    template = get_template(model.template)
    context_id = tokenizer.special_ids[IMG_CONTEXT_TOKEN]
    with tempfile.TemporaryDirectory() as folder:
        meta = write_synthetic_vqa(folder, args.samples, 0, seed=0, image_sizes=(64, args.max_side))
        mixture = open_meta(meta)

        start, cpu = time.perf_counter(), cpu_seconds()
        references = [reference_sample(mixture[i], tokenizer, template, model, args.seq_len)
                      for i in range(len(mixture))]
        reference = Run("reference (1 process)", len(references), sum(len(pixels) for _, pixels in references),
                        time.perf_counter() - start, cpu_seconds() - cpu)

        results, runs = [reference], {}
        for count in workers:
            run, runs[count] = time_pipeline(mixture, tokenizer, model, args.seq_len, count, args.warmup,
                                             args.timed, args.rows)
            results.append(run)

        epoch = DataPipeline(mixture, tokenizer, model, args.seq_len, DataConfig(num_workers=0, num_epochs=1),
                             global_rows=args.rows)
        with epoch.iterator() as iterator:
            ours = collections.Counter(sample for batch in iterator
                                       for sample in packed_samples(batch, context_id, model.num_image_token))
    expected = collections.Counter((tokens["input_ids"].tobytes(), tokens["labels"].tobytes(), pixels.tobytes())
                                   for tokens, pixels in references)
    baseline = next(iter(runs.values()))
    same_batches = all(len(batches) == len(baseline) and all(
        all(np.array_equal(a[name], b[name]) for name in a) for a, b in zip(batches, baseline))
        for batches in runs.values())

    print(f"data pipeline: {len(mixture)} synthetic samples (64..{args.max_side} px), "
          f"{model.vision.image_size}-px tiles, 1..{args.max_tiles} tiles + thumbnail, T={args.seq_len}, "
          f"{args.rows} row(s) per batch, {os.cpu_count()} CPU cores")
    print(f"{'implementation':<24}{'samples/s':>11}{'tiles/s':>10}{'x ref':>8}{'CPU ms/sample':>15}"
          f"{'x ref per CPU':>15}{'1st batch':>11}")
    reference_cpu = reference.cpu_seconds / reference.samples
    for run in results:
        cpu = run.cpu_seconds / run.samples
        startup = "-" if run.first_batch is None else f"{run.first_batch:.1f} s"
        print(f"{run.name:<24}{run.samples / run.seconds:>11.1f}{run.tiles / run.seconds:>10.1f}"
              f"{run.samples / run.seconds / (reference.samples / reference.seconds):>8.2f}{cpu * 1e3:>15.1f}"
              f"{reference_cpu / cpu:>15.2f}{startup:>11}")
    print(f"outputs equal to the reference: {ours == expected} ({sum(expected.values())} samples: ids, labels and "
          f"normalised tiles bit for bit)")
    print(f"identical batches for workers {workers}: {same_batches}")
    if ours != expected or not same_batches:
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
