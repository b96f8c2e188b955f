"""One process of tests/test_multihost.py: `python -m internvl_jax.train` with two test hooks.

    python tests/multihost_train.py SAMPLE_LOG PREEMPT_AT [train command-line arguments ...]

After each step, the ids of the samples in this process's rows are appended to SAMPLE_LOG as a
JSON line ({"step", "samples"}); after step PREEMPT_AT (0 = never) the process sends itself SIGTERM,
as a preempted host would. Everything else is the train command line unchanged.
"""
import collections
import json
import os
import signal
import sys

from internvl_jax.train import __main__ as train_cli
from internvl_jax.train import loop


class RecordedBatches:
    """The data iterator, keeping each batch's sample ids until its step ends: the loop reads the
    next batch before the current step ends, so `last_samples` is already the next step's then."""

    def __init__(self, data):
        self._data, self.unfinished = data, collections.deque()

    def __next__(self):
        batch = next(self._data)
        self.unfinished.append(self._data.last_samples)
        return batch

    def __getattr__(self, name):
        return getattr(self._data, name)


def main() -> None:
    sample_log, preempt_at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    train = loop.train

    def recording_train(config, workdir, data, **kwargs):
        assert config.train.grad_accum_steps == 1, "one batch per step: its samples are the step's"
        recorded = RecordedBatches(data)
        with open(sample_log, "a") as log:
            def on_step_end(step):
                log.write(json.dumps({"step": step, "samples": recorded.unfinished.popleft()}) + "\n")
                log.flush()
                if step == preempt_at:
                    os.kill(os.getpid(), signal.SIGTERM)
            return train(config, workdir, recorded, on_step_end=on_step_end, **kwargs)

    loop.train = recording_train  # the CLI imports `train` from the loop module when it runs
    train_cli.main(argv)


if __name__ == "__main__":
    main()
