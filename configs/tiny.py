"""Tiny InternVL for CPU tests and `make demo`: 300M-style ViT, InternLM2-style LLM.

56-px tiles of 7-px patches: an 8×8 patch grid, 16 tokens per tile after pixel shuffle. On the
demo's synthetic shapes a ViT trained from scratch learned more from these 147-value patches
than from the 588-value patches of 112-px tiles with 14-px patches (same grid, same cost to the LLM).
"""
from internvl_jax.config import Config, LLMConfig, MeshConfig, ModelConfig, RopeConfig, TrainConfig, VisionConfig


def get_config() -> Config:
    vision = VisionConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, patch_size=7,
                          image_size=56, norm_type="layer_norm", qkv_bias=True, qk_normalization=False)
    llm = LLMConfig(family="internlm2", vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, intermediate_size=256, max_position_embeddings=4096,
                    rope=RopeConfig(theta=1e6))
    model = ModelConfig(vision=vision, llm=llm, template="internlm2-chat", max_dynamic_patch=6)
    train = TrainConfig(stage="finetune", learning_rate=1e-3, weight_decay=0.01, warmup_steps=10,
                        global_batch_size=8, max_seq_length=512, group_by_length=False)
    return Config(name="tiny", model=model, mesh=MeshConfig(), train=train)
