"""Group-wise min-max grids and round-to-nearest quantization, shared by GPTQ and AWQ.

Two grid conventions exist in the wild and both are needed to write files that
their loaders read back exactly:

* "gptq" (IST-DASLab / GPTQModel): the group's min/max are widened to include 0;
  sym uses zero = (maxq + 1) / 2 and scale = 2 * max|w| / maxq.
* "awq" (AutoAWQ ``pseudo_quantize_tensor``): no widening to 0;
  scale = clamp(max - min, 1e-5) / maxq, zero = clamp(-round(min / scale), 0, maxq).

Scales are rounded to float16 as soon as they are chosen, because every checkpoint
stores them as float16: the fake-quantized weights we compute are then exactly
the weights a reader rebuilds from the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qtune.quant import DEFAULT_BITS, DEFAULT_GROUP_SIZE

SUPPORTED_BITS = (2, 3, 4, 8)
CONVENTIONS = ("gptq", "awq")
_FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal)


@dataclass
class QuantizedWeight:
    """Integer codes plus the grid that maps them back to real weights.

    qweight_int: [N, K] uint8 codes in [0, 2**bits - 1] (nn.Linear layout: N outputs, K inputs).
    scales, zeros: [G, N]; zeros are integer-valued (stored as int32).
    g_idx: [K] group of each input channel.
    """

    qweight_int: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int
    group_size: int
    sym: bool

    @property
    def shape(self) -> torch.Size:
        return self.qweight_int.shape

    def dequantize(self) -> Tensor:
        return dequantize_grouped(self.qweight_int, self.scales, self.zeros, self.g_idx)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A plain QuantizedWeight (subclass extras dropped) on ``device``."""
        return QuantizedWeight(
            qweight_int=self.qweight_int.to(device),
            scales=self.scales.to(device),
            zeros=self.zeros.to(device),
            g_idx=self.g_idx.to(device),
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
        )


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return (1 << bits) - 1


def check_group_size(group_size: int, in_features: int) -> int:
    """Return the effective group width (in_features for group_size == -1)."""
    if group_size == -1:
        return in_features
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    return group_size


def round_scale_to_fp16(scale: Tensor) -> Tensor:
    scale = scale.to(torch.float16).to(torch.float32)
    return torch.where(scale > 0, scale, torch.full_like(scale, _FP16_TINY))


def gptq_grid(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero per row of ``w`` [rows, cols] (GPTQ convention)."""
    maxq = check_bits(bits)
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0.0)
    xmax = torch.clamp(w.max(dim=1).values, min=0.0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    all_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(all_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(all_zero, torch.full_like(xmax, 1.0), xmax)
    scale = round_scale_to_fp16((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def awq_grid(w: Tensor, bits: int, sym: bool = False) -> tuple[Tensor, Tensor]:
    """Scale and zero per row of ``w`` [rows, cols] (AutoAWQ convention)."""
    maxq = check_bits(bits)
    w = w.float()
    if sym:
        half = 1 << (bits - 1)
        scale = round_scale_to_fp16(w.abs().amax(dim=1).clamp(min=1e-5) / (half - 1))
        return scale, torch.full_like(scale, half)
    wmin = w.min(dim=1).values
    wmax = w.max(dim=1).values
    scale = round_scale_to_fp16((wmax - wmin).clamp(min=1e-5) / maxq)
    zero = torch.clamp(-torch.round(wmin / scale), 0, maxq)
    return scale, zero


def grid_params(w: Tensor, bits: int, sym: bool, convention: str = "gptq") -> tuple[Tensor, Tensor]:
    if convention == "gptq":
        return gptq_grid(w, bits, sym)
    if convention == "awq":
        return awq_grid(w, bits, sym)
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def quantize_to_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Codes of ``w`` [rows, cols] on per-row grids ``scale``/``zero`` [rows] (or broadcastable)."""
    maxq = (1 << bits) - 1
    if scale.dim() == 1:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The one dequant formula used everywhere (writers, readers, quantizers): scale * (q - zero)."""
    if scale.dim() == 1:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return scale.float() * (codes.float() - zero.float())


def dequantize_grouped(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """[N, K] float32 weights from [N, K] codes and [G, N] grids indexed by g_idx [K]."""
    g = g_idx.long()
    return scales.float()[g].t() * (codes.float() - zeros.float()[g].t())


def default_g_idx(in_features: int, group_size: int) -> Tensor:
    width = check_group_size(group_size, in_features)
    return torch.arange(in_features, dtype=torch.int32) // width


def check_weight(weight: Tensor, name: str = "weight") -> None:
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"{name} has {bad} non-finite values (nan/inf); refusing to quantize")


def rtn_quantize(weight: Tensor, bits: int = DEFAULT_BITS, group_size: int = DEFAULT_GROUP_SIZE, sym: bool = True, convention: str = "gptq") -> QuantizedWeight:
    """Round-to-nearest, group by group along the input dimension (last group may be partial)."""
    check_weight(weight)
    check_bits(bits)
    n, k = weight.shape
    width = check_group_size(group_size, k)
    w = weight.float()
    codes = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    scales, zeros = [], []
    for start in range(0, k, width):
        block = w[:, start : start + width]
        scale, zero = grid_params(block, bits, sym, convention)
        codes[:, start : start + width] = quantize_to_codes(block, scale, zero, bits).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(
        qweight_int=codes,
        scales=torch.stack(scales),
        zeros=torch.stack(zeros).to(torch.int32),
        g_idx=default_g_idx(k, group_size).to(weight.device),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


def rtn_fake_quantize(weight: Tensor, bits: int = DEFAULT_BITS, group_size: int = DEFAULT_GROUP_SIZE, sym: bool = True, convention: str = "gptq") -> Tensor:
    return rtn_quantize(weight, bits, group_size, sym, convention).dequantize()
