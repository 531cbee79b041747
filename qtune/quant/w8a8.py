"""8-bit weights with dynamic per-token 8-bit activations (compressed-tensors' W8A8 and FP8 schemes):
per-output-channel weight grids, SmoothQuant's migration of activation outliers into the weights, and the
per-token activation rounding vLLM applies at run time, simulated so a report scores what the runtime runs.

INT8: w ≈ q * scale with q in [-128, 127] (GPTQ's symmetric 8-bit channel grid: its codes minus 128);
activations x ≈ round(x / s) * s with s = max|x| / 127 per token.
FP8 (E4M3, largest finite value 448): w ≈ fp8(w / scale) * scale with scale = max|w| / 448 per output;
activations the same per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qtune.quant import DEFAULT_DAMP
from qtune.quant.gptq import gptq_fixed_grid

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INT8_MAX = 127
ACTIVATION_TYPES = ("int8", "fp8")


@dataclass
class ChannelWeight:
    """8-bit weight values (int8 or float8_e4m3fn) [N, K] with one float32 scale per output [N]."""

    values: Tensor
    scales: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def dequantize(self) -> Tensor:
        return self.values.float() * self.scales.float().unsqueeze(1)

    def to(self, device: torch.device | str) -> ChannelWeight:
        return ChannelWeight(self.values.to(device), self.scales.to(device))


def _representable(scales: Tensor, scale_dtype: torch.dtype) -> Tensor:
    """``scales`` rounded to ``scale_dtype`` (the checkpoint stores them so), kept above its smallest normal."""
    return scales.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype).float()


def fp8_channel_scales(weight: Tensor, scale_dtype: torch.dtype = torch.float32) -> Tensor:
    """One scale per output of ``weight`` [N, K], max |w| / 448, rounded to ``scale_dtype`` (so the values
    rounded against it fit the stored scales)."""
    return _representable(weight.float().abs().amax(dim=1) / FP8_MAX, scale_dtype)


def round_to_fp8(x: Tensor) -> Tensor:
    """``x`` (already divided by its scale) to the nearest FP8 E4M3 value, saturating at ±448."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_quantize_channels(weight: Tensor, scale_dtype: torch.dtype = torch.float32) -> ChannelWeight:
    """Round ``weight`` [N, K] to nearest FP8 E4M3 with ``fp8_channel_scales``."""
    scales = fp8_channel_scales(weight, scale_dtype)
    return ChannelWeight(round_to_fp8(weight.float() / scales.unsqueeze(1)), scales)


def fp8_gptq_channels(weight: Tensor, hessian: Tensor, scale_dtype: torch.dtype = torch.float32, damp: float = DEFAULT_DAMP) -> tuple[ChannelWeight, float]:
    """FP8 E4M3 with ``fp8_channel_scales``, rounded by GPTQ's solve on the layer-input Hessian instead of to
    nearest; also returns GPTQ's loss."""
    scales = fp8_channel_scales(weight, scale_dtype).to(weight.device)
    rounded, loss = gptq_fixed_grid(weight, hessian, lambda column: round_to_fp8(column / scales).float() * scales, damp)
    return ChannelWeight(round_to_fp8(rounded / scales.unsqueeze(1)), scales), loss


def int8_channels(codes: Tensor, scales: Tensor, scale_dtype: torch.dtype = torch.float32, zero: int = 128) -> ChannelWeight:
    """A symmetric 8-bit channel grid's unsigned codes [N, K] and scales (any shape holding N values) as
    signed int8 values, the scales rounded to ``scale_dtype``."""
    values = (codes.to(torch.int16) - zero).to(torch.int8)
    return ChannelWeight(values, _representable(scales.float().reshape(-1), scale_dtype))


def quantize_tokens(x: Tensor, activation: str) -> Tensor:
    """``x`` [..., K] rounded per token (last dimension) to int8 or FP8 with a dynamic symmetric scale, and
    back, in float32: what a W8A8 runtime multiplies with the weights."""
    x = x.float()
    top = INT8_MAX if activation == "int8" else FP8_MAX
    scale = (x.abs().amax(dim=-1, keepdim=True) / top).clamp(min=torch.finfo(torch.float32).tiny)
    if activation == "int8":
        return torch.round(x / scale).clamp(-INT8_MAX - 1, INT8_MAX) * scale
    if activation == "fp8":
        return round_to_fp8(x / scale).float() * scale
    raise ValueError(f"activation type must be one of {ACTIVATION_TYPES}, got {activation!r}")


def smoothing_scales(activation_absmax: Tensor, weights: list[Tensor], strength: float) -> Tensor:
    """SmoothQuant's per-input-channel factors s (Xiao et al., 2023): the activations are divided by s and
    the weights' columns multiplied by it, s_j = max|X_j|^α / max|W_:,j|^(1-α), the weight maximum taken
    over every linear that reads the same input. Channels that never fire keep s = 1."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"SmoothQuant's strength must be in [0, 1], got {strength}")
    w_max = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    a_max = activation_absmax.float().to(w_max.device)
    scales = a_max.pow(strength) / w_max.clamp(min=1e-5).pow(1.0 - strength)
    live = (a_max > 0) & (w_max > 0)
    return torch.where(live, scales.clamp(min=1e-5), torch.ones_like(scales))
