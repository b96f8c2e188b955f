"""Orbax checkpoints of a training run: one step directory holds every piece needed to resume.

Items of step k (the state after k optimizer steps):
    model      StandardSave  nnx state of the model (trainable fp32 + frozen params)
    train      StandardSave  optimizer (step, moments of trainable params) + base RNG key
    data       JsonSave      the data iterator's state (a global sample position) after k steps
    meta       JsonSave      {"step", "config"}: the full config, checked on resume
Saves are asynchronous; `wait()` before reading or exiting. Restores take a sharded abstract
target, so a checkpoint written on one mesh / process count restores onto another.
"""
from __future__ import annotations

import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from internvl_jax.config import Config, to_dict

# Config keys that fix which samples a step sees: resuming with another value would skip or
# repeat data, so it is refused. Every key of a `data` config group is included as well.
DATA_KEYS = ("train.global_batch_size", "train.grad_accum_steps", "train.max_seq_length",
             "train.group_by_length", "train.epochs", "train.total_steps", "train.seed")
# Data settings that only change how the same sample stream is produced (the pipeline's own
# fingerprint guards the stream), so a resume may change them.
DATA_KEYS_FREE = ("data.num_workers", "data.worker_buffer_size", "data.on_bad_line", "data.max_resample_tries")


class IncompatibleCheckpoint(RuntimeError):
    """The checkpoint was written with other data or batch settings."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def check_compatible(saved_config: dict, config: Config) -> None:
    """Raises IncompatibleCheckpoint naming the first data/batch key whose value changed."""
    saved, current = _flatten(saved_config), _flatten(to_dict(config))
    keys = list(DATA_KEYS) + sorted(k for k in set(saved) | set(current)
                                    if k.startswith("data.") and k not in DATA_KEYS_FREE)
    for key in keys:
        if saved.get(key) != current.get(key):
            raise IncompatibleCheckpoint(
                f"cannot resume: '{key}' was {saved.get(key)!r} in the checkpoint and is {current.get(key)!r} "
                f"now; it changes which samples each step sees. Restore it, or start a new workdir.")


class Checkpointer:
    """Save policy (every N steps, every M minutes, forced) and save/restore of train states."""

    def __init__(self, directory: str | pathlib.Path, config: Config):
        train = config.train
        self.config = config
        self.every_steps = train.save_every_steps
        self.every_seconds = train.save_every_minutes * 60.0
        self._last_save_time = time.monotonic()
        options = ocp.CheckpointManagerOptions(max_to_keep=train.keep_last, keep_period=train.keep_every or None,
                                               enable_async_checkpointing=True, create=True)
        self._manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether step `step` should be saved. The clock is read on process 0 only and its
        decision broadcast, so hosts never disagree (a disagreement would deadlock the save)."""
        if self.every_steps > 0 and step % self.every_steps == 0:
            return True
        if self.every_seconds <= 0:
            return False
        late = time.monotonic() - self._last_save_time >= self.every_seconds
        if jax.process_count() > 1:
            late = bool(multihost_utils.broadcast_one_to_all(np.int32(late)))
        return late

    def save(self, step: int, state: nnx.State, data_state: dict) -> None:
        """Starts an asynchronous save of `state` (split as model / train) and the data position."""
        if step in self._manager.all_steps():
            return
        model, train = _split(state)
        args = ocp.args.Composite(model=ocp.args.StandardSave(model), train=ocp.args.StandardSave(train),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave({"step": step, "config": to_dict(self.config)}))
        self._manager.save(step, args=args, force=True)
        self._last_save_time = time.monotonic()

    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, target: nnx.State) -> tuple[nnx.State, dict]:
        """(state, data state) of `step`, placed as `target` (ShapeDtypeStructs with shardings) says.

        Refuses a checkpoint whose data or batch settings differ from this run's config.
        """
        check_compatible(self.read_meta(step)["config"], self.config)
        model, train = _split(target)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(model), train=ocp.args.StandardRestore(train),
            data=ocp.args.JsonRestore()))
        return nnx.merge_state(restored["model"], restored["train"]), restored["data"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _split(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """The model subtree and everything else (optimizer, RNG)."""
    return state.split(lambda path, _: path[0] == "model", ...)
