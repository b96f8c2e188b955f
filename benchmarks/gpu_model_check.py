"""GPU check of the model core and MFU of the Mini-InternVL-2B train step (for a task lent a GPU).

Uses that machine's own jax and imports no data stack. On one H100 it finishes in under 8
minutes (the sweep stops starting settings when its budget is spent):

1. cuDNN flash attention against the XLA reference in bf16: the LLM's case (GQA, packed
   segments, causal) and the ViT's (1025 tokens, no mask).
2. The tiny model in bf16 against float32 (logit agreement).
3. The bf16 matmul rate this GPU reaches (8192³), for scale.
4. MFU of the real train step (`TrainStep`: forward, chunked loss, backward, global-norm clip,
   AdamW) of the Mini-InternVL-Chat-2B stage-2 recipe (everything trainable, drop path on) on
   rows of 4096 tokens with 13 tiles of 448 px (12 + thumbnail), bf16 compute, fp32 master
   weights, over a sweep of settings (remat policy, attention, layer scan, XLA flags, micro-batch
   rows, gradient accumulation). Each setting runs in its own subprocess, so each can have its
   own XLA flags and an out-of-memory ends only that one. Prints each setting's figures as it
   finishes and the best at the end. MFU = model FLOPs (`internvl_jax.train.flops`) / step time /
   the device's dense bf16 peak (989 TFLOP/s for H100/H200); target ≥ 50%.

    python benchmarks/gpu_model_check.py [--quick] [--budget-s 400] [--settings a,b,...]
    python benchmarks/gpu_model_check.py --smoke   # the same code paths on CPU with the tiny model
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

# name: (config overrides, extra XLA flags, micro-batch rows, micro-batches per step). In the
# order they run; the first few are the likeliest winners, so a short budget still sees them.
SETTINGS = {
    "flash_save_dots": (["model.remat_policy=save_dots"], "", 1, 4),
    "flash_none": (["model.remat_policy=none"], "", 1, 4),
    "flash_save_dots_cublas": (["model.remat_policy=save_dots"], "--xla_gpu_enable_triton_gemm=false", 1, 4),
    "flash_save_dots_ga1": (["model.remat_policy=save_dots"], "", 1, 1),
    "flash_full": (["model.remat_policy=full"], "", 1, 4),
    "flash_save_dots_rows2": (["model.remat_policy=save_dots"], "", 2, 2),
    "flash_save_dots_unrolled": (["model.remat_policy=save_dots", "model.scan_layers=false"], "", 1, 4),
    "xla_attention_full": (["model.remat_policy=full", "model.attention=xla"], "", 1, 4),
}
COMMON = ["model.attention=cudnn", "model.dtype=bfloat16", "train.total_steps=1000", "train.warmup_steps=10"]
TOKENS, TILES = 4096, 13


# ------------------------------------------------------------------------------------------
# Checks (parent process).


def attention_parity(length: int = 1024) -> dict[str, float]:
    """Max |cuDNN − XLA| in bf16, for the LLM's and the ViT's attention."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from internvl_jax.models.attention import attention

    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    results = {}
    b, kv, g, hd = 2, 4, 4, 128
    q, k, v = normal(b, length, kv, g, hd), normal(b, length, kv, hd), normal(b, length, kv, hd)
    seg = np.ones((b, length), np.int32)
    seg[0, length // 2:] = 2
    seg = jnp.asarray(seg)
    run = lambda backend: jax.jit(lambda q, k, v, s: attention(q, k, v, q_segment_ids=s, kv_segment_ids=s,
                                                               causal=True, backend=backend))(q, k, v, seg)
    results["llm (GQA, 2 segments, causal)"] = float(jnp.max(jnp.abs(run("cudnn").astype(jnp.float32)
                                                                     - run("xla").astype(jnp.float32))))
    n, t, heads, hd = 3, 1025, 16, 64
    q, k, v = normal(n, t, heads, 1, hd), normal(n, t, heads, hd), normal(n, t, heads, hd)
    run = lambda backend: jax.jit(lambda q, k, v: attention(q, k, v, causal=False, backend=backend))(q, k, v)
    results["vit (1025 tokens, no mask)"] = float(jnp.max(jnp.abs(run("cudnn").astype(jnp.float32)
                                                                 - run("xla").astype(jnp.float32))))
    return results


def tiny_bf16_agreement() -> tuple[float, float]:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from internvl_jax.config import load_config
    from internvl_jax.models.params import create_model

    config = load_config("tiny", ["model.img_context_token_id=1000"]).model
    model = create_model(config, seed=0)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 900, (2, 64)).astype(np.int32)
    ids[:, 2:18] = 1000
    pixels = jnp.asarray(rng.normal(size=(2, 3, 112, 112)), jnp.float32)
    fwd = nnx.jit(lambda m, i, p: m(i, p, jnp.ones(2, jnp.int32)))
    ref = fwd(model, jnp.asarray(ids), pixels)
    bf16 = nnx.merge(nnx.graphdef(create_model(dataclasses.replace(config, dtype="bfloat16"), seed=0)),
                     nnx.state(model))
    out = fwd(bf16, jnp.asarray(ids), pixels)
    delta = float(jnp.max(jnp.abs(out - ref)) / jnp.std(ref))
    top1 = float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1)))
    return delta, top1


def matmul_rate(size: int = 8192, repeats: int = 10) -> float:
    """Best bf16 FLOP/s of a size³ matmul on random data."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


# ------------------------------------------------------------------------------------------
# One setting (child process).


def make_batch(config, rows: int, grad_accum: int, tokens: int, tiles: int):
    """A stacked step batch [GA, rows, ...]: per row BOS, `tiles` tiles' image tokens, then text."""
    import numpy as np
    from internvl_jax.train.loss import IGNORE_INDEX
    rng = np.random.default_rng(0)
    m = config.model
    ids = rng.integers(3, min(m.llm.vocab_size, 90000), (grad_accum, rows, tokens)).astype(np.int32)
    ids[..., 1:1 + tiles * m.num_image_token] = m.img_context_token_id
    size = m.vision.image_size
    return dict(input_ids=ids, labels=np.where(ids == m.img_context_token_id, IGNORE_INDEX, ids).astype(np.int32),
                segment_ids=np.ones(ids.shape, np.int32),
                positions=np.broadcast_to(np.arange(tokens, dtype=np.int32), ids.shape).copy(),
                pixel_values=rng.integers(0, 256, (grad_accum, rows * tiles, size, size, 3), dtype=np.uint8),
                image_flags=np.ones((grad_accum, rows * tiles), np.int32),
                num_samples=np.ones((grad_accum, rows), np.int32))


def run_setting(name: str, args) -> dict:
    import jax
    import numpy as np
    from flax import nnx
    from internvl_jax.config import MeshConfig, load_config
    from internvl_jax.sharding import make_mesh, state_shardings
    from internvl_jax.train import flops
    from internvl_jax.train.optimizer import learning_rate_schedule
    from internvl_jax.train.state import create_train_state
    from internvl_jax.train.step import TrainStep

    overrides, _, rows, grad_accum = SETTINGS[name]
    overrides = COMMON + overrides + [f"train.global_batch_size={rows * grad_accum}",
                                      f"train.grad_accum_steps={grad_accum}"]
    if args.quick:
        overrides += ["model.llm.num_layers=4", "model.vision.num_layers=4"]
    if args.smoke:
        overrides += ["model.img_context_token_id=1000", "model.dtype=float32"]
    config = load_config(args.model, overrides)
    config = dataclasses.replace(config, mesh=MeshConfig(data=1, fsdp=1, tensor=1))
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    started = time.perf_counter()
    graphdef, state = nnx.split(create_train_state(config, config.train.total_steps, mesh, initial_weights=False))
    init_s = time.perf_counter() - started
    step = TrainStep(graphdef, config.train, learning_rate_schedule(config.train, config.train.total_steps),
                     state_shardings(state, mesh), mesh)
    local = make_batch(config, rows, grad_accum, args.tokens, args.tiles)
    batch = jax.device_put(local, step.batch_sharding(local))
    compiled = step.compile(state, batch)
    memory = compiled.memory_analysis()
    state, metrics = step(state, batch)  # warm-up
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    best = min(times)
    model_flops = flops.step_flops(config, local["segment_ids"], local["image_flags"])
    peak = flops.peak_flops_per_device(jax.devices()[0].device_kind) or float("nan")
    return dict(setting=name, rows=rows, grad_accum=grad_accum, tokens_per_step=int(np.prod(local["input_ids"].shape)),
                step_s=best, median_s=float(np.median(times)), tokens_per_s=np.prod(local["input_ids"].shape) / best,
                model_tflop=model_flops / 1e12, tflops=model_flops / best / 1e12, mfu=model_flops / best / peak,
                init_s=init_s, compile_s=step.compile_seconds, loss=float(metrics["loss"]),
                temp_gib=memory.temp_size_in_bytes / 2 ** 30, args_gib=memory.argument_size_in_bytes / 2 ** 30)


# ------------------------------------------------------------------------------------------
# The sweep (parent process).


def sweep(args) -> list[dict]:
    """Runs each setting in a subprocess until the budget is spent; prints each result as it lands."""
    results = []
    deadline = time.monotonic() + args.budget_s
    for name in args.settings.split(","):
        remaining = deadline - time.monotonic()
        if remaining < 45:
            print(f"[{name}] skipped: {remaining:.0f} s of the budget left", flush=True)
            continue
        env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.92")
        env.pop("XLA_PYTHON_CLIENT_ALLOCATOR", None)  # the parent's setting (below), not the child's
        extra_flags = SETTINGS[name][1]
        if extra_flags:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + extra_flags).strip()
        command = [sys.executable, os.path.abspath(__file__), "--one", name, "--model", args.model,
                   "--tokens", str(args.tokens), "--tiles", str(args.tiles), "--steps", str(args.steps)]
        command += ["--quick"] * args.quick + ["--smoke"] * args.smoke
        started = time.monotonic()
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=remaining)
        except subprocess.TimeoutExpired:
            print(f"[{name}] stopped at the end of the budget", flush=True)
            break
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])
            why = next((l for l in reversed(tail) if "RESOURCE_EXHAUSTED" in l or "out of memory" in l.lower()), tail[-1])
            print(f"[{name}] failed after {time.monotonic() - started:.0f} s: {why[:300]}", flush=True)
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        result["wall_s"] = time.monotonic() - started
        results.append(result)
        print(f"[{name}] MFU {result['mfu']:.1%}: step {result['step_s'] * 1e3:.0f} ms for {result['tokens_per_step']} "
              f"tokens ({result['rows']} row(s) x {result['grad_accum']} micro-batches), {result['tflops']:.0f} TFLOP/s, "
              f"{result['tokens_per_s']:,.0f} tokens/s; compile {result['compile_s']:.0f} s, temporaries "
              f"{result['temp_gib']:.1f} GiB, arguments {result['args_gib']:.1f} GiB; loss {result['loss']:.3f}; "
              f"{result['wall_s']:.0f} s in all", flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 ViT and 4 LLM layers")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 256 tokens, 2 tiles: checks the code paths")
    parser.add_argument("--budget-s", type=float, default=400, help="seconds for the MFU sweep")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from: {', '.join(SETTINGS)}")
    parser.add_argument("--model", default="mini_internvl_chat_2b_v1_5_finetune")
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--tiles", type=int, default=TILES)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: run this setting, print RESULT json
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.tokens, args.tiles, args.steps = "tiny", 256, 2, 1
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.one:
        print("RESULT " + json.dumps(run_setting(args.one, args)), flush=True)
        return
    started = time.monotonic()
    # This process keeps its GPU context while the settings run: allocate and free its check
    # buffers directly instead of reserving most of the memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
    import jax
    import flax
    import optax
    print("devices:", jax.devices(), "| jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
          flush=True)
    try:  # a failing check is reported and the sweep still runs: each setting is its own process
        for case, delta in attention_parity().items():
            print(f"cuDNN vs XLA attention, bf16, {case}: max |diff| {delta:.4g}", flush=True)
        delta, top1 = tiny_bf16_agreement()
        print(f"tiny model bf16 vs fp32: max|diff|/std = {delta:.4g}, top-1 agreement {top1:.4f}", flush=True)
    except Exception as error:  # noqa: BLE001 (any failure is a finding to print)
        print(f"CHECK FAILED: {type(error).__name__}: {str(error)[:500]}", flush=True)
    rate = matmul_rate(1024 if args.smoke else 8192, 3 if args.smoke else 10)
    print(f"bf16 matmul rate: {rate / 1e12:.1f} TFLOP/s", flush=True)
    print(f"MFU sweep: {args.model}{' (4+4 layers)' if args.quick else ''}, rows of {args.tokens} tokens with "
          f"{args.tiles} tiles, bf16 compute, stage 2; budget {args.budget_s:.0f} s", flush=True)
    results = sweep(args)
    if results:
        best = max(results, key=lambda r: r["mfu"])
        print(f"{'setting':28} {'MFU':>6} {'TFLOP/s':>8} {'step ms':>8} {'tokens/s':>9} {'of matmul rate':>15}")
        for r in results:
            print(f"{r['setting']:28} {r['mfu']:>6.1%} {r['tflops']:>8.0f} {r['step_s'] * 1e3:>8.0f} "
                  f"{r['tokens_per_s']:>9,.0f} {r['tflops'] * 1e12 / rate:>15.1%}")
        print(f"best: {best['setting']} at {best['mfu']:.1%} MFU (target >= 50%: "
              f"{'met' if best['mfu'] >= 0.5 else 'NOT met'}); whole run {time.monotonic() - started:.0f} s", flush=True)
        out = os.environ.get("OUT")
        if out:
            with open(os.path.join(out, "gpu_model_check.json"), "w") as f:
                json.dump({"matmul_rate": rate, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
