"""Model configs from an HF `config.json`: the official `internvl_chat` one or transformers' `internvl`."""
from __future__ import annotations

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


class ConfigFileError(ValueError):
    """config.json lacks a field or has an unsupported value."""


def _require(block: dict, key: str, where: str) -> Any:
    if key not in block:
        raise ConfigFileError(f"{where}: missing field '{key}'")
    return block[key]


def _rope(llm: dict, where: str) -> RopeConfig:
    params = llm.get("rope_parameters") or {}
    scaling = llm.get("rope_scaling") or {}
    theta = float(llm.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = scaling.get("type") or scaling.get("rope_type") or params.get("rope_type") or "none"
    kind = {"default": "none", "longrope": "su"}.get(kind, kind)
    if kind not in ("none", "linear", "dynamic", "su"):
        raise ConfigFileError(f"{where}: unsupported rope scaling '{kind}'")
    return RopeConfig(theta=theta, scaling=kind, factor=float(scaling.get("factor") or 1.0),
                      short_factor=tuple(scaling.get("short_factor") or ()),
                      long_factor=tuple(scaling.get("long_factor") or ()),
                      original_max_position_embeddings=int(llm.get("original_max_position_embeddings", 0)))


def _llm_config(llm: dict, where: str, tie_default: bool) -> LLMConfig:
    arch = (llm.get("architectures") or [None])[0] or llm.get("model_type")
    if arch not in LLM_FAMILIES:
        raise ConfigFileError(f"{where}: unsupported language model '{arch}' (known: {sorted(set(LLM_FAMILIES.values()))})")
    family = LLM_FAMILIES[arch]
    heads = int(_require(llm, "num_attention_heads", where))
    hidden = int(_require(llm, "hidden_size", where))
    if family == "internlm2" and llm.get("bias", False):
        raise ConfigFileError(f"{where}: InternLM2 with bias=true (wqkv/wo biases) is not supported")
    qkv_bias = family == "qwen2" or bool(llm.get("attention_bias", False))
    return LLMConfig(
        family=family, vocab_size=int(_require(llm, "vocab_size", where)), hidden_size=hidden,
        num_layers=int(_require(llm, "num_hidden_layers", where)), num_heads=heads,
        num_kv_heads=int(llm.get("num_key_value_heads") or heads),
        intermediate_size=int(_require(llm, "intermediate_size", where)),
        head_dim=int(llm.get("head_dim") or 0) if llm.get("head_dim") not in (None, hidden // heads) else 0,
        rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(llm.get("max_position_embeddings", 4096)),
        rope=_rope(llm, where), qkv_bias=qkv_bias,
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", tie_default)))


def _pair(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def model_config_from_hf(data: dict, where: str = "config.json") -> tuple[ModelConfig, str]:
    """Returns (ModelConfig, layout) for an official `internvl_chat` or native `internvl` config."""
    model_type = data.get("model_type")
    if model_type == "internvl_chat":
        vision = _require(data, "vision_config", where)
        llm = _require(data, "llm_config", where)
        vision_config = VisionConfig(
            hidden_size=int(_require(vision, "hidden_size", f"{where} vision_config")),
            num_layers=int(_require(vision, "num_hidden_layers", f"{where} vision_config")),
            num_heads=int(_require(vision, "num_attention_heads", f"{where} vision_config")),
            intermediate_size=int(_require(vision, "intermediate_size", f"{where} vision_config")),
            patch_size=int(vision.get("patch_size", 14)), image_size=int(vision.get("image_size", 448)),
            norm_type=vision.get("norm_type", "rms_norm"), qkv_bias=bool(vision.get("qkv_bias", False)),
            qk_normalization=bool(vision.get("qk_normalization", False)),
            layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
            layer_scale_init=float(vision.get("initializer_factor", 1.0)),
            drop_path_rate=float(vision.get("drop_path_rate", 0.0)))
        if "ps_version" not in data:
            log.warning("%s has no 'ps_version': the official code would assume 'v1' (all InternVL-1.5 "
                        "models were trained with 'v2'); using 'v1' as the official code does", where)
        config = ModelConfig(
            vision=vision_config, llm=_llm_config(llm, f"{where} llm_config", tie_default=False),
            downsample_ratio=float(data.get("downsample_ratio", 0.5)), ps_version=data.get("ps_version", "v1"),
            select_layer=int(data.get("select_layer", -1)), template=data.get("template", "internlm2-chat"),
            use_thumbnail=bool(data.get("use_thumbnail", True)),
            min_dynamic_patch=int(data.get("min_dynamic_patch", 1)),
            max_dynamic_patch=int(data.get("max_dynamic_patch", 12)))
        return config, "official"
    if model_type == "internvl":
        vision = _require(data, "vision_config", where)
        text = _require(data, "text_config", where)
        vision_config = VisionConfig(
            hidden_size=int(_require(vision, "hidden_size", f"{where} vision_config")),
            num_layers=int(_require(vision, "num_hidden_layers", f"{where} vision_config")),
            num_heads=int(_require(vision, "num_attention_heads", f"{where} vision_config")),
            intermediate_size=int(_require(vision, "intermediate_size", f"{where} vision_config")),
            patch_size=_pair(vision.get("patch_size", 14)), image_size=_pair(vision.get("image_size", 448)),
            norm_type=vision.get("norm_type", "layer_norm"), qkv_bias=bool(vision.get("attention_bias", False)),
            qk_normalization=bool(vision.get("use_qk_norm", False)),
            layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
            layer_scale_init=float(vision.get("layer_scale_init_value", 0.1)))
        if not vision.get("use_mean_pooling", True):
            raise ConfigFileError(f"{where}: use_mean_pooling=false (a final vision norm) is not supported")
        layer = data.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise ConfigFileError(f"{where}: vision_feature_layer {layer!r} (a list) is not supported")
        tie = bool(data.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        text = dict(text, tie_word_embeddings=tie)
        config = ModelConfig(
            vision=vision_config, llm=_llm_config(text, f"{where} text_config", tie_default=tie),
            downsample_ratio=float(data.get("downsample_ratio", 0.5)), ps_version="v2", select_layer=layer,
            img_context_token_id=int(data.get("image_token_id", -1)), template="chatml")
        return config, "hf"
    raise ConfigFileError(f"{where}: model_type '{model_type}' is neither 'internvl_chat' nor 'internvl'")
