"""Exporting a model to an HF checkpoint directory, official or transformers' native layout.

LoRA adapters are merged into their kernels; tensors are produced one layer of one parameter
at a time and streamed into sharded safetensors files (+ index), next to a config.json built
from the model's ModelConfig and the tokenizer files. Everything is written into a temporary
sibling directory that is renamed into place only when complete, so a failed export leaves no
partial checkpoint behind. The tensor order is the state-dict order of the reference model
(layer by layer), as `save_pretrained` fills its shards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from typing import Iterator

import jax
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx

from internvl_jax.config import ModelConfig
from internvl_jax.convert.checkpoint import INDEX_FILE, SINGLE_FILE
from internvl_jax.convert.hf_config import hf_config_from_model
from internvl_jax.convert.layouts import LAYOUTS, TensorMap, state_dict_order, tensor_maps
from internvl_jax.convert.safetensors_io import TensorSpec, shard_specs, write_safetensors
from internvl_jax.models.layers import Dense

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
# Copied from the source folder as well: generation settings and, for the official layout, the
# remote-code python files `trust_remote_code` loads.
SOURCE_FILES = ("generation_config.json",)
DEFAULT_MAX_SHARD_BYTES = 5 * 10 ** 9


def export_model(model: nnx.Module, out_dir: str | epath.PathLike, layout: str = "official", *, tokenizer=None,
                 source_dir: str | epath.PathLike | None = None, dtype=None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> epath.Path:
    """Writes `model` (an InternVLChatModel, possibly sharded) as an HF checkpoint in `out_dir`.

    Args:
      layout: 'official' (InternVL remote code) or 'hf' (transformers' InternVLForConditionalGeneration).
      tokenizer: its files (from `tokenizer.directory`) are copied and its bos/eos/pad ids and
        `<IMG_CONTEXT>` id written into config.json.
      source_dir: the folder the model was imported from, if any: its config.json fields are
        kept where ours do not replace them, and its tokenizer, generation and (official
        layout) remote-code files are copied.
      dtype: dtype of the written tensors; None keeps each parameter's dtype.
    Returns the output directory. All processes must call this; process 0 writes.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout '{layout}'; known: {LAYOUTS}")
    out_dir = epath.Path(out_dir)
    config: ModelConfig = model.config
    if tokenizer is not None and config.img_context_token_id < 0:
        config = _with_image_token(config, tokenizer)
    params = _ParamReader(model)
    order = state_dict_order(tensor_maps(config, layout))
    specs = [TensorSpec(key, _dtype(dtype, params, tensor_map), shape)
             for tensor_map, layer in order for key, shape in zip(tensor_map.layer_keys(layer), tensor_map.shapes)]
    source = epath.Path(source_dir) if source_dir is not None else None
    base = json.loads((source / "config.json").read_text()) if source and (source / "config.json").exists() else None
    dtype_name = _dtype_name({spec.dtype for spec in specs})
    special_ids = ({"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
                   if tokenizer is not None else None)
    hf_config = hf_config_from_model(config, layout, dtype=dtype_name, base=base, special_ids=special_ids)

    writer = jax.process_index() == 0
    with staged_directory(out_dir, overwrite) as tmp:
        _write_tensors(tmp, specs, _tensors(params, order, specs), max_shard_bytes, writer)
        if writer:
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
            _copy_side_files(tmp, layout, tokenizer, source)
    log.info("exported %d tensors to %s (%s layout)", len(specs), out_dir, layout)
    return out_dir


def _with_image_token(config: ModelConfig, tokenizer) -> ModelConfig:
    token_id = tokenizer.special_ids.get("<IMG_CONTEXT>", -1)
    return dataclasses.replace(config, img_context_token_id=token_id)


def _dtype(dtype, params: "_ParamReader", tensor_map: TensorMap) -> np.dtype:
    if dtype is not None:
        return np.dtype(dtype)
    return np.result_type(*[params.dtype(part.path) for part in tensor_map.parts])


def _dtype_name(dtypes: set[np.dtype]) -> str:
    widest = max(dtypes, key=lambda d: d.itemsize)
    return "bfloat16" if widest == np.dtype(ml_dtypes.bfloat16) else widest.name


def _tensors(params: "_ParamReader", order, specs: list[TensorSpec]) -> Iterator[tuple[str, np.ndarray]]:
    dtypes = {spec.name: spec.dtype for spec in specs}
    for tensor_map, layer in order:
        arrays = [params.layer_value(part.path, layer, part.shape) for part in tensor_map.parts]
        for key, tensor in zip(tensor_map.layer_keys(layer), tensor_map.to_checkpoint(*arrays)):
            yield key, tensor.astype(dtypes[key], copy=False)


def _write_tensors(directory: epath.Path, specs: list[TensorSpec], tensors: Iterator, max_shard_bytes: int,
                   writer: bool) -> None:
    shards = shard_specs(specs, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        if writer:
            write_safetensors(directory / name, shard, tensors, metadata={"format": "pt"})
        else:  # the other processes take part in the gathers only
            for _ in shard:
                next(tensors)
    if writer and len(shards) > 1:
        index = {"metadata": {"total_size": sum(spec.nbytes for spec in specs)},
                 "weight_map": {spec.name: name for name, shard in zip(names, shards) for spec in shard}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(directory: epath.Path, layout: str, tokenizer, source: epath.Path | None) -> None:
    folders = [epath.Path(tokenizer.directory)] if tokenizer is not None else []
    folders += [source] if source is not None else []
    wanted = set(TOKENIZER_FILES) | set(SOURCE_FILES)
    for folder in folders:
        names = set(wanted)
        if layout == "official" and folder == source:
            names |= {p.name for p in folder.glob("*.py")}
        for name in sorted(names):
            if (folder / name).exists() and not (directory / name).exists():
                (folder / name).copy(directory / name)


@contextlib.contextmanager
def staged_directory(out_dir: epath.Path, overwrite: bool = False) -> Iterator[epath.Path]:
    """Yields a temporary sibling of `out_dir` to fill; renames it to `out_dir` when the block
    completes and removes it when the block raises. Only process 0 touches the filesystem."""
    out_dir = epath.Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    writer = jax.process_index() == 0
    tmp = out_dir.parent / f".{out_dir.name}.partial"  # the same name on every process
    if writer:
        if tmp.exists():  # left by an interrupted run
            tmp.rmtree()
        tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        if writer and tmp.exists():
            tmp.rmtree()
        raise
    if not writer:
        return
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old"
        out_dir.rename(old)
        tmp.rename(out_dir)
        old.rmtree()
    else:
        tmp.rename(out_dir)


class _ParamReader:
    """One layer of a parameter at a time, gathered to the host, LoRA merged into kernels."""

    def __init__(self, model: nnx.Module):
        self.model = model
        self.flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

    def dtype(self, path) -> np.dtype:
        return np.dtype(self.flat[path].get_value().dtype)

    def layer_value(self, path, layer: int | None, logical: tuple[int, ...]) -> np.ndarray:
        """Our logical array of `path` (layer `layer` of a stack), as numpy."""
        owner = functools.reduce(getattr, path[:-1], self.model)
        if isinstance(owner, Dense) and owner.lora_rank and path[-1] == "kernel":
            value = owner.merged_kernel() if layer is None else _merged_layer(*nnx.split(owner), layer)
        else:
            value = self.flat[path].get_value()
            value = value if layer is None else _take_layer(value, layer)
        host = _to_host(value)
        return host[tuple(slice(0, n) for n in logical)]


@jax.jit
def _take_layer(stack: jax.Array, layer) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(stack, layer, keepdims=False)


@functools.partial(jax.jit, static_argnums=0)
def _merged_layer(graphdef, state, layer) -> jax.Array:
    """Dense.merged_kernel of one layer of a stacked Dense."""
    sliced = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, layer, 1), state)
    return nnx.merge(graphdef, sliced).merged_kernel()[0]


def _to_host(value: jax.Array) -> np.ndarray:
    if value.is_fully_addressable:
        return np.asarray(value)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
