"""Typed configuration: dataclasses as data, recipe files in `configs/`, `key=value` overrides.

A recipe file `configs/<name>.py` defines `get_config() -> Config`. Overrides address nested
fields with dots (`model.llm.num_layers=4`, `train.learning_rate=1e-4`); an unknown key or a
value that does not parse as the field's type raises `ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import types
import typing
from typing import Any, Sequence

from internvl_jax.data.config import DataConfig

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration key is unknown, ill-typed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """InternViT. 6B style: rms_norm + qk_normalization, no qkv bias; 300M style: layer_norm + qkv bias."""
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 14
    image_size: int = 448
    norm_type: str = "layer_norm"  # layer_norm | rms_norm
    qkv_bias: bool = True
    qk_normalization: bool = False
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 1.0  # `initializer_factor` of the official config
    drop_path_rate: float = 0.0
    # Heads are padded (zero weights, masked statistics) to a multiple of this so a tensor-parallel
    # mesh axis divides them (the 6B ViT has 25 heads). 1 = no padding.
    pad_heads_to_multiple_of: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_num_heads(self) -> int:
        return _round_up(self.num_heads, self.pad_heads_to_multiple_of)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding. scaling: none | linear | dynamic (InternLM2 NTK) | su (Phi-3 LongRoPE)."""
    theta: float = 10000.0
    scaling: str = "none"
    factor: float = 1.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    original_max_position_embeddings: int = 0


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Decoder-only LLM. family: internlm2 | phi3 | qwen2 | llama (names and fused layouts on import)."""
    family: str = "internlm2"
    vocab_size: int = 92553
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 8
    intermediate_size: int = 8192
    head_dim: int = 0  # 0 = hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    # Vocab rows are padded (never predicted, no probability mass) to a multiple of this.
    pad_vocab_to_multiple_of: int = 1

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        return _round_up(self.vocab_size, self.pad_vocab_to_multiple_of)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (rank 0 = off). LLM targets: qkv, o, gate, up, down; ViT: qkv, proj, fc1, fc2."""
    rank: int = 0
    alpha: float = 0.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv", "o", "gate", "up", "down")
    vision_rank: int = 0
    vision_alpha: float = 0.0
    vision_targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The InternVL chat model: vision encoder, pixel-shuffle projector, LLM, and execution knobs."""
    vision: VisionConfig = VisionConfig()
    llm: LLMConfig = LLMConfig()
    lora: LoraConfig = LoraConfig()
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    img_context_token_id: int = -1  # read from the tokenizer when a checkpoint is loaded
    template: str = "internlm2-chat"
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    # Execution.
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # trainable (master) weights
    frozen_param_dtype: str = "bfloat16"
    scan_layers: bool = True
    remat_policy: str = "none"  # none | full | save_dots
    attention: str = "auto"  # auto | xla | splash | cudnn

    @property
    def num_image_token(self) -> int:
        return int(self.vision.grid_size ** 2 * self.downsample_ratio ** 2)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 takes the remaining devices."""
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A recipe's optimisation and data settings (spec §10)."""
    stage: str = "finetune"  # pretrain | finetune | finetune_2nd | finetune_lora
    # Initial weights: an HF checkpoint directory (official or transformers layout) or an earlier
    # run's workdir (its latest checkpoint's model, e.g. stage 1 for stage 2). Empty = random init.
    init_from: str = ""
    trainable: tuple[str, ...] = ("vision_model", "mlp1", "language_model")
    learning_rate: float = 4e-5
    weight_decay: float = 0.01
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.03
    global_batch_size: int = 1024
    max_seq_length: int = 8192
    epochs: float = 1.0
    group_by_length: bool = True
    loss_reduction: str = "micro_batch_token_mean"  # | global_token_mean
    save_every_steps: int = 200
    # Added for the train loop (issue 5).
    grad_accum_steps: int = 1  # micro-batches per optimizer step (global_batch_size counts all of them)
    loss_group_rows: int = 0  # micro_batch_token_mean: rows per token-mean group (official: per-GPU batch); 0 = whole micro-batch
    loss_chunk_size: int = 1024  # sequence positions per cross-entropy chunk
    weight_decay_mask: str = "all"  # all (official: one DeepSpeed param group) | no_bias_norm
    lr_multipliers: tuple[str, ...] = ()  # per-group lr factors, e.g. mlp1=10,vision_model=2 (official: none)
    nonfinite_policy: str = "skip"  # skip (drop the update, count it) | raise
    total_steps: int = 0  # 0 = epochs × data set size / global_batch_size
    seed: int = 0
    save_every_minutes: float = 0.0  # 0 = off; decided on process 0 and broadcast
    keep_last: int = 3
    keep_every: int = 0  # also keep every K-th step's checkpoint; 0 = off
    log_every_steps: int = 1
    peak_tflops_per_device: float = 0.0  # for MFU; 0 = from the device kind when known
    # jax.profiler trace of profile_num_steps steps from profile_start_step (0 = off) into workdir/profile.
    profile_start_step: int = 0
    profile_num_steps: int = 3
    # In-training evaluation every eval_every_steps steps (0 = off) and at the last step: greedy
    # generation on the benchmarks named as for `python -m internvl_jax.eval` (e.g. `jsonl:val.jsonl`,
    # `textvqa`), scored with their official metrics; results under workdir/eval/step_N/.
    eval_every_steps: int = 0
    eval_benchmarks: tuple[str, ...] = ()
    eval_data_dir: str = ""
    eval_preset: str = "official"
    eval_settings: tuple[str, ...] = ()  # as on the eval command line: max_new_tokens=8, generation.top_p=0.9, ...
    eval_limit: int = 256  # samples per benchmark; 0 = all
    eval_batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "unnamed"
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# --------------------------------------------------------------------------------------------
# Loading and overrides.


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
    """Loads `configs/<name>.py` (or a path to such a file) and applies `key=value` overrides."""
    path = pathlib.Path(name_or_path)
    if path.suffix != ".py":
        path = CONFIGS_DIR / f"{name_or_path}.py"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"no config '{name_or_path}' (looked for {path}); known: {', '.join(known)}")
    spec = importlib.util.spec_from_file_location(f"internvl_jax_configs.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    return apply_overrides(module.get_config(), overrides)


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Returns `config` with each `a.b.c=value` applied; errors name the offending key."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        config = _set_path(config, key.strip().split("."), raw.strip(), key.strip())
    return config


def _set_path(node: Any, path: list[str], raw: str, full_key: str) -> Any:
    field = _field(node, path[0], full_key)
    if len(path) == 1:
        field_type = typing.get_type_hints(type(node))[field.name]
        return dataclasses.replace(node, **{field.name: _parse(raw, field_type, full_key)})
    child = _set_path(getattr(node, field.name), path[1:], raw, full_key)
    return dataclasses.replace(node, **{field.name: child})


def _field(node: Any, name: str, full_key: str) -> dataclasses.Field:
    if not dataclasses.is_dataclass(node):
        raise ConfigError(f"unknown config key '{full_key}': '{name}' is below a plain value")
    fields = {f.name: f for f in dataclasses.fields(node)}
    if name not in fields:
        raise ConfigError(f"unknown config key '{full_key}' ('{name}' is not one of "
                          f"{', '.join(sorted(fields))})")
    return fields[name]


def _parse(raw: str, field_type: Any, key: str) -> Any:
    origin = typing.get_origin(field_type)
    try:
        if field_type is bool:
            lowered = raw.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(raw)
        if field_type is int:
            return int(raw)
        if field_type is float:
            return float(raw)
        if field_type is str:
            return raw
        if origin is tuple:
            (item_type, _) = typing.get_args(field_type)
            items = json.loads(raw) if raw.startswith("[") else [s for s in raw.split(",") if s]
            return tuple(_parse(str(i), item_type, key) for i in items)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(field_type) if a is not type(None)]
            if raw.lower() in ("none", "null"):
                return None
            return _parse(raw, args[0], key)
    except (ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"config key '{key}': cannot parse '{raw}' as {field_type}") from e
    if dataclasses.is_dataclass(field_type):
        raise ConfigError(f"config key '{key}' is a group; set one of its fields (e.g. '{key}.<field>=...')")
    raise ConfigError(f"config key '{key}': unsupported type {field_type}")


def to_dict(config: Any) -> dict:
    """A JSON-able view of a config (for checkpoints and logs)."""
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict) -> Any:
    """Inverse of `to_dict` for a config dataclass type."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, field_type = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(field_type):
            value = from_dict(field_type, value)
        elif typing.get_origin(field_type) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)
