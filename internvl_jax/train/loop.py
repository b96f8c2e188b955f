"""The train loop: resume-or-init, steps, metrics (JSONL, TensorBoard, progress bar), checkpoints, preemption.

The data source is any iterator of per-process micro-batches (the batch contract of
`internvl_jax.train.step`) with `get_state() -> dict` / `set_state(dict)`; `num_samples` (global
sample count of one epoch) is needed only when `train.total_steps` is 0.

The host stays one step ahead of the devices: step N+1's batch is read and sent (one batch more
held in device memory), and step N-1's metrics are read, checked and logged, while the devices run
step N (jax dispatch is asynchronous). The host waits for a step only where the state after it is
needed (checkpoint, evaluation, stop, the last step) or to time compilation (the first step). With
several processes, the per-step stop agreement waits for step N too, but only after step N+1's
batch is ready, so the devices idle just for that collective.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import time
import warnings
from typing import Any, Callable, Protocol

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from internvl_jax.config import Config
from internvl_jax.sharding import make_mesh, state_shardings
from internvl_jax.train import flops
from internvl_jax.train.checkpoint import Checkpointer
from internvl_jax.train.optimizer import learning_rate_schedule
from internvl_jax.train.state import TrainState, abstract_train_state, create_train_state
from internvl_jax.train.step import TrainStep, device_batch, stack_micro_batches


class DataIterator(Protocol):
    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


def total_steps(config: Config, data: Any) -> int:
    """`train.total_steps`, else ceil(epochs × samples / global batch) (the HF Trainer's count)."""
    if config.train.total_steps > 0:
        return config.train.total_steps
    return math.ceil(config.train.epochs * data.num_samples / config.train.global_batch_size)


class MetricLog:
    """Process 0 writes each step once: `metrics.jsonl`, TensorBoard events, a tqdm bar with ETA.

    On resume from step s, lines and events after s (written before a crash, after the last
    checkpoint) are dropped, so replayed steps are not logged twice.
    """

    def __init__(self, workdir: pathlib.Path, start_step: int, total: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm import tqdm
        path = workdir / "metrics.jsonl"
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start_step] \
            if path.exists() else []
        path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")
        self._writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)
        self._bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in metrics.items():
            if value is not None:  # a benchmark without ground truth has no score
                tag = f"eval/{name[5:]}" if name.startswith("eval_") else f"train/{name}"
                self._writer.add_scalar(tag, value, step)
        self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._writer.close()
            self._bar.close()


class PreemptionGuard:
    """SIGTERM (or JAX's preemption sync point on pods) → save and stop, agreed by every process."""

    def __init__(self):
        self._requested = False
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._requested = True

    def should_stop(self, step: int) -> bool:
        stop = self._requested
        if jax.process_count() > 1:
            try:
                stop = stop or multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # no preemption service (not a TPU pod)
                pass
            stop = bool(multihost_utils.process_allgather(np.int32(stop)).max())
        return stop

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, Any]:
    return {k: v.item() if hasattr(v, "item") else v for k, v in jax.device_get(metrics).items()}


class ProfileWindow:
    """A `jax.profiler` trace of `train.profile_num_steps` steps from `train.profile_start_step`
    (after compilation when that is step 1's), written under workdir/profile for TensorBoard or Perfetto."""

    def __init__(self, config: Config, workdir: pathlib.Path):
        self._first = config.train.profile_start_step
        self._last = self._first + max(config.train.profile_num_steps, 1) - 1
        self._dir = workdir / "profile"
        self._active = False

    def before(self, step: int) -> None:
        if self._first and step == self._first:
            jax.profiler.start_trace(str(self._dir))
            self._active = True

    def after(self, step: int) -> None:
        if self._active and step >= self._last:
            self.close()

    def close(self) -> None:
        if self._active:
            jax.profiler.stop_trace()
            self._active = False


@dataclasses.dataclass(frozen=True)
class _Dispatched:
    """A step sent to the devices; `metrics` are device arrays until the host reads them."""
    step: int
    metrics: dict[str, jax.Array]
    local: dict[str, np.ndarray]  # this process's batch (for FLOPs and the batch-size check)
    data_state: dict  # the data position after this step's batch


def train(config: Config, workdir: str | pathlib.Path, data: DataIterator, *, mesh: jax.sharding.Mesh | None = None,
          on_step_end: Callable[[int], None] | None = None, evaluator: Any = None) -> TrainState:
    """Trains to `total_steps`, resuming from the latest checkpoint in `workdir` if any.

    evaluator: a `train.evaluation.PeriodicEvaluator` (in-training evaluation), or None.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh or make_mesh(config.mesh)
    total = total_steps(config, data)
    graphdef, target = abstract_train_state(config, total, mesh)
    checkpointer = Checkpointer(workdir / "checkpoints", config)
    start = checkpointer.latest_step()
    if start is None:
        start, state = 0, nnx.state(create_train_state(config, total, mesh))
    else:
        state, data_state = checkpointer.restore(start, target)
        data.set_state(data_state)
    step_fn = TrainStep(graphdef, config.train, learning_rate_schedule(config.train, total),
                        state_shardings(target, mesh), mesh)
    peak = flops.peak_flops_per_device(jax.devices()[0].device_kind, config.train.peak_tflops_per_device)
    log, guard, profile = MetricLog(workdir, start, total), PreemptionGuard(), ProfileWindow(config, workdir)

    def fetch() -> tuple[dict[str, np.ndarray], dict[str, jax.Array], dict]:
        """The next step's per-process batch, its global arrays, and the data position after it."""
        local = stack_micro_batches([next(data) for _ in range(config.train.grad_accum_steps)])
        return local, device_batch(local, mesh), data.get_state()

    def finish(done: _Dispatched, since: float, evaluated_model: nnx.Module | None = None) -> float:
        """Reads `done`'s metrics (waiting for its step), checks them, evaluates `evaluated_model`
        (the state after `done`) when given, and logs; returns the time of the read. `since`: the
        previous read, or the loop's start."""
        metrics = _host_metrics(done.metrics)
        read = time.perf_counter()
        seconds = read - since
        if done.step == start + 1:  # the first call compiled the step
            _check_batch_size(config, done.local)
            metrics["compile_seconds"] = step_fn.compile_seconds
            seconds = max(seconds - step_fn.compile_seconds, 1e-9)
        metrics.update(_throughput(config, done.local, metrics, seconds, peak))
        profile.after(done.step)
        _check(config, done.step, metrics)
        if evaluated_model is not None:
            began = time.perf_counter()
            metrics.update(evaluator(done.step, evaluated_model))
            metrics["eval_seconds"] = time.perf_counter() - began
        log.write(done.step, metrics)
        return read

    try:
        clock = time.perf_counter()
        pending: _Dispatched | None = None
        if start < total:
            local, batch, data_state = fetch()
        for step in range(start + 1, total + 1):
            profile.before(step)
            state, metrics = step_fn(state, batch)
            current = _Dispatched(step, metrics, local, data_state)
            if step < total:  # read and sent while the devices run this step
                local, batch, data_state = fetch()
            if pending is not None:
                clock = finish(pending, clock)
                if on_step_end is not None:
                    on_step_end(pending.step)
            stop = guard.should_stop(step)
            save = checkpointer.due(step) or stop or step == total
            evaluate = evaluator is not None and evaluator.due(step, total)
            if not (save or evaluate or step == start + 1):
                pending = current  # its metrics are read after the next step is dispatched
                continue
            # The state after this step is needed (or the step is the first): wait for it here.
            finish(current, clock, nnx.merge(graphdef, state).model if evaluate else None)
            pending = None
            if save:
                checkpointer.save(step, state, current.data_state)
            if on_step_end is not None:
                on_step_end(step)
            if stop:
                break
            clock = time.perf_counter()  # evaluation and save times stay out of the next step's
    finally:
        profile.close()
        checkpointer.close()
        log.close()
        guard.close()
    return nnx.merge(graphdef, state)


def _throughput(config: Config, local: dict[str, np.ndarray], metrics: dict[str, Any], seconds: float,
                peak: float | None) -> dict[str, float]:
    """Step time, tokens/s and samples/s (global), and MFU when the device's peak is known."""
    out = {"step_seconds": seconds, "tokens_per_second": metrics["tokens"] / seconds,
           "samples_per_second": metrics["samples"] / seconds}
    if peak:
        # Each process holds an equal share of the global batch: its FLOPs over its own devices.
        local_flops = flops.step_flops(config, local["segment_ids"], local["image_flags"])
        out["mfu"] = local_flops / (seconds * peak * jax.local_device_count())
    return out


def _check(config: Config, step: int, metrics: dict[str, Any]) -> None:
    """Non-finite policy (`skip` already dropped the update on device; `raise` stops) and warnings."""
    if not metrics["finite"]:
        message = f"step {step}: non-finite loss {metrics['loss']} or grad norm {metrics['grad_norm']}"
        if config.train.nonfinite_policy == "raise":
            raise FloatingPointError(message + " (train.nonfinite_policy=raise)")
        warnings.warn(message + "; update skipped", RuntimeWarning)
    if metrics["supervised_tokens"] == 0:
        warnings.warn(f"step {step}: the batch has no supervised token (loss 0, no learning signal)",
                      RuntimeWarning)


def _check_batch_size(config: Config, local: dict[str, np.ndarray]) -> None:
    """global_batch_size must equal micro-batches × rows per process × processes."""
    grad_accum, rows = local["input_ids"].shape[:2]
    if grad_accum * rows * jax.process_count() != config.train.global_batch_size:
        raise ValueError(f"train.global_batch_size {config.train.global_batch_size} != grad_accum_steps "
                         f"{grad_accum} × {rows} rows per process × {jax.process_count()} processes")
