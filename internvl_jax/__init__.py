"""internvl-jax: InternVL-1.5-class models in JAX/Flax NNX, weight-compatible with the official checkpoints."""


def __getattr__(name: str):
    # Lazy, so `import internvl_jax` (e.g. for its config) does not import jax and the model.
    if name == "load_pretrained":
        from internvl_jax.pretrained import load_pretrained
        return load_pretrained
    raise AttributeError(f"module 'internvl_jax' has no attribute '{name}'")
