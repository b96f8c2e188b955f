"""The pinned small config the CPU benchmarks compare on, and its transformers reference.

Shared by `generate.py` and `train_step.py` so both measure the same model against the same
reference. fp32 throughout, random weights: ViT 4 layers, width 256 (4 heads, MLP 1024), 224 px
tiles (64 image tokens each); an InternLM2-style decoder of 4 layers, width 512, 8 heads / 4 kv
heads, MLP 1536, vocab 8000. transformers has no InternLM2, so its side is
InternVLForConditionalGeneration with a Llama text model of the same dimensions (spec
toolchain §7); InternLM2's grouped `wqkv` and Llama's separate q/k/v do the same arithmetic.
"""
from __future__ import annotations

from internvl_jax.config import LLMConfig, ModelConfig, VisionConfig

IMAGE_TOKEN_ID = 7999
TILES = 2  # tiles per prompt / per training sample


def _model(vit_width: int, vit_layers: int, vit_heads: int, image_size: int, width: int, layers: int,
           heads: int, kv_heads: int) -> ModelConfig:
    """fp32 everywhere, vocab 8000; MLPs 4× (ViT) and 3× (LLM) their width."""
    vision = VisionConfig(hidden_size=vit_width, num_layers=vit_layers, num_heads=vit_heads,
                          intermediate_size=4 * vit_width, patch_size=14, image_size=image_size,
                          norm_type="layer_norm", qkv_bias=True)
    llm = LLMConfig(family="internlm2", vocab_size=8000, hidden_size=width, num_layers=layers, num_heads=heads,
                    num_kv_heads=kv_heads, intermediate_size=3 * width, max_position_embeddings=4096)
    return ModelConfig(vision=vision, llm=llm, img_context_token_id=IMAGE_TOKEN_ID, dtype="float32",
                       param_dtype="float32", frozen_param_dtype="float32")


def bench_config() -> ModelConfig:
    return _model(vit_width=256, vit_layers=4, vit_heads=4, image_size=224, width=512, layers=4, heads=8, kv_heads=4)


def quick_config() -> ModelConfig:
    """A much smaller model of the same family, for the suite's quick runs (seconds, not minutes)."""
    return _model(vit_width=64, vit_layers=2, vit_heads=2, image_size=112, width=128, layers=2, heads=4, kv_heads=2)


def reference_model(config: ModelConfig):
    """transformers' InternVL with a Llama text model of `config`'s dimensions (fp32, eval mode).

    Callers that train switch it to `.train()`; every dropout of the config is 0, so the two
    modes compute the same function.
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, LlamaConfig
    vision, llm = config.vision, config.llm
    hf = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=vision.hidden_size, num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
            intermediate_size=vision.intermediate_size, image_size=vision.image_size, patch_size=vision.patch_size,
            norm_type="layer_norm", attention_bias=True, use_qk_norm=False),
        text_config=LlamaConfig(
            vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
            num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
            max_position_embeddings=llm.max_position_embeddings, pad_token_id=0),
        image_token_id=config.img_context_token_id, image_seq_length=config.num_image_token,
        downsample_ratio=config.downsample_ratio, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False)
    return InternVLForConditionalGeneration(hf).eval()
