"""Host memory of streaming checkpoint loading: peak RSS beyond the loaded arrays, vs the largest tensor.

    python benchmarks/load_memory.py            # random ≥1B-parameter bf16 checkpoint (~2.4 GB on disk)
    python benchmarks/load_memory.py --quick    # ~230 MB checkpoint (what the test suite runs)

Writes a randomly initialised checkpoint in the official layout to a temporary folder, then
loads it with `load_state` over a device mesh (fsdp over all devices; 8 fake CPU devices here)
in a fresh subprocess per assembly mode — `default` (parameters up to 16 MiB assembled on the
host, larger ones on the devices in slabs) and `devices` (all on the devices) — and
reports: checkpoint bytes, largest tensor, peak RSS during the load minus the RSS before it
("load peak"; the baseline is taken after XLA has started up by compiling one trivial
program), bytes of the loaded arrays (all device shards; on CPU they live in host memory), and
transient = load peak − loaded bytes, which must stay within 3 × the largest tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def bench_config(quick: bool):
    from internvl_jax.config import LLMConfig, ModelConfig, RopeConfig, VisionConfig
    if quick:
        vision = VisionConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, image_size=112)
        llm = LLMConfig(vocab_size=32000, hidden_size=1024, num_layers=3, num_heads=8, num_kv_heads=4,
                        intermediate_size=4096, rope=RopeConfig(theta=1e6))
    else:  # InternViT-300M + a shortened InternLM2-1.8B: ≈1.2B parameters
        vision = VisionConfig()
        llm = LLMConfig(num_layers=8, rope=RopeConfig(theta=1e6))
    return ModelConfig(vision=vision, llm=llm, dtype="bfloat16", param_dtype="bfloat16")


def write_checkpoint(config, directory: pathlib.Path, seed: int = 0) -> dict:
    """A random bf16 checkpoint, written one tensor at a time. Returns its sizes."""
    import ml_dtypes
    from internvl_jax.convert.hf_config import hf_config_from_model
    from internvl_jax.convert.layouts import state_dict_order, tensor_maps
    from internvl_jax.convert.safetensors_io import TensorSpec, write_safetensors
    dtype = np.dtype(ml_dtypes.bfloat16)
    specs = [TensorSpec(key, dtype, shape) for tensor_map, layer in state_dict_order(tensor_maps(config, "official"))
             for key, shape in zip(tensor_map.layer_keys(layer), tensor_map.shapes)]
    rng = np.random.default_rng(seed)

    def tensors():
        for spec in specs:
            values = 0.02 * rng.standard_normal(spec.shape, np.float32)
            # bf16 = the high half of the float32 bits (truncation; much faster than a rounding cast)
            yield spec.name, (values.view(np.uint32) >> 16).astype(np.uint16).view(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", specs, tensors(), {"format": "pt"})
    hf = hf_config_from_model(config, "official", dtype="bfloat16")
    (directory / "config.json").write_text(json.dumps(hf))
    return {"parameters": sum(int(np.prod(s.shape)) for s in specs), "checkpoint_bytes": sum(s.nbytes for s in specs),
            "largest_tensor_bytes": max(s.nbytes for s in specs), "tensors": len(specs)}


def _rss_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux ≥ 4.0); False where not allowed."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(directory: pathlib.Path, host_bytes: int | None) -> dict:
    """Loads the checkpoint over an fsdp mesh of all devices and reports the host memory.

    host_bytes: None = the loader's default (parameters up to `placement.CHUNK_BYTES`
    assembled on the host); 0 = every parameter assembled on the devices.
    """
    import resource
    import jax
    from flax import nnx
    from internvl_jax.config import MeshConfig
    from internvl_jax.convert.load import load_state, read_config
    from internvl_jax.models.params import abstract_model
    from internvl_jax.sharding import make_mesh, state_shardings
    config, layout = read_config(directory)
    abstract = abstract_model(config)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    shardings = state_shardings(nnx.state(abstract, nnx.Param), mesh)
    # XLA's one-time start-up (~50 MB: compiler, thread pools) belongs to any jax program, not to
    # loading: it happens here, before the baseline. Each program the load compiles still counts.
    jax.jit(lambda x: x + 1)(np.zeros(8, np.float32)).block_until_ready()
    exact_peak = _reset_peak()
    before = _rss_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    options = {} if host_bytes is None else {"host_bytes": host_bytes}
    state = load_state(directory, config, layout, abstract, shardings, **options)
    arrays = jax.block_until_ready([v.get_value() for _, v in nnx.to_flat_state(state)])
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM") if exact_peak else max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                                    maxrss_before)
    loaded = sum(shard.data.nbytes for array in arrays for shard in array.addressable_shards)
    load_peak = (peak - before) * 1024
    # CPU "devices" keep the loaded arrays in host memory; accelerators keep them off the host.
    in_host_memory = all(device.platform == "cpu" for device in jax.devices())
    return {"devices": len(jax.devices()), "platform": jax.devices()[0].platform, "rss_before_bytes": before * 1024,
            "load_peak_bytes": load_peak, "loaded_bytes": loaded,
            "transient_bytes": load_peak - (loaded if in_host_memory else 0), "load_seconds": seconds,
            "exact_peak": exact_peak}


MODES = {"default": None, "devices": 0}  # where parameters are assembled (see measure)


def run(quick: bool, workdir: pathlib.Path | None = None, devices: int = 8, modes=tuple(MODES)) -> dict:
    """Writes the checkpoint, measures the load in a fresh subprocess per mode, returns all figures."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        directory = pathlib.Path(tmp) / "ckpt"
        start = time.perf_counter()
        report = write_checkpoint(bench_config(quick), directory)
        report["write_seconds"] = time.perf_counter() - start
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        for mode in modes:
            out = subprocess.run([sys.executable, __file__, "--measure", str(directory), "--mode", mode], env=env,
                                 check=True, capture_output=True, text=True, cwd=REPO)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            figures["transient_over_largest"] = figures["transient_bytes"] / report["largest_tensor_bytes"]
            report[mode] = figures
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~230 MB checkpoint instead of ≥1B parameters")
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="where to write the checkpoint")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices of the mesh")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    parser.add_argument("--modes", default=",".join(MODES), help="assembly modes to measure (default: all)")
    parser.add_argument("--measure", type=pathlib.Path, help=argparse.SUPPRESS)  # the subprocess
    parser.add_argument("--mode", choices=MODES, default="default", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, MODES[args.mode])))
        return
    report = run(args.quick, args.workdir, args.devices, tuple(args.modes.split(",")))
    if args.json:
        print(json.dumps(report))
        return
    mb = 1e6
    print(f"checkpoint: {report['parameters'] / 1e9:.3f}B parameters, {report['tensors']} tensors, "
          f"{report['checkpoint_bytes'] / mb:.1f} MB bf16 (written in {report['write_seconds']:.1f} s); "
          f"largest tensor {report['largest_tensor_bytes'] / mb:.1f} MB")
    for mode, where in (("default", "host up to 16 MiB, devices above"), ("devices", "all on devices")):
        if mode not in report:
            continue
        r = report[mode]
        print(f"assembly {mode} ({where}): load over {r['devices']} {r['platform']} devices {r['load_seconds']:.2f} s; peak RSS "
              f"above the pre-load RSS {r['load_peak_bytes'] / mb:.1f} MB; loaded arrays {r['loaded_bytes'] / mb:.1f} MB;"
              f" transient {r['transient_bytes'] / mb:.1f} MB = {r['transient_over_largest']:.2f} x the largest "
              f"tensor (limit 3.00)" + ("" if r["exact_peak"] else " [peak from ru_maxrss]"))


if __name__ == "__main__":
    main()
