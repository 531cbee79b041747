"""ggml's 4-bit non-linear types IQ4_NL and IQ4_XS (ports of ggml-quants.c, ggml 0.25.3): the torch
encoders and the decoders.

Both code each value as one of the 16 levels of ``kvalues_iq4nl`` times a block scale. IQ4_NL: 32
values per block, an fp16 scale, 18 bytes. IQ4_XS: 256 values per super-block, an fp16 scale and a
6-bit scale per 32 values, 136 bytes. The encoder is ``quantize_row_iq4_nl_impl`` with 7 tries either
side of the first scale, which ``ggml_quantize_chunk`` runs with or without an importance matrix; the
float32 operations follow the C order (see ``ggml_search``).
"""

from __future__ import annotations

import torch

from qtune.quant.ggml_legacy import _half
from qtune.quant.ggml_search import GROUP_MAX_EPS, div, fp16_bits, nearest_int, seqsum, signed_absmax, sqrt, u8, u16_le
from qtune.quant.ggml_types import IQ4_NL_VALUES

NTRY = 7


def _levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=device)


def best_index(x: torch.Tensor) -> torch.Tensor:
    """best_index_int8(16, kvalues_iq4nl, x) per element: the nearest level, the upper one on a tie,
    the first below the lowest and the last above the highest (and for NaN, as the C search ends)."""
    levels = _levels(x.device)
    mu = torch.searchsorted(levels, x.contiguous(), right=True).clamp(1, 15)
    index = torch.where(x - levels[mu - 1] < levels[mu] - x, mu - 1, mu)
    index = torch.where(x <= levels[0], 0, index)
    return torch.where((x >= levels[15]) | x.isnan(), 15, index)


def _fit(x: torch.Tensor, weight: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(w*q*x) and sum(w*q*q) over each [.., 32] block for the codes chosen at scale 1/inv [.., 1]."""
    q = _levels(x.device)[best_index(inv * x)]
    return seqsum(weight * q * x), seqsum(weight * q * q)


def _block_scales(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """The scale search of quantize_row_iq4_nl_impl: x [B, nb, 32] -> the best scale of each block [B, nb]."""
    n = x.shape[1] * x.shape[2]
    sigma2 = seqsum(x.reshape(x.shape[0], n) * x.reshape(x.shape[0], n)) * (2.0 / n)
    weight = qw * sqrt(sigma2.view(-1, 1, 1) + x * x) if qw is not None else x * x
    mx, amax = signed_absmax(x)
    d = div(-mx, IQ4_NL_VALUES[0])
    sumqx, sumq2 = _fit(x, weight, div(1.0, d).unsqueeze(-1))
    d = torch.where(sumq2 > 0, div(sumqx, sumq2), 0.0)
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = _fit(x, weight, div(float(itry + IQ4_NL_VALUES[0]), mx).unsqueeze(-1))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, div(sumqx, sumq2), d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(amax < GROUP_MAX_EPS, 0.0, d)


def _pack(L: torch.Tensor) -> torch.Tensor:
    """[B, n] codes -> [B, n/2] bytes: per 32 values, q[j] = L[j] | L[j+16] << 4."""
    blocks = L.view(L.shape[0], -1, 32)
    return u8(blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(L.shape[0], -1)


def quantize_iq4_nl(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 32] float32 (and importance weights) -> [B, 18] IQ4_NL blocks."""
    d = _block_scales(x.view(-1, 1, 32), None if qw is None else qw.view(-1, 1, 32)).view(-1, 1)
    inv = torch.where(d != 0, div(1.0, d), 0.0)
    return torch.cat([u16_le(fp16_bits(d[:, 0])), _pack(best_index(inv * x))], dim=1)


def quantize_iq4_xs(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 256] float32 (and importance weights) -> [B, 136] IQ4_XS super-blocks."""
    xb = x.view(-1, 8, 32)
    scales = _block_scales(xb, None if qw is None else qw.view(-1, 8, 32))
    amax = torch.zeros_like(scales[:, 0])
    max_scale = torch.zeros_like(amax)
    for ib in range(8):  # the first of equal magnitudes wins, as in the C loop
        bigger = scales[:, ib].abs() > amax
        amax = torch.where(bigger, scales[:, ib].abs(), amax)
        max_scale = torch.where(bigger, scales[:, ib], max_scale)
    d = div(-max_scale, 32.0)
    inv = torch.where(d != 0, div(1.0, d), 0.0)
    l = nearest_int(inv.unsqueeze(1) * scales).clamp(-32, 31)
    dl = d.unsqueeze(1) * l.to(torch.float32)
    idl = torch.where(dl != 0, div(1.0, dl), 0.0)
    L = best_index(idl.unsqueeze(-1) * xb).reshape(-1, 256)
    l = l + 32
    scales_l = u8((l[:, 0::2] & 0xF) | ((l[:, 1::2] & 0xF) << 4))
    scales_h = ((l >> 4) << (2 * torch.arange(8, device=x.device, dtype=torch.int32))).sum(1)  # disjoint bits: exact
    return torch.cat([u16_le(fp16_bits(d)), u16_le(scales_h), scales_l, _pack(L)], dim=1)


def _levels_of(codes: torch.Tensor) -> torch.Tensor:
    return _levels(codes.device)[torch.cat([codes & 0x0F, codes >> 4], dim=-1).long()]


def dequantize_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    """[B, 18] int32 bytes -> [B, 32] float32."""
    return _half(b, 0) * _levels_of(b[:, 2:18])


def dequantize_iq4_xs(b: torch.Tensor) -> torch.Tensor:
    """[B, 136] int32 bytes -> [B, 256] float32."""
    scales_h = b[:, 2] | (b[:, 3] << 8)
    ib = torch.arange(8, device=b.device, dtype=torch.int32)
    low = (b[:, 4 + ib // 2] >> (4 * (ib % 2))) & 0xF
    scales = (low | (((scales_h.unsqueeze(1) >> (2 * ib)) & 3) << 4)) - 32
    dl = _half(b, 0) * scales.to(torch.float32)  # [B, 8]
    values = _levels_of(b[:, 8:136].reshape(-1, 8, 16))  # [B, 8, 32]
    return (dl.unsqueeze(-1) * values).reshape(-1, 256)
