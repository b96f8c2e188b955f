"""Forward and forward+backward wall time of a model config on this machine's devices.

    python benchmarks/model_step.py [--config tiny] [--rows 4] [--length 256] [--tiles 4] [--quick] [key=value ...]

Prints compile time, best-of-N step times and tokens/s; the XLA memory analysis of the
compiled forward+backward.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.config import load_config
from internvl_jax.models.params import count_params, create_model
from internvl_jax.train.loss import mean_batch_loss


def make_inputs(config, rows: int, length: int, tiles: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = config.num_image_token
    ids = rng.integers(3, min(config.llm.vocab_size, 900), (rows, length)).astype(np.int32)
    per_row = tiles // rows
    for r in range(rows):
        ids[r, 2:2 + per_row * tokens] = config.img_context_token_id
    size = config.vision.image_size
    return dict(input_ids=jnp.asarray(ids), labels=jnp.asarray(ids),
                segment_ids=jnp.ones((rows, length), jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length)),
                pixel_values=jnp.asarray(rng.integers(0, 256, (tiles, size, size, 3)), jnp.uint8),
                image_flags=jnp.ones(tiles, jnp.int32))


def loss_fn(model, batch):
    return mean_batch_loss(model, batch, chunk_size=512)


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(first call incl. compile, best of `repeats`) in seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return first, best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="small inputs, 2 repeats (for the test suite)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.length, args.tiles = 2, 64, 2
    overrides = list(args.overrides)
    if args.config == "tiny":
        overrides.append("model.img_context_token_id=1000")
    config = load_config(args.config, overrides).model
    model = create_model(config, seed=0)
    batch = make_inputs(config, args.rows, args.length, args.tiles)
    repeats = 2 if args.quick else 5
    forward = nnx.jit(lambda m, b: m(b["input_ids"], b["pixel_values"], b["image_flags"], b["segment_ids"],
                                     b["positions"]))
    train = nnx.jit(nnx.value_and_grad(loss_fn))
    fwd_first, fwd_best = timed(forward, model, batch, repeats=repeats)
    bwd_first, bwd_best = timed(train, model, batch, repeats=repeats)
    graphdef, state = nnx.split(model)
    memory = jax.jit(lambda s, b: jax.value_and_grad(lambda s: loss_fn(nnx.merge(graphdef, s), b))(s)).lower(
        state, batch).compile().memory_analysis()
    tokens = args.rows * args.length
    print(f"config {args.config}: {count_params(model):,} params, batch {args.rows}x{args.length} tokens, "
          f"{args.tiles} tiles of {config.vision.image_size}px, devices {jax.devices()[0].platform} x{jax.device_count()}")
    print(f"forward:          first call {fwd_first:.2f} s, best {fwd_best * 1e3:.1f} ms, {tokens / fwd_best:,.0f} tokens/s")
    print(f"forward+backward: first call {bwd_first:.2f} s, best {bwd_best * 1e3:.1f} ms, {tokens / bwd_best:,.0f} tokens/s")
    print(f"memory analysis (fwd+bwd): arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB, "
          f"temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB, outputs {memory.output_size_in_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
