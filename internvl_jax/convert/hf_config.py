"""HF `config.json` <-> ModelConfig, for the official `internvl_chat` and transformers' `internvl`.

Reading needs no per-checkpoint table: everything comes from the file. Writing produces a file
the official remote code (transformers 4.37 era field names) or transformers' native
`InternVLForConditionalGeneration` reads; fields of a `base` config.json (e.g. `auto_map` of the
folder a model was imported from) are kept unless ours replace them.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

from internvl_jax.config import LLMConfig, ModelConfig, RopeConfig, VisionConfig

log = logging.getLogger(__name__)

LLM_FAMILIES = {
    "InternLM2ForCausalLM": "internlm2", "internlm2": "internlm2",
    "Phi3ForCausalLM": "phi3", "phi3": "phi3",
    "Qwen2ForCausalLM": "qwen2", "qwen2": "qwen2",
    "LlamaForCausalLM": "llama", "llama": "llama",
}
_ROPE_KEYS = {"rope_theta", "rope_scaling", "rope_parameters"}
_ARCHITECTURES = {"internlm2": "InternLM2ForCausalLM", "phi3": "Phi3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "llama": "LlamaForCausalLM"}


class ConfigFileError(ValueError):
    """config.json lacks a field or has an unsupported value."""


def _require(block: dict, key: str, where: str) -> Any:
    if key not in block:
        raise ConfigFileError(f"{where}: missing field '{key}'")
    return block[key]


def _rope(llm: dict, where: str) -> RopeConfig:
    # transformers ≥ 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
    scaling = {**(llm.get("rope_parameters") or {}), **(llm.get("rope_scaling") or {})}
    theta = float(llm.get("rope_theta") or scaling.get("rope_theta") or 10000.0)
    kind = scaling.get("type") or scaling.get("rope_type") or "none"
    kind = {"default": "none", "longrope": "su"}.get(kind, kind)
    if kind not in ("none", "linear", "dynamic", "su"):
        raise ConfigFileError(f"{where}: unsupported rope scaling '{kind}'")
    if float(scaling.get("partial_rotary_factor") or llm.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ConfigFileError(f"{where}: partial_rotary_factor != 1 is not supported")
    original = llm.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings") or 0
    return RopeConfig(theta=theta, scaling=kind, factor=float(scaling.get("factor") or 1.0),
                      short_factor=tuple(scaling.get("short_factor") or ()),
                      long_factor=tuple(scaling.get("long_factor") or ()),
                      original_max_position_embeddings=int(original))


def _llm_config(llm: dict, where: str, tie_default: bool) -> LLMConfig:
    arch = (llm.get("architectures") or [None])[0] or llm.get("model_type")
    if arch not in LLM_FAMILIES:
        raise ConfigFileError(f"{where}: unsupported language model '{arch}' (known: {sorted(set(LLM_FAMILIES.values()))})")
    family = LLM_FAMILIES[arch]
    heads = int(_require(llm, "num_attention_heads", where))
    hidden = int(_require(llm, "hidden_size", where))
    unsupported = {
        "bias": family == "internlm2" and llm.get("bias", False),  # wqkv/wo biases
        "attention_bias": family == "llama" and llm.get("attention_bias", False),  # also an o_proj bias
        "mlp_bias": llm.get("mlp_bias", False),
        "hidden_act": llm.get("hidden_act", "silu") != "silu",
    }
    for field, bad in unsupported.items():
        if bad:
            raise ConfigFileError(f"{where}: {field}={llm[field]!r} is not supported")
    head_dim = llm.get("head_dim")
    return LLMConfig(
        family=family, vocab_size=int(_require(llm, "vocab_size", where)), hidden_size=hidden,
        num_layers=int(_require(llm, "num_hidden_layers", where)), num_heads=heads,
        num_kv_heads=int(llm.get("num_key_value_heads") or heads),
        intermediate_size=int(_require(llm, "intermediate_size", where)),
        head_dim=int(head_dim) if head_dim not in (None, hidden // heads) else 0,
        rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(llm.get("max_position_embeddings", 4096)),
        rope=_rope(llm, where), qkv_bias=family == "qwen2",
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", tie_default)))


def _pair(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _vision_config(vision: dict, where: str, official: bool) -> VisionConfig:
    if vision.get("hidden_act", "gelu") != "gelu":
        raise ConfigFileError(f"{where}: hidden_act={vision['hidden_act']!r} is not supported (exact GELU only)")
    common = dict(
        hidden_size=int(_require(vision, "hidden_size", where)),
        num_layers=int(_require(vision, "num_hidden_layers", where)),
        num_heads=int(_require(vision, "num_attention_heads", where)),
        intermediate_size=int(_require(vision, "intermediate_size", where)),
        patch_size=_pair(vision.get("patch_size", 14)), image_size=_pair(vision.get("image_size", 448)),
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)))
    if official:
        return VisionConfig(**common, norm_type=vision.get("norm_type", "rms_norm"),
                            qkv_bias=bool(vision.get("qkv_bias", False)),
                            qk_normalization=bool(vision.get("qk_normalization", False)),
                            layer_scale_init=float(vision.get("initializer_factor", 1.0)),
                            drop_path_rate=float(vision.get("drop_path_rate", 0.0)))
    if not vision.get("use_mean_pooling", True):
        raise ConfigFileError(f"{where}: use_mean_pooling=false (a final vision norm) is not supported")
    return VisionConfig(**common, norm_type=vision.get("norm_type", "layer_norm"),
                        qkv_bias=bool(vision.get("attention_bias", False)),
                        qk_normalization=bool(vision.get("use_qk_norm", False)),
                        layer_scale_init=float(vision.get("layer_scale_init_value", 0.1)))


def model_config_from_hf(data: dict, where: str = "config.json") -> tuple[ModelConfig, str]:
    """Returns (ModelConfig, layout) for an official `internvl_chat` or native `internvl` config."""
    model_type = data.get("model_type")
    if model_type == "internvl_chat":
        vision = _vision_config(_require(data, "vision_config", where), f"{where} vision_config", official=True)
        llm = _llm_config(_require(data, "llm_config", where), f"{where} llm_config", tie_default=False)
        if "ps_version" not in data:
            log.warning("%s has no 'ps_version': the official code would assume 'v1' (all InternVL-1.5 "
                        "models were trained with 'v2'); using 'v1' as the official code does", where)
        forced = data.get("force_image_size")
        if forced and int(forced) != vision.image_size:
            log.warning("%s: force_image_size %s differs from vision_config.image_size %d; the position "
                        "embedding is read at %d px and interpolated to each input", where, forced,
                        vision.image_size, vision.image_size)
        config = ModelConfig(
            vision=vision, llm=llm, downsample_ratio=float(data.get("downsample_ratio", 0.5)),
            ps_version=data.get("ps_version", "v1"), select_layer=int(data.get("select_layer", -1)),
            template=data.get("template", "internlm2-chat"), use_thumbnail=bool(data.get("use_thumbnail", True)),
            min_dynamic_patch=int(data.get("min_dynamic_patch", 1)),
            max_dynamic_patch=int(data.get("max_dynamic_patch", 12)))
        return config, "official"
    if model_type == "internvl":
        vision = _vision_config(_require(data, "vision_config", where), f"{where} vision_config", official=False)
        text = _require(data, "text_config", where)
        layer = data.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise ConfigFileError(f"{where}: vision_feature_layer {layer!r} (a list) is not supported")
        if data.get("vision_feature_select_strategy", "default") != "default":
            raise ConfigFileError(f"{where}: vision_feature_select_strategy "
                                  f"{data['vision_feature_select_strategy']!r} (keeping CLS) is not supported")
        tie = bool(data.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        config = ModelConfig(
            vision=vision, llm=_llm_config(dict(text, tie_word_embeddings=tie), f"{where} text_config", tie),
            downsample_ratio=float(data.get("downsample_ratio", 0.5)), ps_version="v2", select_layer=layer,
            img_context_token_id=int(data.get("image_token_id", -1)), template="chatml")
        return config, "hf"
    raise ConfigFileError(f"{where}: model_type '{model_type}' is neither 'internvl_chat' nor 'internvl'")


# --------------------------------------------------------------------------------------------
# Writing.


def hf_config_from_model(config: ModelConfig, layout: str, *, dtype: str, base: dict | None = None,
                         special_ids: dict[str, int | None] | None = None) -> dict:
    """config.json for `config` in `layout` ('official' or 'hf').

    dtype: the tensors' dtype name ('bfloat16', 'float32'); special_ids: optional
    bos/eos/pad token ids from the tokenizer.
    """
    if layout == "official":
        data = _official_config(config, dtype)
    elif layout == "hf":
        data = _native_config(config, dtype)
    else:
        raise ValueError(f"unknown checkpoint layout '{layout}'")
    llm_block = data["llm_config" if layout == "official" else "text_config"]
    llm_block.update({f"{name}_token_id": i for name, i in (special_ids or {}).items() if i is not None})
    if base and base.get("model_type") == data["model_type"]:
        merged = _deep_update(copy.deepcopy(base), data)
        merged_llm = merged["llm_config" if layout == "official" else "text_config"]
        for key in _ROPE_KEYS:  # ours replace the base's whole, and the other convention's would conflict
            merged_llm.pop(key, None)
            if key in llm_block:
                merged_llm[key] = llm_block[key]
        data = merged
    return data


def _llm_block(llm: LLMConfig, dtype: str, native: bool) -> dict:
    # transformers has no InternLM2; its math is Llama's once wqkv is split (toolchain §7).
    family = "llama" if native and llm.family == "internlm2" else llm.family
    block = {
        "architectures": [_ARCHITECTURES[family]], "model_type": family, "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads, "head_dim": llm.resolved_head_dim, "hidden_act": "silu",
        "rms_norm_eps": llm.rms_norm_eps, "max_position_embeddings": llm.max_position_embeddings,
        "tie_word_embeddings": llm.tie_word_embeddings, "torch_dtype": dtype, **_rope_fields(llm.rope, native),
    }
    if llm.rope.original_max_position_embeddings:
        block["original_max_position_embeddings"] = llm.rope.original_max_position_embeddings
    if family == "internlm2":
        block.update(bias=False, attn_implementation="eager")
    if family == "llama":
        block.update(attention_bias=False, mlp_bias=False)
    if family == "qwen2":
        block.update(use_sliding_window=False)
    return block


def _rope_fields(rope: RopeConfig, native: bool) -> dict:
    """transformers ≥ 5 reads `rope_parameters`; the official remote code `rope_theta` + `rope_scaling`."""
    kind = {"none": "default", "su": "longrope" if native else "su"}.get(rope.scaling, rope.scaling)
    scaling = {}
    if rope.scaling == "su":
        scaling = {"short_factor": list(rope.short_factor), "long_factor": list(rope.long_factor)}
    elif rope.scaling != "none":
        scaling = {"factor": rope.factor}
    if native:
        return {"rope_parameters": {"rope_type": kind, "rope_theta": rope.theta, **scaling}}
    return {"rope_theta": rope.theta, "rope_scaling": {"type": kind, **scaling} if scaling else None}


def _official_config(config: ModelConfig, dtype: str) -> dict:
    v = config.vision
    vision = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads, "num_channels": 3, "patch_size": v.patch_size,
        "image_size": v.image_size, "hidden_act": "gelu", "norm_type": v.norm_type,
        "layer_norm_eps": v.layer_norm_eps, "qkv_bias": v.qkv_bias, "qk_normalization": v.qk_normalization,
        "initializer_factor": v.layer_scale_init, "drop_path_rate": v.drop_path_rate, "dropout": 0.0,
        "attention_dropout": 0.0, "use_flash_attn": False, "torch_dtype": dtype,
    }
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "vision_config": vision,
        "llm_config": _llm_block(config.llm, dtype, native=False), "use_backbone_lora": 0, "use_llm_lora": 0,
        "pad2square": False, "select_layer": config.select_layer, "force_image_size": v.image_size,
        "downsample_ratio": config.downsample_ratio, "template": config.template, "dynamic_image_size": True,
        "use_thumbnail": config.use_thumbnail, "ps_version": config.ps_version,
        "min_dynamic_patch": config.min_dynamic_patch, "max_dynamic_patch": config.max_dynamic_patch,
        "hidden_size": config.llm.hidden_size, "tie_word_embeddings": False, "torch_dtype": dtype,
    }


def _native_config(config: ModelConfig, dtype: str) -> dict:
    v = config.vision
    if config.ps_version != "v2":
        raise ConfigFileError("transformers' InternVL implements pixel shuffle v2 only; this model uses "
                              f"{config.ps_version!r}: export it in the official layout")
    if config.img_context_token_id < 0:
        raise ConfigFileError("transformers' InternVL needs image_token_id: set img_context_token_id (or export "
                              "with a tokenizer that has <IMG_CONTEXT>)")
    vision = {
        "model_type": "internvl_vision", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads, "intermediate_size": v.intermediate_size, "hidden_act": "gelu",
        "attention_bias": v.qkv_bias, "use_qk_norm": v.qk_normalization, "norm_type": v.norm_type,
        "layer_norm_eps": v.layer_norm_eps, "layer_scale_init_value": v.layer_scale_init,
        "image_size": [v.image_size, v.image_size], "patch_size": [v.patch_size, v.patch_size],
        "num_channels": 3, "use_mean_pooling": True, "use_absolute_position_embeddings": True,
        "use_mask_token": False,
    }
    text = _llm_block(config.llm, dtype, native=True)
    text.pop("architectures")
    return {
        "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl", "vision_config": vision,
        "text_config": text, "downsample_ratio": config.downsample_ratio,
        "image_seq_length": config.num_image_token, "image_token_id": config.img_context_token_id,
        "projector_hidden_act": "gelu", "vision_feature_layer": config.select_layer,
        "vision_feature_select_strategy": "default", "tie_word_embeddings": config.llm.tie_word_embeddings,
        "torch_dtype": dtype,
    }


def _deep_update(base: dict, new: dict) -> dict:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base
