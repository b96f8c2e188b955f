"""Generation speed against transformers, same config, same CPU, one run.

    python benchmarks/generate.py [--quick] [--new-tokens 64] [--repeats 5] [--batches 1 8] [--threads N]

The pinned small config of `pinned.py` (fp32, random weights, 2 tiles of 224 px per prompt)
against transformers' InternVLForConditionalGeneration with a Llama text model of the same
dimensions (InternLM2 is not native there). torch runs as many intra-op threads as XLA uses
cores (the cores this process may use); `--quick` takes `pinned.quick_config` instead.

Both decode greedily and exactly `--new-tokens` tokens (no stop id). Per batch size, after a
warm-up call, the median over the repeats of
  prefill: ours, time to the first token (tiling excluded, ViT + prompt + first token);
           transformers, `generate(max_new_tokens=1)`;
  decode:  the remaining B × (new_tokens − 1) tokens over the rest of the time (ours) or over
           generate(new_tokens) − generate(1) (transformers).
Prints both, the ratios (target: decode ≥ 3× the reference), the number of programs our
generation compiled and the number of compilations after the warm-up (target: 0).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from internvl_jax.config import ModelConfig
from internvl_jax.data.tiling import normalize
from internvl_jax.models import generate as gen
from internvl_jax.models.params import create_model
from pinned import IMAGE_TOKEN_ID, TILES, bench_config, quick_config, reference_model

TEXT_TOKENS = 64  # around the image tokens; 1 + 64 + 128 = 193-token prompts


def make_requests(config: ModelConfig, batch: int, seed: int = 0):
    """`batch` prompts (ids with 2 tiles' image tokens) and their uint8 tiles."""
    rng = np.random.default_rng(seed)
    size = config.vision.image_size
    prompts, tiles = [], []
    for _ in range(batch):
        text = rng.integers(3, 7000, TEXT_TOKENS).tolist()
        prompts.append([1] + text[:8] + [IMAGE_TOKEN_ID] * (config.num_image_token * TILES) + text[8:])
        tiles.append(rng.integers(0, 256, (TILES, size, size, 3), dtype=np.uint8))
    return prompts, tiles


def time_ours(model, prompts, tiles, new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the rest) of one greedy generation."""
    config = gen.GenerationConfig(max_new_tokens=new_tokens)
    start = time.perf_counter()
    stream = gen.stream_generate(model, prompts, tiles, config=config)
    next(stream)  # returns once the first tokens are on the host
    first = time.perf_counter()
    for _ in stream:
        pass
    return first - start, time.perf_counter() - first


def time_reference(model, prompts, tiles, new_tokens: int) -> float:
    """Seconds of one transformers `generate` of exactly `new_tokens` tokens."""
    import torch
    input_ids = torch.tensor(prompts)
    pixel_values = torch.from_numpy(np.concatenate([normalize(t) for t in tiles]))
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - input_ids.shape[1] in (0, new_tokens)  # new tokens only, or prompt + new
    return elapsed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a much smaller model, 16 new tokens, 1 repeat (for the test suite)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: the cores this process may use)")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 16, 1
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    config = quick_config() if args.quick else bench_config()
    ours, reference = create_model(config, seed=0), reference_model(config)
    programs_before = gen.compiled_programs()
    requests = {batch: make_requests(config, batch) for batch in args.batches}
    for batch in args.batches:  # warm-up: compiles our programs once per batch size
        time_ours(ours, *requests[batch], args.new_tokens)
    time_reference(reference, *requests[args.batches[0]], 1)  # torch's one-time set-up
    with gen.count_compilations() as compiles:
        results = measure(ours, reference, requests, args)
    programs = gen.compiled_programs() - programs_before
    print(f"programs compiled by generation: {programs} (prefill + decode per batch size); "
          f"compilations after warm-up: {len(compiles)}")
    return {"results": results, "programs": programs, "compiles_after_warmup": len(compiles)}


def measure(ours, reference, requests: dict, args: argparse.Namespace) -> dict:
    """Times both sides per batch size and prints the table; returns the figures per batch size."""
    # Both sides share the CPU with whatever else runs: the load average says how noisy the figures are.
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, torch threads {args.threads}, load average "
          f"{os.getloadavg()[0]:.1f}; prompt {len(requests[args.batches[0]][0][0])} tokens ({TILES} tiles); "
          f"{args.new_tokens} new tokens; median of {args.repeats}")
    print(f"{'batch':>5} {'':14} {'prefill ms':>11} {'decode tok/s':>13}")
    results = {}
    for batch in args.batches:
        prompts, tiles = requests[batch]
        ours_runs = [time_ours(ours, prompts, tiles, args.new_tokens) for _ in range(args.repeats)]
        ref_first = statistics.median(time_reference(reference, prompts, tiles, 1) for _ in range(args.repeats))
        ref_full = statistics.median(time_reference(reference, prompts, tiles, args.new_tokens)
                                     for _ in range(args.repeats))
        decoded = batch * (args.new_tokens - 1)
        row = {
            "ours_prefill_s": statistics.median(r[0] for r in ours_runs),
            "ours_decode_tok_s": decoded / statistics.median(r[1] for r in ours_runs),
            "ref_prefill_s": ref_first,
            "ref_decode_tok_s": decoded / max(ref_full - ref_first, 1e-9),
        }
        row["decode_ratio"] = row["ours_decode_tok_s"] / row["ref_decode_tok_s"]
        row["prefill_ratio"] = row["ref_prefill_s"] / row["ours_prefill_s"]
        results[batch] = row
        print(f"{batch:>5} {'internvl-jax':14} {1e3 * row['ours_prefill_s']:>11.1f} {row['ours_decode_tok_s']:>13.1f}")
        print(f"{batch:>5} {'transformers':14} {1e3 * row['ref_prefill_s']:>11.1f} {row['ref_decode_tok_s']:>13.1f}")
        print(f"{batch:>5} {'ratio':14} {row['prefill_ratio']:>10.2f}x {row['decode_ratio']:>12.2f}x"
              f"   (decode target >= 3x: {'met' if row['decode_ratio'] >= 3 else 'NOT met'})")
    return results


if __name__ == "__main__":
    main()
