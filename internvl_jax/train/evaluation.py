"""In-training evaluation: greedy generation on held-out benchmarks, scored with their official metrics.

The benchmarks are read once, when training starts (so a bad file fails before the first step,
naming its line), and evaluated through the same runner as `python -m internvl_jax.eval`: the
predictions and results of step N land in `workdir/eval/step_N/<benchmark>/`, and each
benchmark's headline score joins that step's metrics as `eval_<benchmark>`.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax

from internvl_jax.config import Config
from internvl_jax.eval.benchmarks import get_benchmark
from internvl_jax.eval.presets import resolve_options, split_settings
from internvl_jax.eval.runner import ModelPredictor, RunConfig, evaluate_benchmark


class PeriodicEvaluator:
    """Evaluates the model every `train.eval_every_steps` steps and at the last step.

    Every process runs every sample (generation is one sharded program over the whole mesh);
    process 0 alone writes the predictions and results.
    """

    def __init__(self, config: Config, tokenizer, workdir: pathlib.Path, mesh: jax.sharding.Mesh | None = None):
        train = config.train
        if train.eval_every_steps < 0 or train.eval_limit < 0:
            raise ValueError("train.eval_every_steps and train.eval_limit must be non-negative")
        if train.eval_every_steps and not train.eval_benchmarks:
            raise ValueError("train.eval_every_steps is set but train.eval_benchmarks names no benchmark")
        self._config, self._tokenizer, self._mesh = config, tokenizer, mesh
        self._every = train.eval_every_steps
        self._out = workdir / "eval" if jax.process_index() == 0 else workdir / "eval" / f".process_{jax.process_index()}"
        self._benchmarks = [get_benchmark(name) for name in train.eval_benchmarks]
        overrides, self._generation = split_settings(train.eval_settings)
        self._options = resolve_options(self._benchmarks, train.eval_preset, overrides)
        data_dir = pathlib.Path(train.eval_data_dir or ".")
        self._samples = {b.name: b.load(data_dir, self._options[b.name]) for b in self._benchmarks}
        self._run = RunConfig(batch_size=train.eval_batch_size, limit=train.eval_limit or None, progress=False)

    @property
    def enabled(self) -> bool:
        return self._every > 0

    def due(self, step: int, total: int) -> bool:
        return self.enabled and (step % self._every == 0 or step == total)

    def __call__(self, step: int, model) -> dict[str, Any]:
        """{f"eval_{benchmark}": score} of `model` (the current parameters) at `step`."""
        predictor = ModelPredictor(model, self._tokenizer, self._config.model, mesh=self._mesh,
                                   generation=self._generation)
        scores = {}
        for benchmark in self._benchmarks:
            document = evaluate_benchmark(benchmark, self._samples[benchmark.name], self._options[benchmark.name],
                                          predictor, self._out / f"step_{step}" / benchmark.name, self._run,
                                          run_info={"checkpoint": f"step {step}", "preset": self._config.train.eval_preset,
                                                    "generation": self._generation})
            scores[f"eval_{benchmark.name}"] = document["score"]
            scores[f"eval_{benchmark.name}_failed"] = document["num_failed"]
        return scores

