"""One process of tests/test_multihost.py: `python -m internvl_jax.train` with two test hooks.

    python tests/multihost_train.py SAMPLE_LOG PREEMPT_AT [train command-line arguments ...]

After each step, the ids of the samples in this process's rows are appended to SAMPLE_LOG as a
JSON line ({"step", "samples"}); after step PREEMPT_AT (0 = never) the process sends itself SIGTERM,
as a preempted host would. Everything else is the train command line unchanged.
"""
import json
import os
import signal
import sys

from internvl_jax.train import __main__ as train_cli
from internvl_jax.train import loop


def main() -> None:
    sample_log, preempt_at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    train = loop.train

    def recording_train(config, workdir, data, **kwargs):
        assert config.train.grad_accum_steps == 1, "one batch per step: its samples are the step's"
        with open(sample_log, "a") as log:
            def on_step_end(step):
                log.write(json.dumps({"step": step, "samples": data.last_samples}) + "\n")
                log.flush()
                if step == preempt_at:
                    os.kill(os.getpid(), signal.SIGTERM)
            return train(config, workdir, data, on_step_end=on_step_end, **kwargs)

    loop.train = recording_train  # the CLI imports `train` from the loop module when it runs
    train_cli.main(argv)


if __name__ == "__main__":
    main()
