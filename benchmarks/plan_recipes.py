"""Memory plans of the shipped recipes on their target TPU topologies (`internvl_jax.plan`).

    python benchmarks/plan_recipes.py [--quick] [--only NAME_SUBSTRING] [--json out.json]

Compiles every target below with libtpu's XLA:TPU compiler on this machine (no TPU) and prints
per-device GiB of parameters, optimizer state, inputs, temporaries and the total against the
usable HBM (memory_analysis's upper bound and what XLA:TPU allocated), the verdict and the
compile time. `--quick` plans only the tiny config.

Results are recorded in `benchmarks/plans/` (committed), one JSON per compile, keyed like
`python -m internvl_jax.plan`'s cache by the lowered programs (StableHLO with shardings), the
topology and the compiler versions: the test suite lowers the shipped recipes' steps and reads
the verdict of exactly that program from the record, instead of spending 3-7 CPU minutes per 2B
compile. A changed program has a new key and is compiled (and recorded) again; rerun this script
and commit `benchmarks/plans/` after changing model or train-step code. The table says which rows
came from the record (the compile times are those of the run that wrote it).
"""
from __future__ import annotations

import argparse
import json
import pathlib

from internvl_jax.config import load_config
from internvl_jax.plan import GIB, plan

RECORDED = pathlib.Path(__file__).resolve().parent / "plans"

# (recipe, mode, topology, overrides, why). One v5e chip holds one 4096-token row per
# micro-batch; the whole step's stacked batch is an argument of the step, so its global batch
# is cut to 16 (the LoRA recipe's own).
ONE_CHIP = ("train.global_batch_size=16", "train.grad_accum_steps=16")
# Phi-3's LongRoPE factors are read from the checkpoint's config.json; their values (one per
# rotary frequency, 48) do not change the program's memory.
PHI3_ROPE = tuple(f"model.llm.rope.{name}_factor=" + ",".join(["1.0"] * 48) for name in ("short", "long"))
TARGETS = (
    ("tiny", "train", "v5e:2x2", (), "CPU-test model on the smallest multi-chip v5e slice"),
    ("mini_internvl_chat_2b_v1_5_pretrain", "train", "v5e:1x1", ONE_CHIP, "2B stage 1 on one v5e chip"),
    ("mini_internvl_chat_2b_v1_5_finetune_lora", "train", "v5e:1x1", ONE_CHIP, "2B LoRA on one v5e chip"),
    ("mini_internvl_chat_2b_v1_5_finetune", "train", "v5e:1x1", ONE_CHIP, "2B full finetune: too big for one v5e chip"),
    ("mini_internvl_chat_4b_v1_5_finetune_lora", "train", "v5e:1x1", ONE_CHIP + PHI3_ROPE, "4B LoRA on one v5e chip"),
    ("internvl_chat_v1_5_pretrain", "train", "v5p:2x2x1", ("train.grad_accum_steps=512",),
     "26B stage 1 (ViT + MLP trained) on 4 v5p chips, 1 row per device"),
    ("internvl_chat_v1_5_finetune", "train", "v5p:2x2x2", ("train.grad_accum_steps=128",),
     "26B stage 2 on the smallest v5p slice that holds it, 1 row per device"),
    ("internvl_chat_v1_5_finetune_lora", "train", "v5p:2x2x1", ("train.grad_accum_steps=4",),
     "26B LoRA on 4 v5p chips, 1 row per device"),
    ("internvl_chat_v1_5", "serve", "v5e:2x4", (), "26B serving, batch 8 × (4096 + 1024) tokens, 13 tiles each"),
    ("internvl_chat_v1_5", "serve", "v6e:2x2", (), "26B serving as above on 4 v6e chips"),
)


def run(targets, cache_dir=RECORDED) -> list[dict]:
    results = []
    for name, mode, topology, overrides, why in targets:
        result = plan(load_config(name, overrides), topology, mode, cache_dir=cache_dir)
        result.update(overrides=list(overrides), why=why)
        results.append(result)
        print(row(result), flush=True)
    return results


HEADER = ("| recipe | mode | topology | overrides | params | optimizer | inputs | temps | total (memory_analysis) "
          "| total (XLA:TPU) | usable HBM | verdict | compile s (CPU s) |\n" + "|---" * 13 + "|")


def row(result: dict) -> str:
    b = result["per_device_bytes"]
    gib = lambda key: f"{b[key] / GIB:.2f}" if b.get(key) is not None else "—"
    inputs = (b.get("batch", 0) + b.get("kv_cache", 0)) / GIB
    verdict = "fits" if result["fits"] else "does not fit"
    if result["compiler_error"]:
        verdict += " (compiler OOM)"
    cpu = result["compile_cpu_seconds"]
    seconds = f"{result['compile_seconds']:.0f}" + (f" ({cpu:.0f})" if cpu is not None else "")
    seconds += ", cached" if result["cached"] else ""
    overrides = " ".join(o if len(o) <= 60 else o.split("=")[0] + "=…" for o in result["overrides"]) or "—"
    cells = [result["config"], result["mode"], result["topology"], overrides,
             gib("params"), gib("optimizer"), f"{inputs:.2f}", gib("temps"), gib("total"), gib("compiler_total"),
             f"{result['hbm_bytes'] / GIB:.2f}", verdict, seconds]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the tiny config")
    parser.add_argument("--only", default=None, help="only targets whose recipe name contains this")
    parser.add_argument("--cache-dir", default=str(RECORDED), help="recorded plans (default: benchmarks/plans)")
    parser.add_argument("--json", default=None, help="also write every plan to this file")
    args = parser.parse_args(argv)
    targets = [t for t in TARGETS if (not args.quick or t[0] == "tiny") and (args.only is None or args.only in t[0])]
    print("per-device GiB\n" + HEADER, flush=True)
    results = run(targets, args.cache_dir)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
