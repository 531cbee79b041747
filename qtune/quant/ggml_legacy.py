"""ggml's 32-wide block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (ports of ggml-quants.c, ggml 0.25.3).

``quantize_*`` take x [B, 32] float32 blocks (and optional per-element importance weights of
the same shape, already combined with the row's sigma2 by the caller) and return the block bytes
[B, type_size] as int32 values 0..255. ``dequantize_*`` invert that, in ggml's float order.
"""

from __future__ import annotations

import torch

from qtune.quant.ggml_search import (
    div,
    fp16_bits,
    i8,
    make_qkx_quants,
    make_qx_quants,
    signed_absmax,
    u8,
    u16_le,
)

FLT_MAX = 3.4028234663852886e38


def _fp16_field(v: torch.Tensor) -> torch.Tensor:
    return u16_le(fp16_bits(v))


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """fp16 field at byte offset -> float32 [B, 1]."""
    bits = blocks[:, offset] | (blocks[:, offset + 1] << 8)
    return bits.to(torch.int16).view(torch.float16).to(torch.float32).unsqueeze(-1)


def _nibbles(L: torch.Tensor) -> torch.Tensor:
    """[B, 32] quants -> qs[j] = L[j] low nibble | L[j+16] high nibble."""
    return u8((L[:, :16] & 0x0F) | ((L[:, 16:] & 0x0F) << 4))


def _high_bits(L: torch.Tensor) -> torch.Tensor:
    """[B, 32] 5-bit quants -> qh as 4 little-endian bytes, bit j = bit 4 of L[j]."""
    bit = (L >> 4) & 1
    shifts = torch.arange(8, device=L.device, dtype=torch.int32)
    return (bit.view(-1, 4, 8) << shifts).sum(-1)  # integer sum: exact


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, device=qh.device, dtype=torch.int32)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _trunc_to_int8(v: torch.Tensor) -> torch.Tensor:
    """C's (int8_t)(float): truncate toward zero, keep the low byte."""
    return i8(v.trunc().to(torch.int32))


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero) on float32, as int32."""
    t = v.trunc()
    frac = v - t  # exact
    return (t + torch.where(frac.abs() >= 0.5, torch.sign(v), torch.zeros_like(v))).to(torch.int32)


# ---------------------------------------------------------------- reference paths (no imatrix)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    signed_max, _ = signed_absmax(x)
    d = div(signed_max, -8.0)
    inv = torch.where(d != 0, div(1.0, d), torch.zeros_like(d))
    q = _trunc_to_int8(x * inv.unsqueeze(-1) + 8.5).clamp(max=15)
    return torch.cat([_fp16_field(d), _nibbles(u8(q))], dim=-1)


def _min_max_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # C starts from FLT_MAX / -FLT_MAX with strict comparisons.
    lo = torch.full_like(x[:, 0], FLT_MAX)
    hi = torch.full_like(x[:, 0], -FLT_MAX)
    for i in range(x.shape[-1]):
        lo = torch.where(x[:, i] < lo, x[:, i], lo)
        hi = torch.where(x[:, i] > hi, x[:, i], hi)
    return lo, hi


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    lo, hi = _min_max_ref(x)
    d = div(hi - lo, 15.0)
    inv = torch.where(d != 0, div(1.0, d), torch.zeros_like(d))
    q = _trunc_to_int8((x - lo.unsqueeze(-1)) * inv.unsqueeze(-1) + 0.5).clamp(max=15)
    return torch.cat([_fp16_field(d), _fp16_field(lo), _nibbles(u8(q))], dim=-1)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    signed_max, _ = signed_absmax(x)
    d = div(signed_max, -16.0)
    inv = torch.where(d != 0, div(1.0, d), torch.zeros_like(d))
    q = u8(_trunc_to_int8(x * inv.unsqueeze(-1) + 16.5).clamp(max=31))
    return torch.cat([_fp16_field(d), _high_bits(q), _nibbles(q)], dim=-1)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    lo, hi = _min_max_ref(x)
    d = div(hi - lo, 31.0)
    inv = torch.where(d != 0, div(1.0, d), torch.zeros_like(d))
    q = u8(((x - lo.unsqueeze(-1)) * inv.unsqueeze(-1) + 0.5).trunc().to(torch.int32))
    return torch.cat([_fp16_field(d), _fp16_field(lo), _high_bits(q), _nibbles(q)], dim=-1)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    # amax = MAX(amax, fabsf(v)): unlike the strict updates elsewhere, a NaN is taken here
    amax = torch.zeros_like(x[:, 0])
    for i in range(x.shape[-1]):
        ax = x[:, i].abs()
        amax = torch.where(amax > ax, amax, ax)
    d = div(amax, 127.0)
    inv = torch.where(d != 0, div(1.0, d), torch.zeros_like(d))
    q = u8(_roundf(x * inv.unsqueeze(-1)))
    return torch.cat([_fp16_field(d), q], dim=-1)


# ---------------------------------------------------------------- imatrix paths (quantize_row_*_impl)


def quantize_q4_0_weighted(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    scale, L = make_qx_quants(x, 8, weights)
    return torch.cat([_fp16_field(scale), _nibbles(L)], dim=-1)


def quantize_q5_0_weighted(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    scale, L = make_qx_quants(x, 16, weights)
    return torch.cat([_fp16_field(scale), _high_bits(L), _nibbles(L)], dim=-1)


def quantize_q4_1_weighted(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    scale, the_min, L = make_qkx_quants(x, weights, 15, -0.9, 0.05, 36, False)
    return torch.cat([_fp16_field(scale), _fp16_field(-the_min), _nibbles(L)], dim=-1)


def quantize_q5_1_weighted(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    scale, the_min, L = make_qkx_quants(x, weights, 31, -0.9, 0.05, 36, False)
    return torch.cat([_fp16_field(scale), _fp16_field(-the_min), _high_bits(L), _nibbles(L)], dim=-1)


# ---------------------------------------------------------------- dequantization


def dequantize_q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _unpack_nibbles(b[:, 2:18]) - 8
    return q.to(torch.float32) * _half(b, 0)


def dequantize_q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _unpack_nibbles(b[:, 4:20])
    return q.to(torch.float32) * _half(b, 0) + _half(b, 2)


def dequantize_q5_0(b: torch.Tensor) -> torch.Tensor:
    q = (_unpack_nibbles(b[:, 6:22]) | (_unpack_high_bits(b[:, 2:6]) << 4)) - 16
    return q.to(torch.float32) * _half(b, 0)


def dequantize_q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _unpack_nibbles(b[:, 8:24]) | (_unpack_high_bits(b[:, 4:8]) << 4)
    return q.to(torch.float32) * _half(b, 0) + _half(b, 2)


def dequantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    return i8(b[:, 2:34]).to(torch.float32) * _half(b, 0)


__all__ = [
    "quantize_q4_0",
    "quantize_q4_1",
    "quantize_q5_0",
    "quantize_q5_1",
    "quantize_q8_0",
    "quantize_q4_0_weighted",
    "quantize_q4_1_weighted",
    "quantize_q5_0_weighted",
    "quantize_q5_1_weighted",
    "dequantize_q4_0",
    "dequantize_q4_1",
    "dequantize_q5_0",
    "dequantize_q5_1",
    "dequantize_q8_0",
]
