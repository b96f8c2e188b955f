"""Mini-InternVL-Chat-4B-V1-5: InternViT-300M-448px + Phi-3-mini-128k-instruct (spec §1).

The LongRoPE ("su") short/long factors are per-checkpoint data: they are read from the
official config.json when the checkpoint is loaded (`internvl_jax.load_pretrained`). Sequences
up to the original 4096 positions use the short factors.
"""
from internvl_jax.config import Config, LLMConfig, ModelConfig, RopeConfig, load_config


def get_config() -> Config:
    vision = load_config("mini_internvl_chat_2b_v1_5").model.vision
    llm = LLMConfig(family="phi3", vocab_size=32020, hidden_size=3072, num_layers=32, num_heads=32,
                    num_kv_heads=32, intermediate_size=8192, rms_norm_eps=1e-5, max_position_embeddings=131072,
                    rope=RopeConfig(theta=1e4, scaling="su", original_max_position_embeddings=4096))
    model = ModelConfig(vision=vision, llm=llm, template="phi3-chat", img_context_token_id=32013, dtype="bfloat16")
    return Config(name="mini_internvl_chat_4b_v1_5", model=model)
