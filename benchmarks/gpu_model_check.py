"""GPU check of the model core (for a task lent a GPU; uses that machine's own jax, no data stack).

1. cuDNN attention (`jax.nn.dot_product_attention`) against the XLA reference in bf16 with GQA,
   packed segments and causal masking.
2. The tiny model in bf16 against float32 (logit agreement).
3. Forward+backward step time and MFU of the Mini-InternVL-2B config at 4096 tokens, bf16
   compute, full remat, 13 tiles (12 + thumbnail), cuDNN attention.

    python benchmarks/gpu_model_check.py [--quick] [--peak-tflops 989] [--remat full,save_dots,none]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.config import load_config
from internvl_jax.models.attention import attention
from internvl_jax.models.params import create_model, count_params
from internvl_jax.train.loss import mean_batch_loss


def attention_parity(length: int = 1024) -> float:
    rng = np.random.default_rng(0)
    b, kv, g, hd = 2, 4, 4, 128
    q = jnp.asarray(rng.normal(size=(b, length, kv, g, hd)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(b, length, kv, hd)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(b, length, kv, hd)), jnp.bfloat16)
    seg = np.ones((b, length), np.int32)
    seg[0, length // 2:] = 2
    seg = jnp.asarray(seg)
    run = lambda backend: jax.jit(lambda q, k, v, s: attention(q, k, v, q_segment_ids=s, kv_segment_ids=s,
                                                               causal=True, backend=backend))(q, k, v, seg)
    return float(jnp.max(jnp.abs(run("cudnn").astype(jnp.float32) - run("xla").astype(jnp.float32))))


def tiny_bf16_agreement() -> tuple[float, float]:
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


def step_flops(config, tokens: int, tiles: int) -> float:
    """Training FLOPs (6·N·tokens for matmuls + causal attention) for ViT, projector and LLM."""
    v, llm = config.vision, config.llm
    vit_tokens = v.grid_size ** 2 + 1
    vit_params = v.num_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    vit = 6 * vit_params * vit_tokens * tiles + 12 * v.num_layers * v.hidden_size * vit_tokens ** 2 * tiles
    proj_in = v.hidden_size * 4
    proj = 6 * (proj_in * llm.hidden_size + llm.hidden_size ** 2) * config.num_image_token * tiles
    hd = llm.resolved_head_dim
    llm_params = llm.num_layers * (llm.hidden_size * (llm.num_heads + 2 * llm.num_kv_heads) * hd
                                   + llm.num_heads * hd * llm.hidden_size
                                   + 3 * llm.hidden_size * llm.intermediate_size) + llm.hidden_size * llm.vocab_size
    lm = 6 * llm_params * tokens + 6 * llm.num_layers * llm.num_heads * hd * tokens ** 2  # causal: half of 12
    return vit + proj + lm


def train_step_mfu(peak_tflops: float, quick: bool, remat: str = "full") -> dict:
    overrides = ["model.attention=cudnn", f"model.remat_policy={remat}", "model.dtype=bfloat16"]
    if quick:
        overrides += ["model.llm.num_layers=4", "model.vision.num_layers=4"]
    config = load_config("mini_internvl_chat_2b_v1_5", overrides).model
    model = create_model(config, seed=0)
    tokens, tiles = 4096, 13
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 90000, (1, tokens)).astype(np.int32)
    ids[0, 10:10 + tiles * config.num_image_token] = config.img_context_token_id
    batch = dict(input_ids=jnp.asarray(ids), labels=jnp.asarray(ids), segment_ids=jnp.ones((1, tokens), jnp.int32),
                 positions=jnp.arange(tokens, dtype=jnp.int32)[None],
                 pixel_values=jnp.asarray(rng.integers(0, 256, (tiles, 448, 448, 3)), jnp.uint8),
                 image_flags=jnp.ones(tiles, jnp.int32))

    step = nnx.jit(nnx.value_and_grad(mean_batch_loss))
    t0 = time.perf_counter()
    loss, grads = step(model, batch)
    jax.block_until_ready(grads)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(3 if quick else 5):
        t0 = time.perf_counter()
        loss, grads = step(model, batch)
        jax.block_until_ready(grads)
        times.append(time.perf_counter() - t0)
    best = min(times)
    flops = step_flops(config, tokens, tiles)
    return dict(params=count_params(model), loss=float(loss), compile_s=compile_s, step_s=best,
                tokens_per_s=tokens / best, tflops=flops / best / 1e12, mfu=flops / best / (peak_tflops * 1e12))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU (H100 SXM)")
    parser.add_argument("--remat", default="full", help="comma-separated remat policies to time")
    args = parser.parse_args()
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    print(f"cudnn vs xla attention, bf16, max |diff|: {attention_parity():.4g}", flush=True)
    delta, top1 = tiny_bf16_agreement()
    print(f"tiny model bf16 vs fp32: max|diff|/std = {delta:.4g}, top-1 agreement {top1:.4f}", flush=True)
    for remat in args.remat.split(","):
        result = train_step_mfu(args.peak_tflops, args.quick, remat)
        print(f"2B train step (fwd+bwd, 4096 tokens, 13 tiles, bf16, remat {remat}):", flush=True)
        for key, value in result.items():
            print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}", flush=True)


if __name__ == "__main__":
    main()
