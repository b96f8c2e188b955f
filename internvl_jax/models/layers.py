"""Building blocks: parameters with logical axes, Dense (+ LoRA), RMSNorm, LayerNorm, DropPath.

Every module takes `stack`: leading dimensions (the layer axis of scanned blocks) that its
parameters carry with the logical name `layers`. Module code itself always sees one layer.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


class LoRAParam(nnx.Param):
    """A LoRA adapter weight (a Param subtype, so filters can pick adapters alone)."""


def make_param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
               stack: tuple[int, ...] = (), dtype=jnp.float32, unpadded_shape=None,
               kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
    """A parameter of shape `stack + shape` whose metadata names its logical axes.

    `unpadded_shape` (the logical shape, without stack) is set when the stored array is padded
    so a mesh axis divides it; checkpoints, exports and parameter counts use the logical shape.
    """
    full_shape = tuple(stack) + tuple(shape)
    metadata = {"axes": ("layers",) * len(stack) + tuple(axes)}
    if unpadded_shape is not None and tuple(unpadded_shape) != tuple(shape):
        metadata["unpadded_shape"] = tuple(stack) + tuple(unpadded_shape)
    return kind(init(rngs.params(), full_shape, dtype), **metadata)


def normal(std: float) -> Initializer:
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def constant(value: float) -> Initializer:
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)


zeros = constant(0.0)
ones = constant(1.0)


def _contract(x: jax.Array, kernel: jax.Array, num_in: int) -> jax.Array:
    """Contracts the last `num_in` axes of x with the first `num_in` axes of kernel.

    The leading (token) axes of x are merged into one first: the kernel gradient then contracts
    a single axis that is major in both operands, which XLA:CPU runs as one matmul on the arrays
    as they are; with [B, T] kept apart it first writes a transposed copy of the output gradient
    (≈15% of a CPU train step). The merge is a bitcast, and B stays the major (sharded) factor.
    """
    lead, in_shape, out_shape = x.shape[:x.ndim - num_in], x.shape[x.ndim - num_in:], kernel.shape[num_in:]
    flat = x.reshape((-1,) + in_shape)
    if _unsharded_cpu():
        y = _cpu_matmul(flat.reshape(flat.shape[0], -1), kernel.reshape(math.prod(in_shape), -1))
        return y.reshape(lead + out_shape)
    y = jax.lax.dot_general(flat, kernel, ((tuple(range(1, num_in + 1)), tuple(range(num_in))), ((), ())))
    return y.reshape(lead + out_shape)


def _unsharded_cpu() -> bool:
    """Tracing for one CPU device (no mesh, or a mesh of size 1)."""
    if jax.default_backend() != "cpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or math.prod(mesh.axis_sizes) == 1


@jax.custom_vjp
def _cpu_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] · w [K, N], with a kernel gradient laid out for XLA:CPU's matmul.

    Multi-axis kernels arrive flattened to 2-D (a bitcast), so their gradients need no transposed
    copies either. Only used unsharded on CPU, where the layouts below are measured; other
    backends take transposed operands natively.
    """
    return x @ w


def _cpu_matmul_fwd(x, w):
    return x @ w, (x, w)


def _cpu_matmul_bwd(residuals, dy):
    x, w = residuals
    # xᵀ·dy with xᵀ written out first runs ≈1.4× faster on XLA:CPU than with the transpose
    # folded into the dot (which takes a slower, non-YNN matmul); the barrier keeps it written out.
    return dy @ w.T, jax.lax.optimization_barrier(x.T) @ dy


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


class Dense(nnx.Module):
    """y = x·W + b over multi-dimensional feature shapes, with an optional LoRA branch.

    kernel [*in_shape, *out_shape]; LoRA: a [*in_shape, r], b [r, *out_shape] (b starts at
    zero), y += (alpha / r) · dropout(x)·a·b.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], in_axes: Sequence[str | None],
                 out_axes: Sequence[str | None], *, rngs: nnx.Rngs, use_bias: bool = True,
                 stack: tuple[int, ...] = (), init_std: float = 0.02, lora_rank: int = 0,
                 lora_alpha: float = 0.0, lora_dropout: float = 0.0, unpadded_out_shape=None,
                 unpadded_in_shape=None):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        unpadded_kernel = None
        if unpadded_in_shape is not None or unpadded_out_shape is not None:
            unpadded_kernel = (tuple(unpadded_in_shape or in_shape) + tuple(unpadded_out_shape or out_shape))
        self.kernel = make_param(rngs, normal(init_std), self.in_shape + self.out_shape,
                                 tuple(in_axes) + tuple(out_axes), stack, unpadded_shape=unpadded_kernel)
        self.bias = (make_param(rngs, zeros, self.out_shape, out_axes, stack,
                                unpadded_shape=unpadded_out_shape) if use_bias else None)
        self.lora_rank = lora_rank
        if lora_rank:
            self.lora_scale = lora_alpha / lora_rank
            self.lora_dropout = lora_dropout
            fan_in = math.prod(self.in_shape)
            self.lora_a = make_param(rngs, normal(1.0 / math.sqrt(fan_in)), self.in_shape + (lora_rank,),
                                     tuple(in_axes) + ("lora_rank",), stack, kind=LoRAParam)
            self.lora_b = make_param(rngs, zeros, (lora_rank,) + self.out_shape,
                                     ("lora_rank",) + tuple(out_axes), stack, kind=LoRAParam)

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """x [..., *in_shape] -> [..., *out_shape] in x's dtype."""
        num_in = len(self.in_shape)
        y = _contract(x, self.kernel[...].astype(x.dtype), num_in)
        if self.lora_rank:
            h = x
            if dropout_key is not None and self.lora_dropout > 0:
                keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, x.shape)
                h = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(x.dtype)
            h = _contract(h, self.lora_a[...].astype(x.dtype), num_in)
            y = y + self.lora_scale * _contract(h, self.lora_b[...].astype(x.dtype), 1)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y

    def merged_kernel(self) -> jax.Array:
        """The kernel with the LoRA update folded in (the kernel itself when LoRA is off)."""
        kernel = self.kernel[...]
        if not self.lora_rank:
            return kernel
        lead = kernel.shape[:kernel.ndim - len(self.in_shape) - len(self.out_shape)]
        a = self.lora_a[...].astype(jnp.float32).reshape(lead + (math.prod(self.in_shape), self.lora_rank))
        b = self.lora_b[...].astype(jnp.float32).reshape(lead + (self.lora_rank, math.prod(self.out_shape)))
        delta = jnp.matmul(a, b).reshape(kernel.shape)
        return (kernel.astype(jnp.float32) + self.lora_scale * delta).astype(kernel.dtype)


class RMSNorm(nnx.Module):
    """y = scale ⊙ cast(x · rsqrt(mean(x²) + eps)); statistics in float32 (reference order).

    `features` may be multi-dimensional (ViT q/k-norm over all heads); `real_size` is the
    number of real channels when padded heads add zero channels to the mean.
    """

    def __init__(self, features: Sequence[int], axes: Sequence[str | None], *, rngs: nnx.Rngs,
                 eps: float, stack: tuple[int, ...] = (), real_size: int | None = None,
                 unpadded_shape=None):
        self.features = tuple(features)
        self.eps = eps
        self.real_size = real_size or math.prod(self.features)
        self.scale = make_param(rngs, ones, self.features, axes, stack, unpadded_shape=unpadded_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        reduce_axes = tuple(range(x.ndim - len(self.features), x.ndim))
        x32 = x.astype(jnp.float32)
        mean_square = jnp.sum(x32 * x32, axis=reduce_axes, keepdims=True) / self.real_size
        y = (x32 * jax.lax.rsqrt(mean_square + self.eps)).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * y


class LayerNorm(nnx.Module):
    """PyTorch LayerNorm (biased variance, eps inside the sqrt), computed in float32."""

    def __init__(self, features: int, axes: Sequence[str | None], *, rngs: nnx.Rngs, eps: float,
                 stack: tuple[int, ...] = ()):
        self.eps = eps
        self.scale = make_param(rngs, ones, (features,), axes, stack)
        self.bias = make_param(rngs, zeros, (features,), axes, stack)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def drop_path(x: jax.Array, rate: jax.Array | float, key: jax.Array | None) -> jax.Array:
    """Stochastic depth per sample (axis 0), rescaled by 1/(1-rate); identity without a key."""
    if key is None:
        return x
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / keep_prob, 0).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as PyTorch's nn.GELU() default."""
    return jax.nn.gelu(x, approximate=False)
