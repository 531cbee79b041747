"""Compiled CPU encoders for ggml's block types: scalar ports of ggml-quants.c (ggml 0.25.3), run by numba.

The torch encoders (``ggml_legacy``, ``ggml_kquants``) work on every device but pay per-operation
overhead and memory traffic to keep the C float32 order in vectorized form. On the CPU these ports
run the C loops themselves, compiled to machine code and parallel over rows, so they are as fast as
ggml's own reference code and give the same bytes. The float32 order is the C expression order:

* every constant and every int used in float arithmetic is a float32 (numba would widen to float64);
* ``error_model="numpy"`` gives IEEE results for division by zero instead of an exception;
* bit patterns are read with a bitcast, so ``nearest_int`` and the fp16 conversion are ggml's own;
* C's float-to-int conversions (``(int8_t)v``, ``(uint8_t)v``) go through ``_trunc_i32``, which gives
  x86's result (INT32_MIN) for NaN and out-of-range values, as the compiled ggml does.

``quantize_rows`` is the entry point; the compiled code is cached on disk by numba after the first
call of each type.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

import numba
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

Q = GGMLQuantizationType
QK_K = 256

F = np.float32
F0, F1, HALF = F(0.0), F(1.0), F(0.5)
MAGIC = F(12582912.0)
GROUP_MAX_EPS = F(1e-15)
FLT_MAX = F(3.4028234663852886e38)
SCALE_TO_INF = F(2.0**112)
SCALE_TO_ZERO = F(2.0**-110)
TWO_POW_M24 = F(2.0**-24)

_jit = numba.njit(cache=True, error_model="numpy", nogil=True)


@intrinsic
def _f32_bits(typingctx, v):
    """float32 -> its bit pattern as a non-negative int64 (the C uint32_t)."""
    if v != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.int64(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, v):
    """The low 32 bits of an int64 read as a float32."""
    if v != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return types.float32(types.int64), codegen


@_jit
def nearest_int(v):
    return (_f32_bits(v + MAGIC) & 0x007FFFFF) - 0x00400000


@_jit
def fp16_bits(f):
    """ggml_compute_fp32_to_fp16."""
    base = (abs(f) * SCALE_TO_INF) * SCALE_TO_ZERO
    w = _f32_bits(f)
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = _bits_f32((bias >> 1) + 0x07800000) + base
    bits = _f32_bits(base)
    nonsign = ((bits >> 13) & 0x7C00) + (bits & 0x0FFF)
    return ((sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)) & 0xFFFF


@_jit
def fp16_value(h):
    """GGML_FP16_TO_FP32 of the bits ``h`` (exact)."""
    sign = (h >> 15) << 31
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0:
        v = F(mantissa) * TWO_POW_M24
        return -v if sign else v
    if exponent == 31:
        return _bits_f32(sign | 0x7F800000 | (mantissa << 13))
    return _bits_f32(sign | ((exponent + 112) << 23) | (mantissa << 13))


@_jit
def fp16_round(f):
    return fp16_value(fp16_bits(f))


@_jit
def _put_fp16(out, offset, f):
    bits = fp16_bits(f)
    out[offset] = bits & 0xFF
    out[offset + 1] = bits >> 8


@_jit
def _trunc_i32(v):
    if not (v > F(-2147483904.0) and v < F(2147483648.0)):  # NaN too
        return -2147483648
    return int(v)


@_jit
def _i8(v):
    return ((v & 0xFF) ^ 0x80) - 0x80


@_jit
def _roundf(v):
    t = np.trunc(v)
    if abs(v - t) >= HALF:
        t = t + (F1 if v > F0 else -F1)
    return t


# ------------------------------------------------------------ scale searches (ggml-quants.c)

@_jit
def _signed_absmax(x):
    """(the x[i] of largest |x[i]|, the first of equals; that |x[i]|), both 0 when all are 0."""
    mx = F0
    amax = F0
    for i in range(x.shape[0]):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    return mx, amax


@_jit
def make_qx_quants(x, nmax, L, qw, use_qw):
    """rmse_type=1: weights qw, or x**2. L (int32) gets 0..2*nmax-1."""
    n = x.shape[0]
    mx, amax = _signed_absmax(x)
    if amax < GROUP_MAX_EPS:
        L[:] = 0
        return F0
    fnmax = F(nmax)
    iscale = -fnmax / mx
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l + nmax
        w = qw[i] if use_qw else x[i] * x[i]
        fl = F(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != F0 else F0
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fnmax + F(0.1) * F(step)) / mx
        sumlx = F0
        suml2 = F0
        for i in range(n):
            fl = F(max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))))
            w = qw[i] if use_qw else x[i] * x[i]
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > F0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@_jit
def make_q3_quants(x, nmax, L):
    """do_rmse=true. L (int32) gets 0..2*nmax-1."""
    n = x.shape[0]
    mx, amax = _signed_absmax(x)
    if amax < GROUP_MAX_EPS:
        L[:] = 0
        return F0
    iscale = -F(nmax) / mx
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l
        w = x[i] * x[i]
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = x[i] * x[i]
            li = F(L[i])
            slx = sumlx - w * x[i] * li
            if slx > F0:
                sl2 = suml2 - w * li * li
                new_l = max(-nmax, min(nmax - 1, nearest_int(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    fn = F(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if sl2 > F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > F0 else F0


@_jit
def make_qkx_quants(x, weights, nmax, L, Laux, x_shifted, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants / make_qkx3_quants with weights. Returns (scale, the_min); L gets 0..nmax."""
    n = x.shape[0]
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > F0:
        mn = F0
    if mx <= mn:
        for i in range(n):
            L[i] = 0
        return F0, -mn
    fnmax = F(nmax)
    iscale = fnmax / (mx - mn)
    scale = F1 / iscale
    best = F0
    for i in range(n):
        L[i] = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
        diff = scale * F(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best += weights[i] * diff
    for i in range(n):
        x_shifted[i] = x[i] - mn  # recomputed whenever a step moves mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F(step) + fnmax) / (mx - mn)
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            l = max(0, min(nmax, nearest_int(iscale * x_shifted[i])))
            Laux[i] = l
            w = weights[i]
            fl = F(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F0:
                this_min = F0
                this_scale = sum_xl / sum_l2
            cur = F0
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur += weights[i] * diff
            if cur < best:
                for i in range(n):
                    L[i] = Laux[i]
                best = cur
                scale = this_scale
                mn = this_min
                for i in range(n):
                    x_shifted[i] = x[i] - mn
    return scale, -mn


@_jit
def make_qp_quants(x, nmax, L, qw):
    """Non-negative values on a 0..nmax grid; L holds the C uint8_t values."""
    n = x.shape[0]
    mx = F0
    for i in range(n):
        mx = mx if mx > x[i] else x[i]  # MAX(max, x[i])
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    fnmax = F(nmax)
    iscale = fnmax / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = F1 / iscale
    best = F0
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F(0.1) * F(step) + fnmax) / mx
        scale_is = F1 / iscale_is
        mse = F0
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F(l)
            mse += qw[i] * diff * diff
        if mse < best:
            best = mse
            iscale = iscale_is
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        w = qw[i]
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = qw[i]
            li = F(L[i])
            slx = sumlx - w * x[i] * li
            sl2 = suml2 - w * li * li
            if slx > F0 and sl2 > F0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fn = F(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > F0 else F0


# ------------------------------------------------------------ shared k-quant pieces

@_jit
def _pack_2bit(L, qs):
    for j in range(0, QK_K, 128):
        for l in range(32):
            qs[j // 4 + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)


@_jit
def _pack_scale_min_k4(Ls, Lm, scales):
    for j in range(8):
        ls = Ls[j]
        lm = Lm[j]
        if j < 4:
            scales[j] = ls
            scales[j + 4] = lm
        else:
            scales[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            scales[j - 4] = (scales[j - 4] | ((ls >> 4) << 6)) & 0xFF
            scales[j] = (scales[j] | ((lm >> 4) << 6)) & 0xFF


@_jit
def _scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


@_jit
def _sum_x2(x):
    s = F0
    for i in range(x.shape[0]):
        s += x[i] * x[i]
    return s


@_jit
def _q3_scale(scales, j):
    sc = np.int64(scales[j]) & 0xF if j < 8 else np.int64(scales[j - 8]) >> 4
    return _i8(sc | (((np.int64(scales[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@_jit
def _q3_pack_scale(scales, j, l):
    if j < 8:
        scales[j] = l & 0xF
    else:
        scales[j - 8] |= (l & 0xF) << 4
    scales[j % 4 + 8] |= (np.int64(l) >> 4) << (2 * (j // 4))


@_jit
def _q3_finish(x, L, y):
    """Requantize with the stored scales, then write hmask and qs (block_q3_K: hmask, qs, scales, d)."""
    d_all = fp16_value(y[108] | (y[109] << 8))
    scales = y[96:108]
    for j in range(16):
        d = d_all * F(_q3_scale(scales, j))
        if d == F0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-4, min(3, nearest_int(x[16 * j + ii] / d))) + 4
    for m in range(32):
        y[m] = 0
    m = 0
    hm = 1
    for j in range(QK_K):
        if L[j] > 3:
            y[m] |= hm
            L[j] -= 4
        m += 1
        if m == 32:
            m = 0
            hm <<= 1
    _pack_2bit(L, y[32:96])


@_jit
def _q2_finish(x, L, y):
    """block_q2_K: scales[16], qs[64], d, dmin; the scales and the two fp16 fields are written."""
    dm = fp16_value(y[80] | (y[81] << 8))
    mm = fp16_value(y[82] | (y[83] << 8))
    for j in range(16):
        d = dm * F(y[j] & 0xF)
        if d == F0:
            continue
        m = mm * F(y[j] >> 4)
        for ii in range(16):
            L[16 * j + ii] = max(0, min(3, nearest_int((x[16 * j + ii] + m) / d)))
    _pack_2bit(L, y[16:80])


@_jit
def _q45_requantize(x, L, y, nmax):
    d_all = fp16_value(y[0] | (y[1] << 8))
    m_all = fp16_value(y[2] | (y[3] << 8))
    scales = y[4:16]
    for j in range(8):
        sc, m = _scale_min_k4(j, scales)
        d = d_all * F(sc)
        if d == F0:
            continue
        dm = m_all * F(m)
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, nearest_int((x[32 * j + ii] + dm) / d)))


@_jit
def _q4_k_pack(L, y):
    q = 16
    for j in range(0, QK_K, 64):
        for l in range(32):
            y[q + l] = L[j + l] | (L[j + l + 32] << 4)
        q += 32


@_jit
def _q5_k_pack(L, y):
    for j in range(32):
        y[16 + j] = 0
    m1 = 1
    m2 = 2
    ql = 48
    for n in range(0, QK_K, 64):
        for j in range(32):
            l1 = L[n + j]
            if l1 > 15:
                l1 -= 16
                y[16 + j] |= m1
            l2 = L[n + j + 32]
            if l2 > 15:
                l2 -= 16
                y[16 + j] |= m2
            y[ql + j] = l1 | (l2 << 4)
        m1 <<= 2
        m2 <<= 2
        ql += 32


@_jit
def _q45_finish(x, L, y, nmax):
    _q45_requantize(x, L, y, nmax)
    if nmax == 15:
        _q4_k_pack(L, y)
    else:
        _q5_k_pack(L, y)


@_jit
def _importance_weights(x, qw, sigma2, weights):
    """weights = qw * sqrt(sigma2 + x**2) (quantize_row_*_impl); returns their sum."""
    total = F0
    for l in range(x.shape[0]):
        weights[l] = qw[l] * np.sqrt(sigma2 + x[l] * x[l])
    for l in range(x.shape[0]):
        total += weights[l]
    return total


# ------------------------------------------------------------ block encoders: x [256] -> y [type_size]

@_jit
def _q2_k_ref(x, qw, y, s):
    L, Laux, weights, scales, mins = s.L, s.Laux, s.weights, s.scales, s.mins
    max_scale = F0
    max_min = F0
    for j in range(16):
        xj = x[16 * j : 16 * j + 16]
        for l in range(16):
            weights[l] = abs(xj[l])
        scales[j], mins[j] = make_qkx_quants(
            xj, weights[:16], 3, L[16 * j : 16 * j + 16], Laux, s.x_shifted, F(-0.5), F(0.1), 15, True
        )
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    if max_scale > F0:
        iscale = F(15.0) / max_scale
        for j in range(16):
            y[j] = nearest_int(iscale * scales[j]) & 0xFF
        _put_fp16(y, 80, max_scale / F(15.0))
    else:
        for j in range(16):
            y[j] = 0
        _put_fp16(y, 80, F0)
    if max_min > F0:
        iscale = F(15.0) / max_min
        for j in range(16):
            y[j] |= (nearest_int(iscale * mins[j]) << 4) & 0xFF
        _put_fp16(y, 82, max_min / F(15.0))
    else:
        _put_fp16(y, 82, F0)
    _q2_finish(x, L, y)


@_jit
def _q2_k_impl(x, qw, y, s):
    L, Laux, weights, scales, mins, sw, Ls, Lm = s.L, s.Laux, s.weights, s.scales, s.mins, s.sw, s.Ls, s.Lm
    sigma2 = _sum_x2(x) / F(QK_K)
    for j in range(16):
        xj = x[16 * j : 16 * j + 16]
        sw[j] = _importance_weights(xj, qw[16 * j : 16 * j + 16], sigma2, weights)
        scales[j], mins[j] = make_qkx_quants(
            xj, weights[:16], 3, L[16 * j : 16 * j + 16], Laux, s.x_shifted, F(-0.9), F(0.05), 36, False
        )
    dm = make_qp_quants(scales[:16], 15, Ls, sw[:16])
    mm = make_qp_quants(mins[:16], 15, Lm, sw[:16])
    _put_fp16(y, 80, dm)
    _put_fp16(y, 82, mm)
    for j in range(16):
        y[j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
    _q2_finish(x, L, y)


@_jit
def _q3_k_ref(x, qw, y, s):
    L, scales = s.L, s.scales
    max_scale = F0
    amax = F0
    for j in range(16):
        scales[j] = make_q3_quants(x[16 * j : 16 * j + 16], 4, L[16 * j : 16 * j + 16])
        if abs(scales[j]) > amax:
            amax = abs(scales[j])
            max_scale = scales[j]
    for j in range(96, 108):
        y[j] = 0
    if max_scale != F0:
        iscale = F(-32.0) / max_scale
        for j in range(16):
            l = max(-32, min(31, _i8(nearest_int(iscale * scales[j])))) + 32
            _q3_pack_scale(y[96:108], j, l)
        _put_fp16(y, 108, F1 / iscale)
    else:
        _put_fp16(y, 108, F0)
    _q3_finish(x, L, y)


@_jit
def _q3_k_impl(x, qw, y, s):
    L, weights, scales, sw, Ls = s.L, s.weights, s.scales, s.sw, s.Ls
    sigma2 = F(2.0) * _sum_x2(x) / F(QK_K)
    for j in range(16):
        xj = x[16 * j : 16 * j + 16]
        sw[j] = _importance_weights(xj, qw[16 * j : 16 * j + 16], sigma2, weights)
        scales[j] = make_qx_quants(xj, 4, L[16 * j : 16 * j + 16], weights[:16], True)
    for j in range(96, 108):
        y[j] = 0
    d_block = make_qx_quants(scales[:16], 32, Ls, sw[:16], True)
    for j in range(16):
        _q3_pack_scale(y[96:108], j, Ls[j])
    _put_fp16(y, 108, d_block)
    _q3_finish(x, L, y)


@_jit
def _q45_k_ref(x, qw, y, s, nmax, rmin, nstep):
    L, Laux, weights, scales, mins, Ls, Lm = s.L, s.Laux, s.weights, s.scales, s.mins, s.Ls, s.Lm
    max_scale = F0
    max_min = F0
    for j in range(8):
        xj = x[32 * j : 32 * j + 32]
        av_x = np.sqrt(_sum_x2(xj) / F(32.0))
        for l in range(32):
            weights[l] = av_x + abs(xj[l])
        scales[j], mins[j] = make_qkx_quants(
            xj, weights, nmax, L[32 * j : 32 * j + 32], Laux, s.x_shifted, rmin, F(0.1), nstep, False
        )
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = F(63.0) / max_scale if max_scale > F0 else F0
    inv_min = F(63.0) / max_min if max_min > F0 else F0
    for j in range(8):
        Ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        Lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
    _pack_scale_min_k4(Ls, Lm, y[4:16])
    _put_fp16(y, 0, max_scale / F(63.0))
    _put_fp16(y, 2, max_min / F(63.0))
    _q45_finish(x, L, y, nmax)


@_jit
def _q45_k_impl(x, qw, y, s, nmax):
    L, Laux, weights, scales, mins, sw, Ls, Lm = s.L, s.Laux, s.weights, s.scales, s.mins, s.sw, s.Ls, s.Lm
    sigma2 = F(2.0) * _sum_x2(x) / F(QK_K)
    for j in range(8):
        xj = x[32 * j : 32 * j + 32]
        sw[j] = _importance_weights(xj, qw[32 * j : 32 * j + 32], sigma2, weights)
        scales[j], mins[j] = make_qkx_quants(
            xj, weights, nmax, L[32 * j : 32 * j + 32], Laux, s.x_shifted, F(-0.9), F(0.05), 36, False
        )
    d_block = make_qp_quants(scales[:8], 63, Ls, sw[:8])
    m_block = make_qp_quants(mins[:8], 63, Lm, sw[:8])
    if nmax == 31:
        for j in range(8):
            Ls[j] = min(63, Ls[j])
            Lm[j] = min(63, Lm[j])
    _pack_scale_min_k4(Ls, Lm, y[4:16])
    _put_fp16(y, 0, d_block)
    _put_fp16(y, 2, m_block)
    _q45_finish(x, L, y, nmax)


@_jit
def _q6_k(x, qw, y, s, use_qw):
    L, scales = s.L, s.scales
    max_scale = F0
    max_abs = F0
    for ib in range(16):
        scales[ib] = make_qx_quants(x[16 * ib : 16 * ib + 16], 32, L[16 * ib : 16 * ib + 16], qw[16 * ib : 16 * ib + 16], use_qw)
        if abs(scales[ib]) > max_abs:
            max_abs = abs(scales[ib])
            max_scale = scales[ib]
    if max_abs < GROUP_MAX_EPS:
        for j in range(210):
            y[j] = 0
        return
    iscale = F(-128.0) / max_scale
    _put_fp16(y, 208, F1 / iscale)
    d_all = fp16_round(F1 / iscale)
    for ib in range(16):
        y[192 + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
    for j in range(16):
        d = d_all * F(_i8(y[192 + j]))
        if d == F0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-32, min(31, nearest_int(x[16 * j + ii] / d))) + 32
    for j in range(0, QK_K, 128):
        ql = j // 2
        qh = 128 + j // 4
        for l in range(32):
            q1 = L[j + l] & 0xF
            q2 = L[j + l + 32] & 0xF
            q3 = L[j + l + 64] & 0xF
            q4 = L[j + l + 96] & 0xF
            y[ql + l] = q1 | (q3 << 4)
            y[ql + l + 32] = q2 | (q4 << 4)
            y[qh + l] = (L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6)


# ------------------------------------------------------------ 32-wide legacy blocks

@_jit
def _min_max(x):
    mn = FLT_MAX
    mx = -FLT_MAX
    for j in range(x.shape[0]):
        if x[j] < mn:
            mn = x[j]
        if x[j] > mx:
            mx = x[j]
    return mn, mx


@_jit
def _put_quants(y, offset, L, nmax):
    """qs (and for 5-bit types the 4 qh bytes before it) of a 32-wide block."""
    if nmax == 15:
        for j in range(16):
            y[offset + j] = (L[j] | (L[j + 16] << 4)) & 0xFF
        return
    qh = 0
    for j in range(16):
        qh |= ((L[j] & 0x10) >> 4) << j
        qh |= ((L[j + 16] & 0x10) >> 4) << (j + 16)
    for b in range(4):
        y[offset + b] = (qh >> (8 * b)) & 0xFF
    for j in range(16):
        y[offset + 4 + j] = ((L[j] & 0x0F) | ((L[j + 16] & 0x0F) << 4)) & 0xFF


@_jit
def _q4_0_q5_0_ref(x, qw, y, s, half):
    """Q4_0 (half=8) and Q5_0 (half=16): d = max / -half, q = MIN(2*half-1, (int8_t)(x/d + half + 0.5))."""
    d = _signed_absmax(x)[0] / F(-half)
    inv = F1 / d if d != F0 else F0
    _put_fp16(y, 0, d)
    for j in range(32):
        s.L[j] = min(2 * half - 1, _i8(_trunc_i32(x[j] * inv + F(half + 0.5)))) & 0xFF
    _put_quants(y, 2, s.L, 2 * half - 1)


@_jit
def _q4_1_q5_1_ref(x, qw, y, s, nmax):
    """Q4_1 (nmax=15: MIN(15, (int8_t)q)) and Q5_1 (nmax=31: (uint8_t)q), q = (x - min)/d + 0.5."""
    mn, mx = _min_max(x)
    d = (mx - mn) / F(nmax)
    inv = F1 / d if d != F0 else F0
    _put_fp16(y, 0, d)
    _put_fp16(y, 2, mn)
    for j in range(32):
        q = _trunc_i32((x[j] - mn) * inv + HALF)
        s.L[j] = (min(15, _i8(q)) if nmax == 15 else q) & 0xFF
    _put_quants(y, 4, s.L, nmax)


@_jit
def _q8_0_ref(x, qw, y, s):
    amax = F0
    for j in range(32):
        av = abs(x[j])
        amax = amax if amax > av else av  # MAX(amax, fabsf(v)) takes a NaN
    d = amax / F(127.0)
    inv = F1 / d if d != F0 else F0
    _put_fp16(y, 0, d)
    for j in range(32):
        y[2 + j] = _trunc_i32(_roundf(x[j] * inv)) & 0xFF


@_jit
def _q4_0_q5_0_impl(x, qw, y, s, half):
    _put_fp16(y, 0, make_qx_quants(x, half, s.L, qw, True))
    _put_quants(y, 2, s.L, 2 * half - 1)


@_jit
def _q4_1_q5_1_impl(x, qw, y, s, nmax):
    d, the_min = make_qkx_quants(x, qw, nmax, s.L, s.Laux, s.x_shifted, F(-0.9), F(0.05), 36, False)
    _put_fp16(y, 0, d)
    _put_fp16(y, 2, -the_min)
    _put_quants(y, 4, s.L, nmax)


# ------------------------------------------------------------ row driver

_Scratch = namedtuple("_Scratch", "L Laux x_shifted weights scales mins sw Ls Lm")


@_jit
def _scratch():
    return _Scratch(
        np.zeros(QK_K, np.int32), np.zeros(32, np.int32), np.zeros(32, np.float32), np.zeros(32, np.float32),
        np.zeros(16, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32),
        np.zeros(16, np.int32), np.zeros(16, np.int32),
    )


# (qtype, with imatrix) -> (encoder number, block, type size, block encoder, its extra arguments,
# legacy row weights). The legacy imatrix paths weight each element by qw * sqrt(sigma2 + x**2),
# with sigma2 the mean square of the whole row; the k-quants compute their weights per super-block.
_ENCODERS = {}
for _qtype, _block, _size, _ref, _impl, _row_weights in (
    (Q.Q4_0, 32, 18, (_q4_0_q5_0_ref, (8,)), (_q4_0_q5_0_impl, (8,)), True),
    (Q.Q4_1, 32, 20, (_q4_1_q5_1_ref, (15,)), (_q4_1_q5_1_impl, (15,)), True),
    (Q.Q5_0, 32, 22, (_q4_0_q5_0_ref, (16,)), (_q4_0_q5_0_impl, (16,)), True),
    (Q.Q5_1, 32, 24, (_q4_1_q5_1_ref, (31,)), (_q4_1_q5_1_impl, (31,)), True),
    (Q.Q8_0, 32, 34, (_q8_0_ref, ()), (_q8_0_ref, ()), False),
    (Q.Q2_K, QK_K, 84, (_q2_k_ref, ()), (_q2_k_impl, ()), False),
    (Q.Q3_K, QK_K, 110, (_q3_k_ref, ()), (_q3_k_impl, ()), False),
    (Q.Q4_K, QK_K, 144, (_q45_k_ref, (15, F(-1.0), 20)), (_q45_k_impl, (15,)), False),
    (Q.Q5_K, QK_K, 176, (_q45_k_ref, (31, F(-0.5), 15)), (_q45_k_impl, (31,)), False),
    (Q.Q6_K, QK_K, 210, (_q6_k, (False,)), (_q6_k, (True,)), False),
):
    _ENCODERS[_qtype, False] = (len(_ENCODERS), _block, _size, *_ref, False)
    _ENCODERS[_qtype, True] = (len(_ENCODERS), _block, _size, *_impl, _row_weights)
_BLOCK_ENCODERS = [entry[3:5] for entry in _ENCODERS.values()]


def _encode_block(encoder, x, qw, y, s):
    raise NotImplementedError  # replaced in compiled code by the overload below


@overload(_encode_block)
def _encode_block_overload(encoder, x, qw, y, s):
    # The encoder number is a compile-time literal, so each row-driver specialization compiles
    # (and caches) only its own block encoder.
    if not isinstance(encoder, types.IntegerLiteral):
        raise numba.errors.TypingError("the encoder number must be a literal")
    block_encoder, extra = _BLOCK_ENCODERS[encoder.literal_value]

    def impl(encoder, x, qw, y, s):
        block_encoder(x, qw, y, s, *extra)

    return impl


@numba.njit(cache=True, error_model="numpy", nogil=True, parallel=True)
def _encode_rows(encoder, block, type_bytes, row_weights, x, qw, out):
    numba.literally(encoder)
    rows, n = x.shape
    chunks = min(rows, 256)  # scratch buffers are allocated once per chunk of rows
    for c in prange(chunks):
        s = _scratch()
        weights = np.empty(n if row_weights else 0, np.float32)
        for r in range(c * rows // chunks, (c + 1) * rows // chunks):
            xr = x[r]
            if row_weights:
                sigma2 = _sum_x2(xr) / F(n)
                for j in range(n):
                    weights[j] = qw[j] * np.sqrt(sigma2 + xr[j] * xr[j])
            for b in range(n // block):
                if row_weights:
                    wb = weights[b * block : (b + 1) * block]
                elif qw.shape[0]:
                    wb = qw[b * block : (b + 1) * block]
                else:
                    wb = qw
                yb = out[r, b * type_bytes : (b + 1) * type_bytes]
                _encode_block(encoder, xr[b * block : (b + 1) * block], wb, yb, s)


SUPPORTED_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def quantize_rows(
    x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None, out: np.ndarray, threads: int = 1
) -> None:
    """Encode float32 rows ``x`` [rows, n] into ``out`` (uint8 [rows, row bytes]) as ggml_quantize_chunk does.

    ``imatrix`` is the importance vector [n] or None (Q8_0 ignores it, as ggml does); rows are
    spread over ``threads`` threads. The first call of a type compiles its encoder (a few
    seconds), later processes load it from numba's cache.
    """
    weighted = imatrix is not None and qtype != Q.Q8_0
    encoder, block, type_bytes, _, _, row_weights = _ENCODERS[qtype, weighted]
    qw = np.ascontiguousarray(imatrix, dtype=np.float32) if weighted else np.zeros(0, np.float32)
    args = (block, type_bytes, row_weights, np.ascontiguousarray(x, dtype=np.float32), qw, out)
    signature = (types.literal(encoder), *(numba.typeof(a) for a in args))
    if signature not in _encode_rows.overloads:
        _encode_rows.compile(signature)  # or load it from numba's cache
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    # The compiled entry point directly: dispatching on a literal argument costs ~10 ms a call.
    _encode_rows.overloads[signature].entry_point(encoder, *args)
