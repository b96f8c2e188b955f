"""`python -m internvl_jax.eval`: evaluate a checkpoint on benchmarks in their official formats.

    python -m internvl_jax.eval --checkpoint CKPT --benchmarks textvqa,mme --data-dir DATA --out OUT
    python -m internvl_jax.eval ... --max-tiles 1,6,12,24,40          # tile-budget sweep
    python -m internvl_jax.eval ... --shard 0/4                        # one of 4 processes
    python -m internvl_jax.eval ... textvqa.max_new_tokens=20 prompt_sep='\\n'
    python -m internvl_jax.eval --list [--preset vlmevalkit]           # benchmarks and settings

Outputs go to OUT/<benchmark>/ (a sweep: OUT/tiles-<n>/<benchmark>/ and OUT/sweep.{md,csv,png}).
Every input file is read before the checkpoint is loaded, so a bad row fails in seconds.
Exit status: 0 done, 1 some samples failed (see results.json), 2 bad arguments or input.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from internvl_jax.eval.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from internvl_jax.eval.presets import GENERATION_OPTIONS, PRESETS, resolve_options, split_settings
from internvl_jax.eval.report import RESULTS, write_sweep
from internvl_jax.eval.runner import Predictor, RunConfig, evaluate_benchmark
from internvl_jax.eval.samples import BenchmarkError, Sample
from internvl_jax.eval.store import Shard



def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m internvl_jax.eval",
        description="Evaluate an InternVL checkpoint on benchmarks read from their official files "
                    f"({', '.join(BENCHMARKS)}; jsonl:PATH and tsv:PATH for your own sets).",
        epilog="Settings: key=value for all benchmarks, NAME.key=value or KIND.key=value for some; keys are "
               f"{', '.join(GENERATION_OPTIONS)} and each benchmark's file options (see --list); "
               "generation.KEY=VALUE passes a decoding option (do_sample, temperature, top_p, top_k, seed).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint directory (weights, config, tokenizer)")
    parser.add_argument("--benchmarks", default="", help="comma-separated benchmark names")
    parser.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path("data"),
                        help="folder laid out as InternVL's internvl_chat/data (default: ./data)")
    parser.add_argument("--out", type=pathlib.Path, help="output folder")
    parser.add_argument("--preset", default="official", choices=sorted(PRESETS),
                        help="generation settings per benchmark (default: official)")
    parser.add_argument("--max-tiles", default=None, metavar="N[,N...]",
                        help="tile budget for every benchmark; several values run a sweep")
    parser.add_argument("--multi-turn", action="store_true",
                        help="ask the questions on one image as one conversation, earlier turns as history")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per model call (default 8)")
    parser.add_argument("--shard", type=Shard.parse, default=Shard(), metavar="I/K",
                        help="this process takes every K-th sample from the I-th (default 0/1)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples of each benchmark")
    parser.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                        help="shard the model over a device mesh, e.g. 1,-1,1 (default: one device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="print the benchmarks' settings and exit")
    parser.add_argument("settings", nargs="*", metavar="key=value", help="override a setting")
    return parser.parse_args(argv)


def _budgets(text: str | None) -> list[int | None]:
    if text is None:
        return [None]
    try:
        budgets = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--max-tiles takes integers separated by commas, got {text!r}") from None
    if any(budget < 1 for budget in budgets) or len(set(budgets)) != len(budgets):
        raise ValueError(f"--max-tiles values must be distinct and >= 1, got {text!r}")
    return budgets


def _print_settings(benchmarks: Sequence[Benchmark], options: dict[str, dict]) -> None:
    for benchmark in benchmarks:
        print(f"{benchmark.name} (kind {benchmark.kind})")
        for key, value in options[benchmark.name].items():
            print(f"  {key} = {value!r}")


def _model_predictor(args: argparse.Namespace, generation: dict[str, Any]) -> Predictor:
    # Imported here: reading and checking benchmark files needs neither jax nor the model.
    from internvl_jax.config import MeshConfig
    from internvl_jax.pretrained import load_pretrained
    from internvl_jax.eval.runner import ModelPredictor
    from internvl_jax.sharding import make_mesh

    mesh = make_mesh(MeshConfig(*[int(size) for size in args.mesh.split(",")])) if args.mesh else None
    model, tokenizer, config = load_pretrained(args.checkpoint, mesh=mesh)
    if tokenizer is None:
        raise ValueError(f"no tokenizer files in {args.checkpoint}")
    return ModelPredictor(model, tokenizer, config, mesh=mesh, generation=generation)


def _version() -> str:
    try:
        return importlib.metadata.version("internvl-jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None, predictor: Predictor | None = None) -> int:
    """Runs the command line; `predictor` replaces the checkpoint (tests, other back ends)."""
    args = _parse_args(argv)
    try:
        overrides, generation = split_settings(args.settings)
        budgets = _budgets(args.max_tiles)
        names = [name for name in args.benchmarks.split(",") if name] or (list(BENCHMARKS) if args.list else [])
        if not names:
            raise ValueError("--benchmarks is required (e.g. --benchmarks textvqa,mme)")
        benchmarks = [get_benchmark(name) for name in names]
        if len({b.name for b in benchmarks}) != len(benchmarks):
            raise ValueError(f"benchmark names repeat: {names}")
        options = resolve_options(benchmarks, args.preset, overrides,
                                  budgets[0] if len(budgets) == 1 else None)
        if args.list:
            _print_settings(benchmarks, options)
            return 0
        if args.out is None:
            raise ValueError("--out is required")
        if predictor is None and not args.checkpoint:
            raise ValueError("--checkpoint is required")
        config = RunConfig(batch_size=args.batch_size, multi_turn=args.multi_turn, shard=args.shard,
                           limit=args.limit, progress=not args.no_progress)
        samples = {b.name: b.load(args.data_dir, options[b.name]) for b in benchmarks}
    except ValueError as error:  # BenchmarkError included: bad input names its file and line
        print(f"error: {error}", file=sys.stderr)
        return 2
    if predictor is None:
        predictor = _model_predictor(args, generation)
    run_info = {"preset": args.preset, "checkpoint": args.checkpoint, "version": _version(),
                "generation": generation}
    try:
        return _run(args, benchmarks, options, samples, budgets, predictor, config, run_info)
    except BenchmarkError as error:  # e.g. a predictions folder made with other settings
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, benchmarks: Sequence[Benchmark], options: dict[str, dict],
         samples: dict[str, list[Sample]], budgets: list[int | None], predictor: Predictor, config: RunConfig,
         run_info: dict[str, Any]) -> int:
    sweep = len(budgets) > 1
    failed = False
    for budget in budgets:
        for benchmark in benchmarks:
            run_options = dict(options[benchmark.name], **({"max_tiles": budget} if sweep else {}))
            out_dir = args.out / f"tiles-{budget}" / benchmark.name if sweep else args.out / benchmark.name
            document = evaluate_benchmark(benchmark, samples[benchmark.name], run_options, predictor, out_dir,
                                          config, run_info)
            if document is not None:
                failed |= document["num_failed"] > 0
                print(_summary(document, run_options["max_tiles"]))
    if sweep:
        _write_sweep_if_complete(args.out, budgets, benchmarks)
    return 1 if failed else 0


def _summary(document: dict, tiles: int) -> str:
    score = "no ground truth (export only)" if document["score"] is None else \
        f"{document['metric']} {document['score']:.2f}"
    failures = f", {document['num_failed']} FAILED" if document["num_failed"] else ""
    return f"{document['benchmark']} (tiles {tiles}): {score} over {document['num_samples']} samples{failures}"


def _write_sweep_if_complete(out: pathlib.Path, budgets: list[int], benchmarks: Sequence[Benchmark]) -> None:
    paths = {(b.name, budget): out / f"tiles-{budget}" / b.name / RESULTS for b in benchmarks for budget in budgets}
    if not all(path.exists() for path in paths.values()):
        return  # other shards are still running; the last one writes the sweep
    results = {b.name: {budget: json.loads(paths[b.name, budget].read_text(encoding="utf-8")) for budget in budgets}
               for b in benchmarks}
    for path in write_sweep(out, budgets, results):
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
