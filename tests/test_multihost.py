"""Multi-host training with local CPU processes (gloo collectives) and the start-up self-test.

Training: one process with 2 CPU devices and two processes with 1 device each (the same mesh,
fsdp = 2) train the tiny model on the same data and global batch through the train command line.
The two processes read disjoint samples that together are the single process's, in its row order,
and log the same losses. The two-process run is preempted (one host gets SIGTERM, both save and
stop at the same step) and resumed; the resumed steps match the uninterrupted run too.

Start-up: a process whose peer never starts exits with a message naming it, within the timeout,
instead of hanging or aborting inside jax.distributed.

Every process is a subprocess with a timeout: jax.distributed aborts (SIGABRT), never raises,
when a peer is lost.
"""
import json
import os
import pathlib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import portpicker

from data_fixtures import synthetic_meta, tokenizer_dir  # noqa: F401  (session fixtures)
from internvl_jax.distributed import Cluster, StartupError, rendezvous

HERE = pathlib.Path(__file__).resolve().parent
TOTAL_STEPS, PREEMPT_AFTER = 4, 1  # process 1 gets SIGTERM after step 1: both save step 2 and stop
TIMEOUT = 300
# The persistent compilation cache cannot serve process 1 on CPU (its key hashes a per-process
# topology), so every two-process run compiles the step once: a smaller model keeps that short.
SMALL = ["model.llm.num_layers=1", "model.vision.num_layers=1", "train.trainable=mlp1,language_model"]


def environment(devices: int, **extra) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}


def start_training(workdir, meta, tokenizer, devices, preempt_at=0, cluster=None):
    """A process of the train command line (tiny model, 4 rows of 256 tokens per step)."""
    process_id = cluster[2] if cluster else 0
    command = [sys.executable, str(HERE / "multihost_train.py"), str(workdir / f"samples.{process_id}.jsonl"),
               str(preempt_at), "--config", "tiny", "--workdir", str(workdir), f"data.meta_path={meta}",
               f"data.tokenizer_path={tokenizer}", "data.num_workers=0", "data.max_tiles_per_row=8",
               "train.max_seq_length=256", "train.global_batch_size=4", f"train.total_steps={TOTAL_STEPS}",
               "train.save_every_steps=0", *SMALL]
    if cluster:
        coordinator, count, process_id = cluster
        command += ["--coordinator", coordinator, "--num-processes", str(count), "--process-id", str(process_id),
                    "--init-timeout", "60"]
    # Output goes to a file: a full pipe would block a process that its peer waits for.
    log = workdir / f"log.{process_id}"
    with log.open("a") as out:
        return subprocess.Popen(command, env=environment(devices), stdout=out, stderr=subprocess.STDOUT), log


def start_pair(workdir, meta, tokenizer, preempt_at=0):
    """Two processes of one run; only process 1 is preempted."""
    coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}"
    return [start_training(workdir, meta, tokenizer, 1, preempt_at if i == 1 else 0, (coordinator, 2, i))
            for i in range(2)]


def finish(runs) -> list[str]:
    """Waits for every (process, log); their output. Fails with the output of any that failed."""
    try:
        for process, _ in runs:
            process.wait(timeout=TIMEOUT)
    finally:
        for process, _ in runs:
            process.kill()  # after a timeout, none is left waiting for its peer
    outputs = [log.read_text() for _, log in runs]
    for (process, _), output in zip(runs, outputs):
        assert process.returncode == 0, output[-4000:]
    return outputs


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_match_one_and_resume_after_preemption(tmp_path, synthetic_meta, tokenizer_dir):  # noqa: F811
    single, pair = tmp_path / "single", tmp_path / "pair"
    single.mkdir()
    pair.mkdir()
    runs = [start_training(single, synthetic_meta, tokenizer_dir, 2)]
    runs += start_pair(pair, synthetic_meta, tokenizer_dir, preempt_at=PREEMPT_AFTER)
    outputs = finish(runs)
    assert "distributed self-test passed: 2 processes × 1 cpu devices" in outputs[1]
    stopped_at = PREEMPT_AFTER + 1
    assert sorted(int(p.name) for p in (pair / "checkpoints").iterdir() if p.name.isdigit()) == [stopped_at]
    assert [r["step"] for r in read_jsonl(pair / "metrics.jsonl")] == list(range(1, stopped_at + 1))

    finish(start_pair(pair, synthetic_meta, tokenizer_dir))

    expected, actual = read_jsonl(single / "metrics.jsonl"), read_jsonl(pair / "metrics.jsonl")
    assert [r["step"] for r in actual] == list(range(1, TOTAL_STEPS + 1))
    for one, two in zip(expected, actual):
        assert abs(one["loss"] - two["loss"]) <= 1e-5 * abs(one["loss"]), (one["step"], one["loss"], two["loss"])
        assert one["samples"] == two["samples"] and one["tokens"] == two["tokens"]
    print("loss |Δ| per step (1 vs 2 processes):", [abs(a["loss"] - b["loss"]) for a, b in zip(expected, actual)])

    reference = read_jsonl(single / "samples.0.jsonl")
    logs = [read_jsonl(pair / f"samples.{i}.jsonl") for i in range(2)]
    assert [r["step"] for r in reference] == [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] \
        == list(range(1, TOTAL_STEPS + 1))
    for whole, first, second in zip(reference, *logs):
        assert first["samples"] and second["samples"]
        assert not set(first["samples"]) & set(second["samples"])
        # Process p holds rows [p·R, (p+1)·R) of the global batch: together, the single process's rows.
        assert first["samples"] + second["samples"] == whole["samples"]


def start_self_test(coordinator: str, count: int, process_id: int, **extra):
    command = [sys.executable, "-m", "internvl_jax.distributed", "--coordinator", coordinator,
               "--num-processes", str(count), "--process-id", str(process_id), "--init-timeout", "4"]
    return subprocess.Popen(command, env=environment(1, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_start_up_names_the_process_that_never_came():
    hosts = {"TPU_WORKER_HOSTNAMES": "127.0.0.1,127.0.0.1,worker-2.example"}
    first = f"127.0.0.1:{portpicker.pick_unused_port()}"
    began = time.monotonic()
    # Processes 0 and 1 of three (2 never starts), and process 1 of a run whose process 0 never starts.
    runs = [start_self_test(first, 3, 0, **hosts), start_self_test(first, 3, 1, **hosts),
            start_self_test(f"127.0.0.1:{portpicker.pick_unused_port()}", 2, 1)]
    results = [(process.communicate(timeout=120)[1], process.returncode) for process in runs]
    assert time.monotonic() - began < 60
    for err, returncode in results[:2]:
        assert returncode == 1, err
        assert "process(es) 2 (worker-2.example) did not reach the rendezvous" in err, err
        assert "joined: 0 (" in err and "1 (" in err
    err, returncode = results[2]
    assert returncode == 1 and "process 0 at 127.0.0.1:" in err and "did not answer within 4 s" in err, err


def test_rendezvous_returns_every_host_or_refuses_a_mismatch():
    def meet(counts):
        coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}"
        with ThreadPoolExecutor(len(counts)) as pool:
            futures = [pool.submit(rendezvous, Cluster(coordinator, count, i), 10.0) for i, count in enumerate(counts)]
            return [future.exception() or future.result() for future in futures]

    results = meet([3, 3, 3])
    assert results[0] == results[1] == results[2] and len(results[0]) == 3
    results = meet([2, 3])
    assert all(isinstance(r, StartupError) and "started with 3 processes, process 0 with 2" in str(r) for r in results)
