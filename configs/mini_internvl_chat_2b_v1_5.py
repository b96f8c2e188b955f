"""Mini-InternVL-Chat-2B-V1-5: InternViT-300M-448px + InternLM2-Chat-1.8B (spec §1)."""
from internvl_jax.config import Config, LLMConfig, ModelConfig, RopeConfig, VisionConfig

VISION_300M = VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, patch_size=14,
                           image_size=448, norm_type="layer_norm", qkv_bias=True, qk_normalization=False,
                           layer_scale_init=1.0, drop_path_rate=0.1)


def get_config() -> Config:
    llm = LLMConfig(family="internlm2", vocab_size=92553, hidden_size=2048, num_layers=24, num_heads=16,
                    num_kv_heads=8, intermediate_size=8192, rms_norm_eps=1e-5, max_position_embeddings=32768,
                    rope=RopeConfig(theta=1e6, scaling="dynamic", factor=2.0))
    model = ModelConfig(vision=VISION_300M, llm=llm, template="internlm2-chat", img_context_token_id=92546,
                        dtype="bfloat16")
    return Config(name="mini_internvl_chat_2b_v1_5", model=model)
