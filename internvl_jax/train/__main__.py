"""`python -m internvl_jax.train --config NAME [--workdir DIR] key=value ...`: train or resume a run."""
from __future__ import annotations

import argparse
import pathlib

from internvl_jax.config import load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m internvl_jax.train", description=__doc__)
    parser.add_argument("--config", required=True, help="recipe name in configs/ or a path to a recipe file")
    parser.add_argument("--workdir", default=None, help="checkpoints and logs (default: runs/<config name>)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.learning_rate=1e-4")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    # The data pipeline (issue 4) needs a `data` config group and a tokenizer, which Config does not carry yet.
    raise SystemExit(f"config '{config.name}' loaded; the train CLI cannot build its data iterator until Config "
                     "has a data group (DataConfig + tokenizer path). Meanwhile call "
                     f"internvl_jax.train.loop.train(config, {str(args.workdir or pathlib.Path('runs') / config.name)!r}, iterator).")


if __name__ == "__main__":
    main()
