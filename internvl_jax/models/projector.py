"""Pixel shuffle (v1/v2) and the `mlp1` projector, spec §3–§4."""
from __future__ import annotations

import jax
from flax import nnx

from internvl_jax.models.layers import Dense, LayerNorm, gelu


def pixel_shuffle(x: jax.Array, scale: float = 0.5, version: str = "v2") -> jax.Array:
    """[N, h, w, C] -> [N, h·w·scale², C/scale²].

    Output token (i, j) concatenates the 2×2 source patches (2i+a, 2j+b) in (a, b) order; v2
    orders tokens row-major (t = i·w' + j), v1 column-major (t = j·h' + i), as the official
    view/permute sequence does.
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"ps_version must be 'v1' or 'v2', got '{version}'")
    factor = round(1 / scale)
    n, h, w, c = x.shape
    x = x.reshape(n, h // factor, factor, w // factor, factor, c)  # (n, i, a, j, b, c)
    order = (0, 1, 3, 2, 4, 5) if version == "v2" else (0, 3, 1, 2, 4, 5)
    x = x.transpose(order)
    return x.reshape(n, (h // factor) * (w // factor), factor * factor * c)


class Projector(nnx.Module):
    """mlp1: LayerNorm(eps 1e-5) -> Linear -> exact GELU -> Linear."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.norm = LayerNorm(in_features, ("norm",), rngs=rngs, eps=1e-5)
        self.fc1 = Dense((in_features,), (out_features,), ("vit_embed",), ("mlp",), rngs=rngs)
        self.fc2 = Dense((out_features,), (out_features,), ("mlp",), ("embed",), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., 4C] -> [..., D]."""
        return self.fc2(gelu(self.fc1(self.norm(x))))
