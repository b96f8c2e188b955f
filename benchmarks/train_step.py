"""Training-step speed against transformers: same config, same CPU, same FLOP count, one run.

    python benchmarks/train_step.py [--quick] [--steps 5] [--rounds 3]

The pinned small config of `pinned.py` (fp32), stage 2 (ViT, projector and LLM all trainable),
one optimizer step on 4 rows × 512 tokens with 2 tiles of 224 px per row (the 2 × 64 image
tokens are part of the 512; every other token is supervised):
  ours:         the real jitted step (`internvl_jax.train.step.TrainStep`: forward, chunked
                loss, backward, global-norm clipping, AdamW), compiled ahead of time;
  transformers: InternVLForConditionalGeneration with a Llama text model of the same
                dimensions: forward with labels, backward, `clip_grad_norm_`, `torch.optim.AdamW`.
Both sides are charged the same model FLOPs (`internvl_jax.train.flops.step_flops`), so their
FLOP/s differ exactly as their step times do. The machine's fp32 matmul peak is the best of a
4096² matmul in jax and in torch. The two steps and the two matmuls run in alternating rounds (the
CPU is shared with whatever else runs; a slow spell then hits all four) and each reports its best.
Prints step times, tokens/s, the ratio (target ≥ 1.5×), each side's fraction of the peak
(target ≥ 60% for ours), and the XLA memory and cost analysis of our compiled step.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.config import Config, MeshConfig, load_config
from internvl_jax.sharding import make_mesh, state_shardings
from internvl_jax.train import flops
from internvl_jax.train.loss import IGNORE_INDEX
from internvl_jax.train.optimizer import learning_rate_schedule
from internvl_jax.train.state import create_train_state
from internvl_jax.train.step import TrainStep
from pinned import TILES, bench_config, quick_config

ROWS, LENGTH = 4, 512
TOTAL_STEPS = 1000  # schedule length only: the benchmark runs a handful of steps


def train_config(quick: bool) -> Config:
    """The tiny recipe's optimisation settings on the pinned model, every group trainable (stage 2)."""
    base = load_config("tiny", ["train.trainable=vision_model,mlp1,language_model", "train.warmup_steps=0",
                                f"train.total_steps={TOTAL_STEPS}", f"train.global_batch_size={ROWS}"])
    model = quick_config() if quick else bench_config()
    return dataclasses.replace(base, model=model, mesh=MeshConfig(data=1, fsdp=1, tensor=1))


def make_batch(config: Config, rows: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One micro-batch of the batch contract: per row a BOS, 2 tiles' image tokens, then text.

    Labels are the ids except on image tokens (ignored), as the SFT data gives them.
    """
    rng = np.random.default_rng(seed)
    image_id, image_tokens = config.model.img_context_token_id, config.model.num_image_token * TILES
    ids = rng.integers(3, min(config.model.llm.vocab_size, 7000), (rows, length)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1:1 + image_tokens] = image_id
    labels = np.where(ids == image_id, IGNORE_INDEX, ids).astype(np.int32)
    size = config.model.vision.image_size
    return dict(input_ids=ids, labels=labels, segment_ids=np.ones((rows, length), np.int32),
                positions=np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
                pixel_values=rng.integers(0, 256, (rows * TILES, size, size, 3), dtype=np.uint8),
                image_flags=np.ones(rows * TILES, np.int32), num_samples=np.ones(rows, np.int32))


# ------------------------------------------------------------------------------------------
# The machine's peak.


class MatmulSide:
    """One size² fp32 matmul in jax or torch (each with its own threading); `run()` waits for it.

    Timed in the same alternating rounds as the two steps, so a slow spell of the shared CPU does
    not lower the peak (and raise both peak fractions) more than it slows the steps.
    """

    def __init__(self, framework: str, size: int):
        a, b = (np.random.default_rng(seed).standard_normal((size, size), np.float32) for seed in (0, 1))
        self.flop = 2.0 * size ** 3
        if framework == "jax":
            matmul, a, b = jax.jit(jnp.matmul), jnp.asarray(a), jnp.asarray(b)
            self._call = lambda: matmul(a, b).block_until_ready()
        else:
            import torch
            a, b = torch.from_numpy(a), torch.from_numpy(b)
            self._call = lambda: torch.matmul(a, b)
        self._call()  # compile / first-call allocations

    def run(self) -> None:
        self._call()


# ------------------------------------------------------------------------------------------
# The two steps.


class OurStep:
    """The framework's compiled train step; `run()` does one step and waits for it."""

    def __init__(self, config: Config, batch: dict[str, np.ndarray], compiler_options: dict | None = None):
        self.mesh = make_mesh(config.mesh, jax.devices()[:1])
        graphdef, self.state = nnx.split(create_train_state(config, TOTAL_STEPS, self.mesh))
        schedule = learning_rate_schedule(config.train, TOTAL_STEPS)
        self.step = TrainStep(graphdef, config.train, schedule, state_shardings(self.state, self.mesh), self.mesh)
        stacked = {k: v[None] for k, v in batch.items()}  # one micro-batch (no accumulation)
        self.batch = jax.device_put(stacked, self.step.batch_sharding(stacked))
        self.compiled = self.step.compile(self.state, self.batch, compiler_options)
        self.loss = float("nan")

    def run(self) -> None:
        self.state, metrics = self.step(self.state, self.batch)
        self.loss = float(metrics["loss"])  # a host read: the step is done


class ReferenceStep:
    """transformers' model with torch AdamW (same hyper-parameters) and the same clipping."""

    def __init__(self, config: Config, batch: dict[str, np.ndarray]):
        import torch
        from internvl_jax.data.tiling import normalize
        from pinned import reference_model
        torch.manual_seed(0)
        self.torch = torch
        self.model = reference_model(config.model).train()
        t = config.train
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.learning_rate, betas=(t.adam_b1, t.adam_b2),
                                           eps=t.adam_eps, weight_decay=t.weight_decay)
        self.max_grad_norm = t.max_grad_norm
        self.inputs = dict(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                           labels=torch.from_numpy(batch["labels"]).long(),
                           attention_mask=torch.ones(batch["input_ids"].shape, dtype=torch.long),
                           pixel_values=torch.from_numpy(normalize(batch["pixel_values"])))
        self.loss = float("nan")

    def run(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(**self.inputs).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.loss = float(loss.detach())


def best_step_seconds(sides: dict, steps: int, rounds: int) -> dict[str, float]:
    """Best single-step time of each side over `rounds` alternating rounds of `steps` steps."""
    best = {name: float("inf") for name in sides}
    for _ in range(rounds):
        for name, side in sides.items():
            for _ in range(steps):
                start = time.perf_counter()
                side.run()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


# ------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a much smaller model, 2 rows × 128 tokens, 1024² matmuls, 2 steps a side (for the suite)")
    parser.add_argument("--steps", type=int, default=3, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: the cores this process may use)")
    args = parser.parse_args(argv)
    rows, length, peak_size = ROWS, LENGTH, 4096
    if args.quick:
        rows, length, peak_size = 2, 128, 1024
        args.steps, args.rounds = 1, 2
    import torch
    torch.set_num_threads(args.threads)

    config = train_config(args.quick)
    batch = make_batch(config, rows, length)
    tokens = rows * length
    model_flops = flops.step_flops(config, batch["segment_ids"], batch["image_flags"])
    # Quick runs measure nothing that matters: LLVM's cheapest settings halve the compile time.
    ours = OurStep(config, batch, {"xla_backend_optimization_level": 0} if args.quick else None)
    reference = ReferenceStep(config, batch)
    matmuls = {framework: MatmulSide(framework, peak_size) for framework in ("jax", "torch")}
    ours.run(), reference.run()  # warm-up: first-call allocations and set-up on both sides
    seconds = best_step_seconds({"ours": ours, "reference": reference, **matmuls}, args.steps, args.rounds)
    peaks = {framework: side.flop / seconds[framework] for framework, side in matmuls.items()}
    peak = max(peaks.values())

    memory = ours.compiled.memory_analysis()
    cost = ours.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report = {"model_flops": model_flops, "peak_flops": peak, "peaks": peaks, "tokens": tokens,
              "compile_s": ours.step.compile_seconds, "memory": {
                  "arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                  "temporaries": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes},
              "xla_flops": float(cost.get("flops", float("nan"))) if cost else float("nan")}
    for name in ("ours", "reference"):
        report[name] = {"step_s": seconds[name], "tokens_per_s": tokens / seconds[name],
                        "flops_per_s": model_flops / seconds[name],
                        "peak_fraction": model_flops / seconds[name] / peak}
    report["ratio"] = report["ours"]["tokens_per_s"] / report["reference"]["tokens_per_s"]
    print_report(config, report, rows, length, args, ours.loss, reference.loss)
    return report


def print_report(config: Config, report: dict, rows: int, length: int, args, our_loss: float, ref_loss: float) -> None:
    mib = lambda n: f"{n / 2 ** 20:.1f} MiB"
    m = config.model
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores (torch threads {args.threads}), "
          f"load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}")
    print(f"config: ViT {m.vision.num_layers}x{m.vision.hidden_size} at {m.vision.image_size} px, "
          f"LLM {m.llm.num_layers}x{m.llm.hidden_size} ({m.llm.num_heads}/{m.llm.num_kv_heads} heads, MLP "
          f"{m.llm.intermediate_size}, vocab {m.llm.vocab_size}), fp32, stage 2; batch {rows}x{length} tokens, "
          f"{rows * TILES} tiles; best step of {args.rounds} rounds x {args.steps}")
    print(f"model FLOPs per step: {report['model_flops'] / 1e9:.1f} GFLOP (XLA's count of our compiled step: "
          f"{report['xla_flops'] / 1e9:.1f} GFLOP)")
    print(f"fp32 matmul peak: {report['peak_flops'] / 1e9:.1f} GFLOP/s (jax {report['peaks']['jax'] / 1e9:.1f}, "
          f"torch {report['peaks']['torch'] / 1e9:.1f})")
    print(f"{'':14} {'step ms':>9} {'tokens/s':>9} {'GFLOP/s':>8} {'of peak':>8}  loss")
    for name, label, loss in (("ours", "internvl-jax", our_loss), ("reference", "transformers", ref_loss)):
        row = report[name]
        print(f"{label:14} {row['step_s'] * 1e3:>9.1f} {row['tokens_per_s']:>9.0f} {row['flops_per_s'] / 1e9:>8.1f} "
              f"{row['peak_fraction']:>8.1%}  {loss:.3f}")
    if os.getloadavg()[0] > os.cpu_count():
        print(f"WARNING: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other processes share the "
              "CPU; torch's OpenMP threads lose more to that than XLA's, so the ratio and the peak fractions "
              "below overstate ours. Rerun on an idle machine for figures to quote.")
    ratio, fraction = report["ratio"], report["ours"]["peak_fraction"]
    print(f"ratio: {ratio:.2f}x transformers' tokens/s (target >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'}); "
          f"ours at {fraction:.1%} of peak (target >= 60%: {'met' if fraction >= 0.6 else 'NOT met'})")
    mem = report["memory"]
    print(f"memory analysis (compiled step): arguments {mib(mem['arguments'])}, outputs {mib(mem['outputs'])}, "
          f"aliased {mib(mem['aliased'])}, temporaries {mib(mem['temporaries'])}; compile {report['compile_s']:.1f} s")


if __name__ == "__main__":
    main()
