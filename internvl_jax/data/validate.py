"""Check a training meta file before training: ``python -m internvl_jax.data.validate META --tokenizer DIR``.

Reports per data set the sample count, image and placeholder counts, token-length and tile-count
statistics at the configured tile budget, how many samples would be truncated or dropped, and
every bad row with its file and line. With ``--check-images`` every image is also decoded and
tiled (slow, but it finds truncated files and wrong annotated sizes). Exits 1 when any row is bad
or would be dropped, 2 when the meta file itself cannot be read, else 0.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys

import numpy as np

from internvl_jax.config import load_config
from internvl_jax.data.config import DataConfig
from internvl_jax.data.conversation import IMAGE_PLACEHOLDER
from internvl_jax.data.images import DEFAULT_MAX_PIXELS
from internvl_jax.data.samples import SampleDrop, SampleSpec, load_tiles, measure, read_record
from internvl_jax.data.sources import DataError, Mixture, open_meta
from internvl_jax.data.tokenizer import load_tokenizer


@dataclasses.dataclass
class DatasetReport:
    """What one data set of the meta file holds; ``bad`` lists (where, reason, detail)."""

    name: str
    location: str
    rows: int
    in_mix: int
    usable: int = 0
    text_only: int = 0
    images: int = 0
    placeholders: int = 0
    truncated: int = 0
    token_lengths: list[int] = dataclasses.field(default_factory=list)
    tile_counts: list[int] = dataclasses.field(default_factory=list)
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bad: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        def stats(values):
            if not values:
                return {}
            array = np.asarray(values)
            return {"min": int(array.min()), "mean": round(float(array.mean()), 1),
                    "p95": int(np.percentile(array, 95)), "max": int(array.max())}

        fields = {name: getattr(self, name) for name in ("name", "location", "rows", "in_mix", "usable", "text_only",
                                                        "images", "placeholders", "truncated")}
        return {**fields, "tokens": stats(self.token_lengths), "tiles": stats(self.tile_counts),
                "dropped": dict(self.dropped), "bad_lines": sum(reason == "bad_line" for _, reason, _ in self.bad),
                "bad": [list(entry) for entry in self.bad]}


def _placeholders(conversations: list) -> int:
    return sum(str(turn.get("value", "")).count(IMAGE_PLACEHOLDER) for turn in conversations
               if isinstance(turn, dict))


def validate(mixture: Mixture, tokenizer, spec: SampleSpec, tiles_per_row: int,
             check_images: bool = False) -> list[DatasetReport]:
    """One report per data set; every row is measured (and decoded with ``check_images``)."""
    reports = []
    for dataset, dataset_spec in enumerate(mixture.specs):
        source = mixture.source(dataset)
        location = dataset_spec.annotation or f"tfds:{dataset_spec.tfds.get('name')}"
        report = DatasetReport(dataset_spec.name, location, len(source), int(len(source) * dataset_spec.repeat_time))
        report.bad += [(line.where, "bad_line", f"{line.reason}: {line.detail}") for line in mixture.bad_lines
                       if line.where.rsplit(":", 1)[0] == dataset_spec.annotation]
        max_tiles = spec.dataset_max_tiles(dataset_spec)
        for index in range(len(source)):
            try:
                record = read_record(source, index)
                measured = measure(record, spec, tokenizer, max_tiles)
                if measured.num_tiles > tiles_per_row:
                    raise SampleDrop(record.where, "too_many_tiles",
                                     f"{measured.num_tiles} tiles > {tiles_per_row} per row")
                if check_images:
                    load_tiles(record, measured, spec)
            except SampleDrop as drop:
                report.dropped[drop.reason] += 1
                report.bad.append((drop.where, drop.reason, drop.detail))
                continue
            report.usable += 1
            report.text_only += not record.images
            report.images += len(record.images)
            report.placeholders += _placeholders(record.conversations)
            report.truncated += measured.truncated
            report.token_lengths.append(measured.num_tokens)
            report.tile_counts.append(measured.num_tiles)
        reports.append(report)
    return reports


def format_report(reports: list[DatasetReport], spec: SampleSpec, tiles_per_row: int, max_listed: int) -> str:
    lines = [f"T = {spec.max_length} tokens, {spec.num_image_token} tokens per tile, tiles {spec.min_tiles}.."
             f"{spec.max_tiles} per sample (+ thumbnail), {tiles_per_row} tiles per packed row"]
    for report in reports:
        summary = report.summary()
        tokens, tiles = summary["tokens"], summary["tiles"]
        lines += [
            f"\n{report.name}: {report.location}",
            f"  rows {report.rows} parsed (in the mix {report.in_mix}), usable {report.usable}, text-only "
            f"{report.text_only}, images {report.images}, <image> placeholders {report.placeholders}",
            f"  tokens  min {tokens.get('min', '-')}  mean {tokens.get('mean', '-')}  p95 {tokens.get('p95', '-')}  "
            f"max {tokens.get('max', '-')}; truncated at T: {report.truncated}",
            f"  tiles   min {tiles.get('min', '-')}  mean {tiles.get('mean', '-')}  p95 {tiles.get('p95', '-')}  "
            f"max {tiles.get('max', '-')}",
            f"  bad lines {summary['bad_lines']}, would be dropped {sum(report.dropped.values())}"
            + (f" ({', '.join(f'{r} {n}' for r, n in sorted(report.dropped.items()))})" if report.dropped else ""),
        ]
        for where, reason, detail in report.bad[:max_listed]:
            lines.append(f"    {where}: {reason}" + (f": {detail}" if detail else ""))
        if len(report.bad) > max_listed:
            lines.append(f"    ... {len(report.bad) - max_listed} more")
    bad = sum(len(report.bad) for report in reports)
    lines.append(f"\n{'OK' if not bad else f'ERRORS: {bad} bad rows'}: "
                 f"{sum(r.usable for r in reports)} usable samples in {len(reports)} data sets")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("meta", help="meta JSON file")
    parser.add_argument("--tokenizer", required=True, help="folder with the checkpoint's tokenizer files")
    parser.add_argument("--config", default="internvl_chat_v1_5", help="config name or file (model settings)")
    parser.add_argument("--override", action="append", default=[], help="config key=value (repeatable)")
    parser.add_argument("--max-seq-length", type=int, help="T (default: the config's train.max_seq_length)")
    parser.add_argument("--max-tiles", type=int, help="tiles per sample (default: model.max_dynamic_patch)")
    parser.add_argument("--max-tiles-per-row", type=int, default=0, help="packed row tile cap (0: T // tokens)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--exif-transpose", action="store_true")
    parser.add_argument("--alpha-on-white", action="store_true")
    parser.add_argument("--check-images", action="store_true", help="decode and tile every image")
    parser.add_argument("--max-listed", type=int, default=50, help="bad rows listed per data set")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)

    config = load_config(args.config, args.override)
    model = config.model if args.max_tiles is None else dataclasses.replace(config.model,
                                                                            max_dynamic_patch=args.max_tiles)
    data = DataConfig(max_pixels=args.max_pixels, exif_transpose=args.exif_transpose,
                      alpha_on_white=args.alpha_on_white, max_tiles_per_row=args.max_tiles_per_row)
    spec = SampleSpec.from_configs(model, args.max_seq_length or config.train.max_seq_length, data)
    tiles_per_row = data.tiles_per_row(spec.max_length, spec.num_image_token)
    try:
        mixture = open_meta(args.meta, on_bad_line="skip")
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        print(f"error: no tokenizer in {args.tokenizer}", file=sys.stderr)
        return 2
    reports = validate(mixture, tokenizer, spec, tiles_per_row, args.check_images)
    print(format_report(reports, spec, tiles_per_row, args.max_listed))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump([report.summary() for report in reports], file, indent=1)
    return 1 if any(report.bad for report in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
