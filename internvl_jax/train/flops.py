"""Model FLOPs of a train step (for MFU): ViT + projector + LLM, by what each module must compute.

A module costs 1× its forward when every trainable parameter is downstream of it (no gradient
reaches it), 2× when it is frozen but gradients pass through it to earlier trainable modules'
inputs, or when only its LoRA adapters train (input gradients; adapter weight gradients are
negligible), and 3× when its own weights train (forward + input grad + weight grad).
Rematerialisation is not counted: MFU measures useful model work. Matmul FLOPs = 2 × MACs.
"""
from __future__ import annotations

import numpy as np

from internvl_jax.config import Config

MODULE_ORDER = ("vision_model", "mlp1", "language_model")  # the forward pass visits them in this order

# Dense bf16 peak FLOP/s per device, matched on `device.device_kind`.
PEAK_FLOPS = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("TPU v6", 918e12),
              ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12))


def pass_multipliers(config: Config) -> dict[str, int]:
    """Forward-pass multiples per module (1, 2 or 3) for the configured trainable groups."""
    lora = config.model.lora
    lora_groups = {"language_model"} if lora.rank else set()
    lora_groups |= {"vision_model"} if lora.vision_rank else set()
    trainable = set(config.train.trainable)
    multipliers, upstream_trains = {}, False
    for module in MODULE_ORDER:
        if module in trainable and module not in lora_groups:
            multipliers[module] = 3
        elif module in trainable or upstream_trains:
            multipliers[module] = 2
        else:
            multipliers[module] = 1
        upstream_trains |= module in trainable
    return multipliers


def vision_forward_flops(config: Config, tiles: int) -> float:
    v = config.model.vision
    tokens = v.grid_size ** 2 + 1
    depth = v.num_layers + 1 + config.model.select_layer if config.model.select_layer < 0 else config.model.select_layer
    per_layer = 2 * tokens * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    per_layer += 4 * tokens ** 2 * v.hidden_size
    embed = 2 * (tokens - 1) * 3 * v.patch_size ** 2 * v.hidden_size
    return float(tiles * (embed + depth * per_layer))


def projector_forward_flops(config: Config, tiles: int) -> float:
    m = config.model
    width_in = m.vision.hidden_size * round(1 / m.downsample_ratio) ** 2
    d = m.llm.hidden_size
    return float(tiles * m.num_image_token * 2 * (width_in * d + d * d))


def llm_forward_flops(config: Config, tokens: int, sum_squared_lengths: float) -> float:
    """Causal attention over packed segments: cost ∝ Σ over segments of length²."""
    c = config.model.llm
    hd = c.resolved_head_dim
    matmul = c.hidden_size * hd * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size
    per_layer = 2 * tokens * matmul + 2 * sum_squared_lengths * c.num_heads * hd  # QK and AV, half the square
    return float(c.num_layers * per_layer + 2 * tokens * c.hidden_size * c.padded_vocab_size)


def step_flops(config: Config, segment_ids: np.ndarray, image_flags: np.ndarray) -> float:
    """Model FLOPs of one step on a (global) batch: segment_ids [..., B, T], image_flags [..., N]."""
    seg = segment_ids.reshape(-1, segment_ids.shape[-1])
    ids = np.arange(1, max(int(seg.max()), 0) + 1)
    lengths = (seg[:, :, None] == ids).sum(axis=1) if ids.size else np.zeros((1, 1))
    tiles = int((image_flags > 0).sum())
    forward = {"vision_model": vision_forward_flops(config, tiles),
               "mlp1": projector_forward_flops(config, tiles),
               "language_model": llm_forward_flops(config, int((seg > 0).sum()), float((lengths ** 2).sum()))}
    multipliers = pass_multipliers(config)
    return sum(multipliers[m] * forward[m] for m in MODULE_ORDER)


def peak_flops_per_device(device_kind: str, configured_tflops: float = 0.0) -> float | None:
    """Configured peak (TFLOP/s) if set, else the table's value for this device kind, else None."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    return next((peak for name, peak in PEAK_FLOPS if name.lower() in device_kind.lower()), None)
