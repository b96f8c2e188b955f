"""InternVL-Chat-V1-5 (26B): InternViT-6B-448px-V1-5 (45 layers) + InternLM2-Chat-20B (spec §1)."""
from internvl_jax.config import Config, LLMConfig, ModelConfig, RopeConfig, VisionConfig


def get_config() -> Config:
    vision = VisionConfig(hidden_size=3200, num_layers=45, num_heads=25, intermediate_size=12800, patch_size=14,
                          image_size=448, norm_type="rms_norm", qkv_bias=False, qk_normalization=True,
                          layer_scale_init=0.1, drop_path_rate=0.0)
    llm = LLMConfig(family="internlm2", vocab_size=92553, hidden_size=6144, num_layers=48, num_heads=48,
                    num_kv_heads=8, intermediate_size=16384, rms_norm_eps=1e-5, max_position_embeddings=32768,
                    rope=RopeConfig(theta=1e6, scaling="dynamic", factor=3.0))
    model = ModelConfig(vision=vision, llm=llm, template="internlm2-chat", img_context_token_id=92546,
                        dtype="bfloat16")
    return Config(name="internvl_chat_v1_5", model=model)
