"""The official InternVL-1.5 training recipes (spec §10) as data.

`recipe(model_name, stage)` returns the TrainConfig and ViT drop-path rate of one of the
shell/internvl1.5 scripts; the per-recipe files in `configs/` are thin wrappers around it.
"""
from __future__ import annotations

import dataclasses

from internvl_jax.config import Config, LoraConfig, TrainConfig

STAGES = ("pretrain", "finetune", "finetune_2nd", "finetune_lora")

# (lr, weight decay, global batch, max length, drop path) per model and stage.
_TABLE = {
    "internvl_chat_v1_5": {
        "pretrain": (1e-5, 0.05, 2048, 4096, 0.2),
        "finetune": (2e-5, 0.05, 1024, 4096, 0.4),
        "finetune_2nd": (2e-5, 0.05, 128, 4096, 0.4),
        "finetune_lora": (2e-5, 0.05, 16, 4096, 0.4),
    },
    "mini_internvl_chat_2b_v1_5": {
        "pretrain": (2e-5, 0.01, 2048, 4096, 0.1),
        "finetune": (4e-5, 0.01, 1024, 8192, 0.1),
        "finetune_2nd": (4e-5, 0.01, 128, 4096, 0.1),
        "finetune_lora": (4e-5, 0.01, 16, 4096, 0.1),
    },
    "mini_internvl_chat_4b_v1_5": {
        "pretrain": (2e-4, 0.05, 2048, 4096, 0.0),
        "finetune": (4e-5, 0.05, 1024, 8192, 0.1),
        "finetune_2nd": (4e-5, 0.05, 128, 4096, 0.1),
        "finetune_lora": (4e-5, 0.05, 16, 4096, 0.1),
    },
}

_TRAINABLE = {
    "pretrain": ("vision_model", "mlp1"),
    "finetune": ("vision_model", "mlp1", "language_model"),
    "finetune_2nd": ("mlp1", "language_model"),
    "finetune_lora": ("language_model",),
}


def recipe(base: Config, model_name: str, stage: str) -> Config:
    """`base` (a model config) with the official hyper-parameters of `stage` for `model_name`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}'; known: {STAGES}")
    lr, weight_decay, batch, max_length, drop_path = _TABLE[model_name][stage]
    trainable = _TRAINABLE[stage]
    if model_name == "mini_internvl_chat_4b_v1_5" and stage == "pretrain":
        trainable = ("mlp1",)  # the 4B stage 1 trains the MLP only
    first_stage = stage == "pretrain"
    train = TrainConfig(
        stage=stage, trainable=trainable, learning_rate=lr, weight_decay=weight_decay,
        warmup_steps=100 if first_stage else 0, warmup_ratio=0.0 if first_stage else 0.03,
        global_batch_size=batch, max_seq_length=max_length, epochs=1.0,
        group_by_length=stage == "finetune", loss_reduction="micro_batch_token_mean")
    model = base.model
    model = dataclasses.replace(model, vision=dataclasses.replace(model.vision, drop_path_rate=drop_path),
                                remat_policy="full")
    if stage == "finetune_lora":
        model = dataclasses.replace(model, lora=LoraConfig(rank=16, alpha=32.0, dropout=0.05))
    return dataclasses.replace(base, name=f"{model_name}_{stage}", model=model, train=train)
