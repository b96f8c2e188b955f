"""`python -m internvl_jax.train --config NAME [--workdir DIR] key=value ...`: train or resume a run.

The data come from `data.meta_path` (official meta JSON) tokenised with `data.tokenizer_path`;
the image-context id is read from that tokenizer. A run in an existing workdir resumes from its
latest checkpoint. Multi-host: `--distributed` on TPU pods (peers found from the TPU metadata),
or `--coordinator host:port --num-processes N --process-id I` elsewhere; start-up waits at most
`--init-timeout` seconds for every process, names the ones missing, and runs a collective
self-test (:mod:`internvl_jax.distributed`).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib

import jax
from absl import flags

from internvl_jax import distributed
from internvl_jax.config import Config, ConfigError, load_config
from internvl_jax.data.tokenizer import IMG_CONTEXT_TOKEN, Tokenizer, load_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m internvl_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe name in configs/ or a path to a recipe file")
    parser.add_argument("--workdir", default=None, help="checkpoints and logs (default: runs/<config name>)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.learning_rate=1e-4")
    distributed.add_arguments(parser)
    return parser.parse_args(argv)


def with_tokenizer(config: Config, tokenizer: Tokenizer) -> Config:
    """Takes the image-context id from the tokenizer; the vocabulary must fit the model."""
    model = config.model
    context_id = tokenizer.token_to_id(IMG_CONTEXT_TOKEN)
    if tokenizer.vocab_size > model.llm.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.directory} has {tokenizer.vocab_size} tokens but "
                          f"model.llm.vocab_size is {model.llm.vocab_size}")
    return dataclasses.replace(config, model=dataclasses.replace(model, img_context_token_id=context_id))


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    distributed.initialize_from_args(args)
    config = load_config(args.config, args.overrides)
    if not config.data.meta_path or not config.data.tokenizer_path:
        raise ConfigError("set data.meta_path=<meta.json> and data.tokenizer_path=<dir with the tokenizer files>")
    tokenizer = load_tokenizer(config.data.tokenizer_path)
    if tokenizer is None:
        raise ConfigError(f"no tokenizer files in data.tokenizer_path={config.data.tokenizer_path}")
    config = with_tokenizer(config, tokenizer)

    from internvl_jax.data.pipeline import DataPipeline  # heavy imports after argument checks
    from internvl_jax.sharding import make_mesh
    from internvl_jax.train.evaluation import PeriodicEvaluator
    from internvl_jax.train.loop import train
    rows = config.train.global_batch_size // config.train.grad_accum_steps
    pipeline = DataPipeline.from_config(config, config.data, global_rows=rows, process_index=jax.process_index(),
                                        process_count=jax.process_count(), tokenizer=tokenizer)
    workdir = pathlib.Path(args.workdir or pathlib.Path("runs") / config.name)
    mesh = make_mesh(config.mesh)
    evaluator = PeriodicEvaluator(config, tokenizer, workdir, mesh) if config.train.eval_every_steps else None
    with pipeline.iterator() as data:
        train(config, workdir, data, mesh=mesh, evaluator=evaluator)


if __name__ == "__main__":
    main()
