"""internvl_chat_v1_5 finetune 2nd recipe (official shell/internvl1.5 hyper-parameters, spec §10)."""
from internvl_jax.config import Config, load_config
from internvl_jax.recipes import recipe


def get_config() -> Config:
    return recipe(load_config("internvl_chat_v1_5"), "internvl_chat_v1_5", "finetune_2nd")
