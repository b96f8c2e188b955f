"""Streaming load keeps transient host memory within 3x the largest tensor (benchmarks/load_memory.py --quick)."""
import json
import os
import subprocess
import sys

from conftest import REPO


def test_transient_host_memory_of_a_load_is_within_three_largest_tensors(tmp_path):
    # The benchmark writes a ~230 MB bf16 checkpoint and loads it over 8 fake CPU devices in a fresh
    # subprocess, where the peak RSS of the load (VmHWM after a reset) is measured. In the default
    # mode the small parameters are assembled on the host and the large ones (embedding, LM head,
    # MLP stacks) on the devices in slabs, so both paths count.
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out = subprocess.run([sys.executable, "benchmarks/load_memory.py", "--quick", "--json", "--modes", "default",
                          "--workdir", str(tmp_path)],
                         capture_output=True, text=True, check=True, cwd=REPO, env=env, timeout=600)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["checkpoint_bytes"] > 200e6
    figures = report["default"]
    print(f"\nload memory: checkpoint {report['checkpoint_bytes'] / 1e6:.0f} MB, largest tensor "
          f"{report['largest_tensor_bytes'] / 1e6:.1f} MB, transient {figures['transient_bytes'] / 1e6:.1f} MB = "
          f"{figures['transient_over_largest']:.2f}x (exact peak: {figures['exact_peak']})")
    assert figures["loaded_bytes"] >= report["checkpoint_bytes"]  # every tensor placed, bf16 kept
    assert figures["transient_bytes"] <= 3 * report["largest_tensor_bytes"]
