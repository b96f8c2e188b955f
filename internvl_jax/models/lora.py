"""Folding LoRA adapters into their base kernels."""
from __future__ import annotations

import dataclasses

from flax import nnx

from internvl_jax.models.internvl import InternVLChatModel
from internvl_jax.models.layers import Dense, LoRAParam
from internvl_jax.models.params import abstract_model


def merge_lora(model: InternVLChatModel) -> InternVLChatModel:
    """A model without adapters whose kernels are W + (alpha/r)·A·B (same outputs)."""
    config = model.config
    plain = dataclasses.replace(config, lora=dataclasses.replace(config.lora, rank=0, vision_rank=0))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(LoRAParam))))
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Dense) and node.lora_rank:
            kernel_path = tuple(path) + ("kernel",)
            flat[kernel_path] = flat[kernel_path].replace(node.merged_kernel())
    return nnx.merge(nnx.graphdef(abstract_model(plain)), nnx.from_flat_state(flat))
