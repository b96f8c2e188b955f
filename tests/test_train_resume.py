"""Kill-and-resume determinism: SIGKILL at a step that is not a checkpoint step (an async save of
the previous checkpoint may still be in flight), resume, and end bit-identical to an
uninterrupted run, with each step logged once. Each run is a subprocess on 2 CPU devices."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
TOTAL_STEPS, SAVE_EVERY, KILL_AT = 6, 3, 5


def child(workdir: str, kill_at: int) -> None:
    """Trains the small config in `workdir`; SIGKILLs itself after step `kill_at` (0 = never)."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_compilation_cache_dir", str(HERE.parent / ".cache" / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from flax import nnx
    from internvl_jax.config import MeshConfig
    from internvl_jax.sharding import make_mesh
    from internvl_jax.train.loop import train
    from test_train_step import ContractBatches, small_config

    config = small_config("train.trainable=mlp1,language_model", f"train.total_steps={TOTAL_STEPS}",
                          f"train.save_every_steps={SAVE_EVERY}")
    kill = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == kill_at else None
    state = train(config, workdir, ContractBatches(config, 4), mesh=make_mesh(MeshConfig(data=1, fsdp=2, tensor=1)),
                  on_step_end=kill)
    flat = {"/".join(map(str, p)): np.asarray(jax.device_get(v.get_value()))
            for p, v in nnx.to_flat_state(nnx.state(state))}
    np.savez(pathlib.Path(workdir) / "final.npz", **{k: np.atleast_1d(v).view(np.uint8) for k, v in flat.items()})


def start(workdir, kill_at):
    env = dict(os.environ, PYTHONPATH=str(HERE))
    return subprocess.Popen([sys.executable, str(HERE / "test_train_resume.py"), str(workdir), str(kill_at)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process, expected_rc=0):
    _, err = process.communicate(timeout=300)
    assert process.returncode == expected_rc, err[-3000:]


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    runs = [start(reference, 0), start(interrupted, KILL_AT)]
    finish(runs[0])
    finish(runs[1], -signal.SIGKILL)
    assert not (interrupted / "final.npz").exists()
    finish(start(interrupted, 0))
    expected, actual = np.load(reference / "final.npz"), np.load(interrupted / "final.npz")
    assert sorted(expected.files) == sorted(actual.files)
    for name in expected.files:
        assert np.array_equal(expected[name], actual[name]), name
    logged = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, TOTAL_STEPS + 1))
    reference_log = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == [r["loss"] for r in reference_log]


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]))
