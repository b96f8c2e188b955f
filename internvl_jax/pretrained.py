"""`load_pretrained`: a model, its tokenizer and its config from an HF checkpoint directory.

    model, tokenizer, config = load_pretrained("/ckpt/Mini-InternVL-Chat-2B-V1-5")
    logits = model(input_ids, pixel_values, image_flags)   # [B, T, V] float32

`input_ids` [B, T] int, `pixel_values` [N, 3, H, W] float (normalised tiles, the official
layout), `image_flags` [N] (1 = real tile). The folder is a local path or any `etils.epath`
path (`gs://...`), in the official InternVL layout or transformers' native InternVL layout.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax.numpy as jnp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from internvl_jax.config import ModelConfig
from internvl_jax.convert.load import inspect_checkpoint, load_state, read_config
from internvl_jax.data.tokenizer import IMG_CONTEXT_TOKEN, Tokenizer, load_tokenizer
from internvl_jax.models.internvl import InternVLChatModel
from internvl_jax.models.params import abstract_model
from internvl_jax.sharding import state_shardings

log = logging.getLogger(__name__)


def load_pretrained(path: str | epath.PathLike, mesh: Mesh | None = None, dtype: Any = None,
                    img_context_token_id: int | None = None, *, lora: str = "merge",
                    **overrides: Any) -> tuple[InternVLChatModel, Tokenizer | None, ModelConfig]:
    """Loads the checkpoint in `path` onto `mesh` (or the first device).

    Args:
      dtype: parameter and compute dtype; None keeps the checkpoint's (bf16 stays bf16).
      img_context_token_id: id of `<IMG_CONTEXT>`; by default read from the tokenizer, else from
        config.json (transformers' layout). Needed when the folder has no tokenizer.
      lora: what happens to PEFT adapters in the checkpoint: 'merge' folds them into their
        weights; 'keep' makes them our (trainable) adapters where ours represent them exactly
        and folds the others.
      overrides: ModelConfig fields to change, `a__b=value` for nested ones (e.g.
        `llm__pad_vocab_to_multiple_of=128`, `scan_layers=False`).
    Returns (model, tokenizer or None, config). The model's params are sharded by their logical
    axes on `mesh`; run it under `jax.set_mesh(mesh)` so activations are constrained as well.
    """
    if lora not in ("merge", "keep"):
        raise ValueError(f"lora must be 'merge' or 'keep', got {lora!r}")
    config, layout = read_config(path)
    summary = inspect_checkpoint(path, config, layout)
    tokenizer = load_tokenizer(path, required_tokens=())
    param_dtype = jnp.dtype(dtype if dtype is not None else summary.dtype).name
    config = dataclasses.replace(config, dtype=param_dtype, param_dtype=param_dtype, frozen_param_dtype=param_dtype,
                                 img_context_token_id=_image_token_id(config, tokenizer, img_context_token_id, path))
    if lora == "keep":
        config = dataclasses.replace(config, lora=summary.lora)
    for key, value in overrides.items():
        config = _replace_nested(config, key.split("__"), value)
    abstract = abstract_model(config)
    shardings = state_shardings(nnx.state(abstract, nnx.Param), mesh) if mesh is not None else None
    state = load_state(path, config, layout, abstract, shardings, dtype=None if dtype is None else jnp.dtype(dtype))
    return nnx.merge(nnx.graphdef(abstract), state), tokenizer, config


def _replace_nested(node: Any, names: list[str], value: Any) -> Any:
    if not dataclasses.is_dataclass(node) or names[0] not in {f.name for f in dataclasses.fields(node)}:
        raise ValueError(f"unknown ModelConfig field '{names[0]}' in a load_pretrained override")
    if len(names) > 1:
        value = _replace_nested(getattr(node, names[0]), names[1:], value)
    return dataclasses.replace(node, **{names[0]: value})


def _image_token_id(config: ModelConfig, tokenizer: Tokenizer | None, explicit: int | None, path) -> int:
    from_tokenizer = tokenizer.special_ids.get(IMG_CONTEXT_TOKEN) if tokenizer is not None else None
    found = from_tokenizer if from_tokenizer is not None else config.img_context_token_id
    if explicit is not None:
        if found not in (None, -1, explicit):
            log.warning("%s: img_context_token_id=%d given, but the checkpoint says %s; using %d", path,
                        explicit, found, explicit)
        return explicit
    if from_tokenizer is not None and config.img_context_token_id not in (-1, from_tokenizer):
        log.warning("%s: config.json has image_token_id %d but the tokenizer's %s is %d; using the tokenizer's",
                    path, config.img_context_token_id, IMG_CONTEXT_TOKEN, from_tokenizer)
    if found in (None, -1):
        log.warning("%s: no image-context token id known (no tokenizer with %s); pass "
                    "img_context_token_id=... to use images", path, IMG_CONTEXT_TOKEN)
        return -1
    return found
