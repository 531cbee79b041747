"""ggml's k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K on 256-wide super-blocks (ggml-quants.c, ggml 0.25.3).

``quantize_*`` take x [B, 256] float32 super-blocks and ``qw`` (None, or the importance weights
[B, 256] taken from the imatrix) and return the block bytes [B, type_size] as int32 values 0..255.
Without ``qw`` they follow ``quantize_row_*_ref``, with it ``quantize_row_*_impl``: exactly the
paths ``ggml_quantize_chunk`` takes. ``dequantize_*`` invert the bytes in ggml's float order.
"""

from __future__ import annotations

import torch

from qtune.quant.ggml_search import (
    GROUP_MAX_EPS,
    div,
    fp16_bits,
    fp16_round,
    i8,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    seq_max_from_zero,
    seqsum,
    signed_absmax,
    sqrt,
    u8,
    u16_le,
)

QK_K = 256


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    bits = blocks[:, offset] | (blocks[:, offset + 1] << 8)
    return bits.to(torch.int16).view(torch.float16).to(torch.float32)


def _sub_blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    return x.reshape(-1, size)


def _imatrix_weights(x: torch.Tensor, qw: torch.Tensor, sigma_factor: float) -> torch.Tensor:
    """qw * sqrt(sigma2 + x^2) with sigma2 = factor*sum(x^2)/256 over the super-block."""
    sum_x2 = seqsum(x * x)
    sigma2 = div(sum_x2 * sigma_factor, float(QK_K))
    return qw * sqrt(sigma2.unsqueeze(-1) + x * x)


def _requantize(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """L = clamp(nearest_int((x + dm)/d)) per sub-block, keeping the old L where d == 0.

    x, L: [B, S, n]; d, dm: [B, S] (float32, already fp16-rounded super scale times the 6/4-bit scale).
    """
    num = x if dm is None else x + dm.unsqueeze(-1)
    new = nearest_int(div(num, d.unsqueeze(-1))).clamp(lo, hi)
    return torch.where((d != 0).unsqueeze(-1), new, L)


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """[B, 256] 2-bit quants -> qs [B, 64]: qs[32h + l] = L[128h+l] | L[+32]<<2 | L[+64]<<4 | L[+96]<<6."""
    q = L.view(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    q = qs.view(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], device=qs.device, dtype=torch.int32).view(1, 1, 4, 1)
    return (q & 3).reshape(-1, QK_K)


# ---------------------------------------------------------------- 6-bit scale/min packing (Q4_K, Q5_K)


def pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 scales + 8 mins ([B, 8] uint8 values) -> the 12 scale bytes of block_q4_K/q5_K."""
    lo = u8(ls[:, :4] | ((ls[:, 4:] >> 4) << 6))
    mid = u8(lm[:, :4] | ((lm[:, 4:] >> 4) << 6))
    hi = u8((ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4))
    return torch.cat([lo, mid, hi], dim=-1)


def unpack_scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7: [B, 12] -> (sc [B, 8], m [B, 8])."""
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=-1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=-1)
    return sc, m


# ---------------------------------------------------------------- Q3_K scale packing


def pack_scales_q3(l: torch.Tensor) -> torch.Tensor:
    """16 six-bit scales [B, 16] (0..63) -> 12 bytes."""
    low = u8((l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4))
    hi = (l >> 4).view(-1, 4, 4)  # [B, group j/4, j%4]
    high = u8(hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6))
    return torch.cat([low, high], dim=-1)


def unpack_scales_q3(s: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 signed scales (six-bit value minus 32), [B, 16]."""
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=-1)
    shifts = torch.tensor([0, 2, 4, 6], device=s.device, dtype=torch.int32).view(1, 4, 1)
    high = ((s[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(-1, 16)
    return i8(low | (high << 4)) - 32


# ---------------------------------------------------------------- Q2_K


def quantize_q2_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    nb = x.shape[0]
    xs = _sub_blocks(x, 16)
    if qw is None:
        scales, mins, L = make_qkx_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.view(nb, 16), mins.view(nb, 16)
        max_scale = seq_max_from_zero(scales)
        max_min = seq_max_from_zero(mins)
        has_scale = (max_scale > 0).unsqueeze(-1)
        has_min = (max_min > 0).unsqueeze(-1)
        ls = nearest_int(div(15.0, max_scale).unsqueeze(-1) * scales)
        lm = nearest_int(div(15.0, max_min).unsqueeze(-1) * mins)
        sc_bytes = torch.where(has_scale, u8(ls), 0)
        sc_bytes = torch.where(has_min, u8(sc_bytes | (lm << 4)), sc_bytes)
        d = torch.where(has_scale[:, 0], div(max_scale, 15.0), 0.0)
        dmin = torch.where(has_min[:, 0], div(max_min, 15.0), 0.0)
    else:
        weights = _imatrix_weights(x, qw, 1.0)
        ws = _sub_blocks(weights, 16)
        sw = seqsum(ws).view(nb, 16)
        scales, mins, L = make_qkx_quants(xs, ws, 3, -0.9, 0.05, 36, False)
        d, Ls = make_qp_quants(scales.view(nb, 16), 15, sw)
        dmin, Lm = make_qp_quants(mins.view(nb, 16), 15, sw)
        sc_bytes = u8(Ls | (Lm << 4))
    d_bits, dmin_bits = fp16_bits(d), fp16_bits(dmin)
    D = fp16_round(d).unsqueeze(-1) * (sc_bytes & 0xF).to(torch.float32)
    DM = fp16_round(dmin).unsqueeze(-1) * (sc_bytes >> 4).to(torch.float32)
    L = _requantize(x.view(nb, 16, 16), L.view(nb, 16, 16), D, DM, 0, 3).reshape(nb, QK_K)
    return torch.cat([sc_bytes, _pack_2bit(L), u16_le(d_bits), u16_le(dmin_bits)], dim=-1)


def dequantize_q2_k(b: torch.Tensor) -> torch.Tensor:
    sc = b[:, :16]
    q = _unpack_2bit(b[:, 16:80]).view(-1, 16, 16).to(torch.float32)
    d, dmin = _half(b, 80).unsqueeze(-1), _half(b, 82).unsqueeze(-1)
    dl = (d * (sc & 0xF).to(torch.float32)).unsqueeze(-1)
    ml = (dmin * (sc >> 4).to(torch.float32)).unsqueeze(-1)
    return (dl * q - ml).reshape(-1, QK_K)


# ---------------------------------------------------------------- Q3_K


def quantize_q3_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    nb = x.shape[0]
    xs = _sub_blocks(x, 16)
    if qw is None:
        scales, L = make_q3_quants(xs, 4)
        scales = scales.view(nb, 16)
        max_scale, _ = signed_absmax(scales)
        nonzero = max_scale != 0
        iscale = div(-32.0, max_scale)
        ls = i8(nearest_int(iscale.unsqueeze(-1) * scales)).clamp(-32, 31) + 32
        sc_bytes = torch.where(nonzero.unsqueeze(-1), pack_scales_q3(ls), 0)
        d = torch.where(nonzero, div(1.0, iscale), 0.0)
    else:
        weights = _imatrix_weights(x, qw, 2.0)
        ws = _sub_blocks(weights, 16)
        sw = seqsum(ws).view(nb, 16)
        scales, L = make_qx_quants(xs, 4, ws)
        d, Ls = make_qx_quants(scales.view(nb, 16), 32, sw)
        sc_bytes = pack_scales_q3(Ls)
    d_bits = fp16_bits(d)
    D = fp16_round(d).unsqueeze(-1) * unpack_scales_q3(sc_bytes).to(torch.float32)
    L = _requantize(x.view(nb, 16, 16), L.view(nb, 16, 16), D, None, -4, 3)
    L = L.reshape(nb, QK_K)
    L = torch.where(D.repeat_interleave(16, dim=-1) != 0, L + 4, L)
    high = (L > 3).to(torch.int32).view(nb, 8, 32)
    hmask = (high << torch.arange(8, device=x.device, dtype=torch.int32).view(1, 8, 1)).sum(1)  # exact ints
    L = torch.where(L > 3, L - 4, L)
    return torch.cat([hmask, _pack_2bit(L), sc_bytes, u16_le(d_bits)], dim=-1)


def dequantize_q3_k(b: torch.Tensor) -> torch.Tensor:
    hmask = b[:, :32]
    q = _unpack_2bit(b[:, 32:96])
    scales = unpack_scales_q3(b[:, 96:108]).to(torch.float32)
    d = _half(b, 108).unsqueeze(-1)
    hbit = (hmask.unsqueeze(1) >> torch.arange(8, device=b.device, dtype=torch.int32).view(1, 8, 1)) & 1
    q = (q - torch.where(hbit.reshape(-1, QK_K) != 0, 0, 4)).view(-1, 16, 16).to(torch.float32)
    dl = (d * scales).unsqueeze(-1)
    return (dl * q).reshape(-1, QK_K)


# ---------------------------------------------------------------- Q4_K / Q5_K


def _quantize_q45_k(x: torch.Tensor, qw: torch.Tensor | None, nmax: int) -> tuple[torch.Tensor, ...]:
    """Shared Q4_K/Q5_K search: returns (d, dmin, 12 scale bytes, L [B, 256] in 0..nmax)."""
    nb = x.shape[0]
    xs = _sub_blocks(x, 32)
    if qw is None:
        av_x = sqrt(div(seqsum(xs * xs), 32.0))
        weights = av_x.unsqueeze(-1) + xs.abs()
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, L = make_qkx_quants(xs, weights, nmax, rmin, 0.1, nstep, False)
        scales, mins = scales.view(nb, 8), mins.view(nb, 8)
        max_scale = seq_max_from_zero(scales)
        max_min = seq_max_from_zero(mins)
        inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), 0.0)
        inv_min = torch.where(max_min > 0, div(63.0, max_min), 0.0)
        ls = u8(nearest_int(inv_scale.unsqueeze(-1) * scales)).clamp(max=63)
        lm = u8(nearest_int(inv_min.unsqueeze(-1) * mins)).clamp(max=63)
        d, dmin = div(max_scale, 63.0), div(max_min, 63.0)
    else:
        weights = _sub_blocks(_imatrix_weights(x, qw, 2.0), 32)
        sw = seqsum(weights).view(nb, 8)
        scales, mins, L = make_qkx_quants(xs, weights, nmax, -0.9, 0.05, 36, False)
        d, ls = make_qp_quants(scales.view(nb, 8), 63, sw)
        dmin, lm = make_qp_quants(mins.view(nb, 8), 63, sw)
        if nmax == 31:
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    sc_bytes = pack_scale_min_k4(ls, lm)
    sc, m = unpack_scale_min_k4(sc_bytes)
    D = fp16_round(d).unsqueeze(-1) * sc.to(torch.float32)
    DM = fp16_round(dmin).unsqueeze(-1) * m.to(torch.float32)
    L = _requantize(x.view(nb, 8, 32), L.view(nb, 8, 32), D, DM, 0, nmax).reshape(nb, QK_K)
    return fp16_bits(d), fp16_bits(dmin), sc_bytes, L


def quantize_q4_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    d_bits, dmin_bits, sc_bytes, L = _quantize_q45_k(x, qw, 15)
    q = L.view(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([u16_le(d_bits), u16_le(dmin_bits), sc_bytes, qs], dim=-1)


def quantize_q5_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    d_bits, dmin_bits, sc_bytes, L = _quantize_q45_k(x, qw, 31)
    q = L.view(-1, 4, 2, 32)  # [B, chunk c, low/high half, 32]
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 8, 32)  # bit 4 of sub-block 2c + h goes to qh bit 2c + h
    qh = (high << torch.arange(8, device=x.device, dtype=torch.int32).view(1, 8, 1)).sum(1)
    return torch.cat([u16_le(d_bits), u16_le(dmin_bits), sc_bytes, qh, qs], dim=-1)


def dequantize_q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _half(b, 0).unsqueeze(-1), _half(b, 2).unsqueeze(-1)
    sc, m = unpack_scale_min_k4(b[:, 4:16])
    qs = b[:, 16:144].view(-1, 4, 1, 32) >> torch.tensor([0, 4], device=b.device, dtype=torch.int32).view(1, 1, 2, 1)
    q = (qs & 0xF).reshape(-1, 8, 32).to(torch.float32)
    return ((d * sc.to(torch.float32)).unsqueeze(-1) * q - (dmin * m.to(torch.float32)).unsqueeze(-1)).reshape(-1, QK_K)


def dequantize_q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _half(b, 0).unsqueeze(-1), _half(b, 2).unsqueeze(-1)
    sc, m = unpack_scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48]
    qs = b[:, 48:176].view(-1, 4, 1, 32) >> torch.tensor([0, 4], device=b.device, dtype=torch.int32).view(1, 1, 2, 1)
    high = (qh.unsqueeze(1) >> torch.arange(8, device=b.device, dtype=torch.int32).view(1, 8, 1)) & 1
    q = ((qs & 0xF).reshape(-1, 8, 32) | (high << 4)).to(torch.float32)
    return ((d * sc.to(torch.float32)).unsqueeze(-1) * q - (dmin * m.to(torch.float32)).unsqueeze(-1)).reshape(-1, QK_K)


# ---------------------------------------------------------------- Q6_K


def quantize_q6_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    nb = x.shape[0]
    scales, L = make_qx_quants(_sub_blocks(x, 16), 32, None if qw is None else _sub_blocks(qw, 16))
    scales = scales.view(nb, 16)
    max_scale, max_abs = signed_absmax(scales)
    iscale = div(-128.0, max_scale)
    d = div(1.0, iscale)
    sc = i8(nearest_int(iscale.unsqueeze(-1) * scales).clamp(max=127))
    D = fp16_round(d).unsqueeze(-1) * sc.to(torch.float32)
    L = _requantize(x.view(nb, 16, 16), L.view(nb, 16, 16), D, None, -32, 31)
    L = torch.where((D != 0).unsqueeze(-1), L + 32, L).reshape(nb, 2, 4, 32)  # [B, half, quarter, l]
    ql = torch.cat([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4), L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], dim=-1)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = torch.cat([ql.reshape(nb, 128), qh.reshape(nb, 64), u8(sc), u16_le(fp16_bits(d))], dim=-1)
    return torch.where((max_abs < GROUP_MAX_EPS).unsqueeze(-1), 0, out)


def dequantize_q6_k(b: torch.Tensor) -> torch.Tensor:
    ql = b[:, :128].view(-1, 2, 1, 64) >> torch.tensor([0, 4], device=b.device, dtype=torch.int32).view(1, 1, 2, 1)
    ql = (ql & 0xF).reshape(-1, 2, 4, 32)  # [B, half, (ql[l], ql[l+32], ql[l]>>4, ql[l+32]>>4), l]
    qh = b[:, 128:192].view(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.int32).view(1, 1, 4, 1)
    q = (ql | ((qh & 3) << 4)) - 32
    scales = i8(b[:, 192:208]).to(torch.float32)
    d = _half(b, 208).unsqueeze(-1)
    return ((d * scales).unsqueeze(-1) * q.reshape(-1, 16, 16).to(torch.float32)).reshape(-1, QK_K)
