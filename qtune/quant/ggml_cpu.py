"""Compiled CPU encoders for ggml's block types: ports of ggml-quants.c (ggml 0.25.3), run by numba.

They give the bytes of ggml's own quantizer (``ggml_quantize_chunk``) and run faster than it on the
k-quants (docs/benchmarks.md, "GGUF export"). The scale searches (``make_qx_quants``, ``make_q3_quants``, ``make_qkx_quants``) run
on every sub-block of a group of blocks at once, one sub-block per lane of an element-major buffer:
each lane does the C code's float32 operations in the C order, and the loops across lanes compile
to SIMD instructions. The C code searches one sub-block at a time. The float32 order is kept so:

* every constant and every int used in float arithmetic is a float32 (numba would widen to float64);
* ``error_model="numpy"`` gives IEEE results for division by zero instead of an exception;
* bit patterns are read with a bitcast, so ``nearest_int`` and the fp16 conversion are ggml's own;
* C's float-to-int conversions (``(int8_t)v``, ``(uint8_t)v``) go through ``_trunc_i32``, which gives
  x86's result (INT32_MIN) for NaN and out-of-range values, as the compiled ggml does;
* where C stops early (an accepted step, an unchanged pass) or skips a sub-block, a lane computes
  the step anyway and discards the result, which leaves it as C leaves it.

The torch encoders (``ggml_legacy``, ``ggml_kquants``) are the same algorithms for other devices.
``quantize_rows`` is the entry point; numba caches each compiled encoder on disk the first time it
is used (a few seconds per type).
"""

from __future__ import annotations

from collections import namedtuple

import numba
import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from qtune.quant.ggml_types import GGML_TYPES, IQ4_NL_VALUES

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
def _get_fp16(y, offset):
    return fp16_value(np.int64(y[offset]) | (np.int64(y[offset + 1]) << 8))


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


# ------------------------------------------------------------ lane layout
#
# Sub-block k (n values) of a group is lane k of an element-major buffer: xt[i * lanes + k] =
# x[k * n + i]. With lanes == 1 the buffer is the sub-block itself.


@_jit
def _to_lanes(x, n, xt):
    lanes = x.shape[0] // n
    for k in range(lanes):
        for i in range(n):
            xt[i * lanes + k] = x[k * n + i]
    return lanes


@_jit
def _from_lanes(Lt, n, lanes, L):
    for k in range(lanes):
        for i in range(n):
            L[k * n + i] = Lt[i * lanes + k]


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
def _lane_signed_absmax(xt, lanes, n, mx, amax):
    """_signed_absmax of each lane into mx, amax."""
    for k in range(lanes):
        mx[k] = F0
        amax[k] = F0
    for i in range(n):
        o = i * lanes
        for k in range(lanes):
            ax = abs(xt[o + k])
            mx[k] = xt[o + k] if ax > amax[k] else mx[k]
            amax[k] = ax if ax > amax[k] else amax[k]


@_jit
def _lane_take(Lt, Lauxt, lanes, n, take):
    """Lt = Lauxt on the lanes whose take flag is not 0."""
    for i in range(n):
        o = i * lanes
        for k in range(lanes):
            Lt[o + k] = Lauxt[o + k] if take[k] != F0 else Lt[o + k]


@_jit
def _zero_lane(Lt, lanes, n, k):
    for i in range(n):
        Lt[i * lanes + k] = 0


@_jit
def _lane_round_and_fit(xt, lanes, n, nmax, iscale, Lt, offset, qwt, use_qw, sumlx, suml2):
    """l = clamp(nearest_int(iscale * x), -nmax, nmax - 1) per lane, stored as l + offset, and the
    weighted sums sum(w x l), sum(w l l) added to sumlx, suml2 (w = qw, or x**2)."""
    for i in range(n):
        o = i * lanes
        for k in range(lanes):
            l = max(-nmax, min(nmax - 1, nearest_int(iscale[k] * xt[o + k])))
            Lt[o + k] = l + offset
            w = qwt[o + k] if use_qw else xt[o + k] * xt[o + k]
            fl = F(l)
            sumlx[k] += w * xt[o + k] * fl
            suml2[k] += w * fl * fl


@_jit
def make_qx_quants(xt, lanes, n, nmax, Lt, Lauxt, qwt, use_qw, v, scale_out):
    """make_qx_quants, rmse_type=1, on each lane: weights qw, or x**2. Lt (int32) gets 0..2*nmax-1."""
    mx, amax, iscale, sumlx, suml2 = v[0:lanes], v[lanes : 2 * lanes], v[2 * lanes : 3 * lanes], v[3 * lanes : 4 * lanes], v[4 * lanes : 5 * lanes]
    scale, best, take = v[5 * lanes : 6 * lanes], v[6 * lanes : 7 * lanes], v[7 * lanes : 8 * lanes]
    fnmax = F(nmax)
    _lane_signed_absmax(xt, lanes, n, mx, amax)
    for step in range(-10, 10):
        if step == 0:
            continue
        for k in range(lanes):
            # the first pass (step -10) is C's starting point iscale = -nmax / max
            iscale[k] = (-fnmax if step == -10 else -(fnmax + F(0.1) * F(step))) / mx[k]
            sumlx[k] = F0
            suml2[k] = F0
        _lane_round_and_fit(xt, lanes, n, nmax, iscale, Lauxt, nmax, qwt, use_qw, sumlx, suml2)
        for k in range(lanes):
            if step == -10:
                scale[k] = sumlx[k] / suml2[k] if suml2[k] != F0 else F0
                best[k] = scale[k] * sumlx[k]
                take[k] = F1
            else:
                taken = suml2[k] > F0 and sumlx[k] * sumlx[k] > best[k] * suml2[k]
                scale[k] = sumlx[k] / suml2[k] if taken else scale[k]
                best[k] = scale[k] * sumlx[k] if taken else best[k]
                take[k] = F1 if taken else F0
        _lane_take(Lt, Lauxt, lanes, n, take)
    for k in range(lanes):
        zero = amax[k] < GROUP_MAX_EPS
        scale_out[k] = F0 if zero else scale[k]
        if zero:
            _zero_lane(Lt, lanes, n, k)


@_jit
def make_q3_quants(xt, lanes, n, nmax, Lt, v, scale_out):
    """make_q3_quants with do_rmse=true on each lane: coordinate descent on the x**2-weighted fit.

    Lt (int32) gets 0..2*nmax-1. A pass that changes nothing leaves a lane as it was, so running all
    5 passes on every lane gives what the C early exit gives.
    """
    mx, amax, iscale, sumlx, suml2 = v[0:lanes], v[lanes : 2 * lanes], v[2 * lanes : 3 * lanes], v[3 * lanes : 4 * lanes], v[4 * lanes : 5 * lanes]
    _lane_signed_absmax(xt, lanes, n, mx, amax)
    for k in range(lanes):
        iscale[k] = -F(nmax) / mx[k]
        sumlx[k] = F0
        suml2[k] = F0
    _lane_round_and_fit(xt, lanes, n, nmax, iscale, Lt, 0, xt, False, sumlx, suml2)
    for _ in range(5):
        for i in range(n):
            o = i * lanes
            for k in range(lanes):
                xi = xt[o + k]
                w = xi * xi
                li = F(Lt[o + k])
                slx = sumlx[k] - w * xi * li
                sl2 = suml2[k] - w * li * li
                new_l = max(-nmax, min(nmax - 1, nearest_int(xi * sl2 / slx)))
                fn = F(new_l)
                slx_new = slx + w * xi * fn
                sl2_new = sl2 + w * fn * fn
                taken = slx > F0 and new_l != Lt[o + k] and sl2_new > F0 and slx_new * slx_new * suml2[k] > sumlx[k] * sumlx[k] * sl2_new
                Lt[o + k] = new_l if taken else Lt[o + k]
                sumlx[k] = slx_new if taken else sumlx[k]
                suml2[k] = sl2_new if taken else suml2[k]
    for k in range(lanes):
        zero = amax[k] < GROUP_MAX_EPS
        scale_out[k] = F0 if zero or not suml2[k] > F0 else sumlx[k] / suml2[k]
        if zero:
            _zero_lane(Lt, lanes, n, k)
        else:
            for i in range(n):
                Lt[i * lanes + k] += nmax


@_jit
def _affine_level(x, iscale, minimum, nmax):
    """``MAX(0, MIN(nmax, nearest_int(iscale*(x - min))))``"""
    return max(0, min(nmax, nearest_int(iscale * (x - minimum))))


@_jit
def _affine_error(x, w, scale, minimum, l, use_mad):
    """``w * |diff|`` or ``w * diff*diff``, diff = scale*l + min - x: one term of make_qkx_quants' error."""
    diff = scale * F(l) + minimum - x
    return w * (abs(diff) if use_mad else diff * diff)


@_jit
def make_qkx_quants(xt, wt, lanes, n, nmax, rmin, rdelta, nstep, use_mad, Lt, Lauxt, v, scale_out, min_out):
    """make_qkx2_quants / make_qkx3_quants (weights given) on each lane. Lt gets 0..nmax; min_out = -min."""
    mn, mx, sum_w, sum_x = v[0:lanes], v[lanes : 2 * lanes], v[2 * lanes : 3 * lanes], v[3 * lanes : 4 * lanes]
    iscale, scale, best = v[4 * lanes : 5 * lanes], v[5 * lanes : 6 * lanes], v[6 * lanes : 7 * lanes]
    sum_l, sum_l2, sum_xl = v[7 * lanes : 8 * lanes], v[8 * lanes : 9 * lanes], v[9 * lanes : 10 * lanes]
    this_scale, this_min = v[10 * lanes : 11 * lanes], v[11 * lanes : 12 * lanes]
    cur, D = v[12 * lanes : 13 * lanes], v[13 * lanes : 14 * lanes]
    fnmax = F(nmax)
    for k in range(lanes):
        mn[k] = xt[k]
        mx[k] = xt[k]
        sum_w[k] = wt[k]
        sum_x[k] = wt[k] * xt[k]
    for i in range(1, n):
        o = i * lanes
        for k in range(lanes):
            xv = xt[o + k]
            mn[k] = xv if xv < mn[k] else mn[k]
            mx[k] = xv if xv > mx[k] else mx[k]
            sum_w[k] += wt[o + k]
            sum_x[k] += wt[o + k] * xv
    for k in range(lanes):
        mn[k] = F0 if mn[k] > F0 else mn[k]
        iscale[k] = fnmax / (mx[k] - mn[k])
        scale[k] = F1 / iscale[k]
        best[k] = F0
    for i in range(n):
        o = i * lanes
        for k in range(lanes):
            l = _affine_level(xt[o + k], iscale[k], mn[k], nmax)
            Lt[o + k] = l
            best[k] += _affine_error(xt[o + k], wt[o + k], scale[k], mn[k], l, use_mad)
    for step in range(nstep + 1):
        c = rmin + rdelta * F(step) + fnmax
        for k in range(lanes):
            iscale[k] = c / (mx[k] - mn[k])
            sum_l[k] = F0
            sum_l2[k] = F0
            sum_xl[k] = F0
        for i in range(n):
            o = i * lanes
            for k in range(lanes):
                l = _affine_level(xt[o + k], iscale[k], mn[k], nmax)
                Lauxt[o + k] = l
                wl = wt[o + k] * F(l)
                sum_l[k] += wl
                sum_l2[k] += wl * F(l)
                sum_xl[k] += wl * xt[o + k]
        for k in range(lanes):
            D[k] = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k]
            fit_scale = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / D[k]
            fit_min = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / D[k]
            clip = fit_min > F0
            this_scale[k] = sum_xl[k] / sum_l2[k] if clip else fit_scale
            this_min[k] = F0 if clip else fit_min
            cur[k] = F0
        for i in range(n):
            o = i * lanes
            for k in range(lanes):
                cur[k] += _affine_error(xt[o + k], wt[o + k], this_scale[k], this_min[k], Lauxt[o + k], use_mad)
        for k in range(lanes):
            # C only searches when max > min; it evaluates the error only when D > 0
            taken = D[k] > F0 and cur[k] < best[k] and not mx[k] <= mn[k]
            best[k] = cur[k] if taken else best[k]
            scale[k] = this_scale[k] if taken else scale[k]
            mn[k] = this_min[k] if taken else mn[k]
            cur[k] = F1 if taken else F0
        _lane_take(Lt, Lauxt, lanes, n, cur)
    for k in range(lanes):
        flat = mx[k] <= mn[k]
        scale_out[k] = F0 if flat else scale[k]
        min_out[k] = -mn[k]
        if flat:
            _zero_lane(Lt, lanes, n, k)


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
def _max_from_zero(x):
    """``m = 0; if (x[i] > m) m = x[i];``"""
    m = F0
    for i in range(x.shape[0]):
        m = x[i] if x[i] > m else m
    return m


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
    d_all = _get_fp16(y, 108)
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
    dm = _get_fp16(y, 80)
    mm = _get_fp16(y, 82)
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
    d_all = _get_fp16(y, 0)
    m_all = _get_fp16(y, 2)
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


# ------------------------------------------------------------ encoders: a group of blocks x -> y
#
# Each encoder takes x (a whole number of blocks of one row, at most GROUP_VALUES values), qw (the
# importance weights of the same values, or empty) and writes the blocks' bytes into y.


@_jit
def _sub_block_weights(x, qw, n, sigma_factor, weights, sw):
    """quantize_row_*_impl weights qw * sqrt(sigma2 + x**2), sigma2 = factor * mean(x**2) over the
    super-block, into ``weights``; their sum per n-wide sub-block into ``sw``."""
    for b in range(x.shape[0] // QK_K):
        xb = x[b * QK_K : (b + 1) * QK_K]
        sigma2 = sigma_factor * _sum_x2(xb) / F(QK_K)
        for j in range(QK_K // n):
            lo = b * QK_K + j * n
            sw[lo // n] = _importance_weights(x[lo : lo + n], qw[lo : lo + n], sigma2, weights[lo : lo + n])


@_jit
def _q2_k(x, qw, y, s, weighted, rmin, rdelta, nstep):
    values = x.shape[0]
    if weighted:
        _sub_block_weights(x, qw, 16, F1, s.buf, s.sw)
    else:
        for i in range(values):
            s.buf[i] = abs(x[i])
    lanes = _to_lanes(x, 16, s.xt)
    _to_lanes(s.buf[:values], 16, s.wt)
    make_qkx_quants(s.xt, s.wt, lanes, 16, 3, rmin, rdelta, nstep, not weighted, s.Lt, s.Lauxt, s.v, s.scales, s.mins)
    _from_lanes(s.Lt, 16, lanes, s.L)
    for b in range(values // QK_K):
        yb = y[84 * b : 84 * b + 84]
        scales, mins = s.scales[16 * b : 16 * b + 16], s.mins[16 * b : 16 * b + 16]
        if weighted:
            sw = s.sw[16 * b : 16 * b + 16]
            _put_fp16(yb, 80, make_qp_quants(scales, 15, s.Ls, sw))
            _put_fp16(yb, 82, make_qp_quants(mins, 15, s.Lm, sw))
            for j in range(16):
                yb[j] = (s.Ls[j] | (s.Lm[j] << 4)) & 0xFF
        else:
            max_scale, max_min = _max_from_zero(scales), _max_from_zero(mins)
            for j in range(16):
                yb[j] = 0
            if max_scale > F0:
                iscale = F(15.0) / max_scale
                for j in range(16):
                    yb[j] = nearest_int(iscale * scales[j]) & 0xFF
            _put_fp16(yb, 80, max_scale / F(15.0) if max_scale > F0 else F0)
            if max_min > F0:
                iscale = F(15.0) / max_min
                for j in range(16):
                    yb[j] |= (nearest_int(iscale * mins[j]) << 4) & 0xFF
            _put_fp16(yb, 82, max_min / F(15.0) if max_min > F0 else F0)
        _q2_finish(x[QK_K * b : QK_K * (b + 1)], s.L[QK_K * b : QK_K * (b + 1)], yb)


@_jit
def _q3_k(x, qw, y, s, weighted):
    values = x.shape[0]
    lanes = _to_lanes(x, 16, s.xt)
    if weighted:
        _sub_block_weights(x, qw, 16, F(2.0), s.buf, s.sw)
        _to_lanes(s.buf[:values], 16, s.wt)
        make_qx_quants(s.xt, lanes, 16, 4, s.Lt, s.Lauxt, s.wt, True, s.v, s.scales)
    else:
        make_q3_quants(s.xt, lanes, 16, 4, s.Lt, s.v, s.scales)
    _from_lanes(s.Lt, 16, lanes, s.L)
    for b in range(values // QK_K):
        xb, yb, L = x[QK_K * b : QK_K * (b + 1)], y[110 * b : 110 * b + 110], s.L[QK_K * b : QK_K * (b + 1)]
        scales = s.scales[16 * b : 16 * b + 16]
        for j in range(96, 108):
            yb[j] = 0
        if weighted:
            make_qx_quants(scales, 1, 16, 32, s.Ls, s.Lm, s.sw[16 * b : 16 * b + 16], True, s.v, s.tail)
            for j in range(16):
                _q3_pack_scale(yb[96:108], j, s.Ls[j])
            _put_fp16(yb, 108, s.tail[0])
        else:
            max_scale, _ = _signed_absmax(scales)
            if max_scale != F0:
                iscale = F(-32.0) / max_scale
                for j in range(16):
                    l = max(-32, min(31, _i8(nearest_int(iscale * scales[j])))) + 32
                    _q3_pack_scale(yb[96:108], j, l)
                _put_fp16(yb, 108, F1 / iscale)
            else:
                _put_fp16(yb, 108, F0)
        _q3_finish(xb, L, yb)


@_jit
def _q45_k(x, qw, y, s, weighted, nmax, rmin, rdelta, nstep):
    values = x.shape[0]
    type_bytes = 144 if nmax == 15 else 176
    if weighted:
        _sub_block_weights(x, qw, 32, F(2.0), s.buf, s.sw)
    else:
        for j in range(values // 32):
            xj = x[32 * j : 32 * j + 32]
            av_x = np.sqrt(_sum_x2(xj) / F(32.0))
            for l in range(32):
                s.buf[32 * j + l] = av_x + abs(xj[l])
    lanes = _to_lanes(x, 32, s.xt)
    _to_lanes(s.buf[:values], 32, s.wt)
    make_qkx_quants(s.xt, s.wt, lanes, 32, nmax, rmin, rdelta, nstep, False, s.Lt, s.Lauxt, s.v, s.scales, s.mins)
    _from_lanes(s.Lt, 32, lanes, s.L)
    Ls, Lm = s.Ls, s.Lm
    for b in range(values // QK_K):
        yb = y[type_bytes * b : type_bytes * (b + 1)]
        scales, mins = s.scales[8 * b : 8 * b + 8], s.mins[8 * b : 8 * b + 8]
        if weighted:
            sw = s.sw[8 * b : 8 * b + 8]
            d = make_qp_quants(scales, 63, Ls, sw)
            dmin = make_qp_quants(mins, 63, Lm, sw)
            if nmax == 31:
                for j in range(8):
                    Ls[j] = min(63, Ls[j])
                    Lm[j] = min(63, Lm[j])
        else:
            max_scale, max_min = _max_from_zero(scales), _max_from_zero(mins)
            inv_scale = F(63.0) / max_scale if max_scale > F0 else F0
            inv_min = F(63.0) / max_min if max_min > F0 else F0
            for j in range(8):
                Ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
                Lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
            d = max_scale / F(63.0)
            dmin = max_min / F(63.0)
        _pack_scale_min_k4(Ls, Lm, yb[4:16])
        _put_fp16(yb, 0, d)
        _put_fp16(yb, 2, dmin)
        _q45_finish(x[QK_K * b : QK_K * (b + 1)], s.L[QK_K * b : QK_K * (b + 1)], yb, nmax)


@_jit
def _q6_k(x, qw, y, s, weighted):
    values = x.shape[0]
    lanes = _to_lanes(x, 16, s.xt)
    if weighted:
        _to_lanes(qw, 16, s.wt)
    make_qx_quants(s.xt, lanes, 16, 32, s.Lt, s.Lauxt, s.wt, weighted, s.v, s.scales)
    _from_lanes(s.Lt, 16, lanes, s.L)
    for b in range(values // QK_K):
        xb, yb, L = x[QK_K * b : QK_K * (b + 1)], y[210 * b : 210 * (b + 1)], s.L[QK_K * b : QK_K * (b + 1)]
        scales = s.scales[16 * b : 16 * b + 16]
        max_scale, max_abs = _signed_absmax(scales)
        if max_abs < GROUP_MAX_EPS:
            yb[:] = 0
            continue
        iscale = F(-128.0) / max_scale
        _put_fp16(yb, 208, F1 / iscale)
        d_all = fp16_round(F1 / iscale)
        for ib in range(16):
            yb[192 + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
        for j in range(16):
            d = d_all * F(_i8(yb[192 + j]))
            if d == F0:
                continue
            for ii in range(16):
                L[16 * j + ii] = max(-32, min(31, nearest_int(xb[16 * j + ii] / d))) + 32
        for j in range(0, QK_K, 128):
            ql = j // 2
            qh = 128 + j // 4
            for l in range(32):
                yb[ql + l] = (L[j + l] & 0xF) | ((L[j + l + 64] & 0xF) << 4)
                yb[ql + l + 32] = (L[j + l + 32] & 0xF) | ((L[j + l + 96] & 0xF) << 4)
                yb[qh + l] = (L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6)


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
def _q4_0_q5_0(x, qw, y, s, weighted, half):
    """Q4_0 (half=8) and Q5_0 (half=16). Reference: d = max / -half, q = MIN(2*half-1, (int8_t)(x/d + half + 0.5))."""
    blocks = x.shape[0] // 32
    type_bytes = y.shape[0] // blocks
    if weighted:
        lanes = _to_lanes(x, 32, s.xt)
        _to_lanes(qw, 32, s.wt)
        make_qx_quants(s.xt, lanes, 32, half, s.Lt, s.Lauxt, s.wt, True, s.v, s.scales)
        _from_lanes(s.Lt, 32, lanes, s.L)
    for b in range(blocks):
        xb, yb, L = x[32 * b : 32 * b + 32], y[type_bytes * b : type_bytes * (b + 1)], s.L[32 * b : 32 * b + 32]
        if weighted:
            d = s.scales[b]
        else:
            d = _signed_absmax(xb)[0] / F(-half)
            inv = F1 / d if d != F0 else F0
            for j in range(32):
                L[j] = min(2 * half - 1, _i8(_trunc_i32(xb[j] * inv + F(half + 0.5)))) & 0xFF
        _put_fp16(yb, 0, d)
        _put_quants(yb, 2, L, 2 * half - 1)


@_jit
def _q4_1_q5_1(x, qw, y, s, weighted, nmax):
    """Q4_1 (nmax=15) and Q5_1 (nmax=31). Reference: q = (x - min)/d + 0.5, stored as MIN(15, (int8_t)q)
    for Q4_1 and (uint8_t)q for Q5_1."""
    blocks = x.shape[0] // 32
    type_bytes = y.shape[0] // blocks
    if weighted:
        lanes = _to_lanes(x, 32, s.xt)
        _to_lanes(qw, 32, s.wt)
        make_qkx_quants(s.xt, s.wt, lanes, 32, nmax, F(-0.9), F(0.05), 36, False, s.Lt, s.Lauxt, s.v, s.scales, s.mins)
        _from_lanes(s.Lt, 32, lanes, s.L)
    for b in range(blocks):
        xb, yb, L = x[32 * b : 32 * b + 32], y[type_bytes * b : type_bytes * (b + 1)], s.L[32 * b : 32 * b + 32]
        if weighted:
            d, m = s.scales[b], -s.mins[b]
        else:
            m, mx = _min_max(xb)
            d = (mx - m) / F(nmax)
            inv = F1 / d if d != F0 else F0
            for j in range(32):
                q = _trunc_i32((xb[j] - m) * inv + HALF)
                L[j] = (min(15, _i8(q)) if nmax == 15 else q) & 0xFF
        _put_fp16(yb, 0, d)
        _put_fp16(yb, 2, m)
        _put_quants(yb, 4, L, nmax)


@_jit
def _q8_0(x, qw, y, s):
    for b in range(x.shape[0] // 32):
        xb, yb = x[32 * b : 32 * b + 32], y[34 * b : 34 * b + 34]
        amax = F0
        for j in range(32):
            av = abs(xb[j])
            amax = amax if amax > av else av  # MAX(amax, fabsf(v)) takes a NaN
        d = amax / F(127.0)
        inv = F1 / d if d != F0 else F0
        _put_fp16(yb, 0, d)
        for j in range(32):
            yb[2 + j] = _trunc_i32(_roundf(xb[j] * inv)) & 0xFF


IQ4_VALUES = np.array(IQ4_NL_VALUES, dtype=np.int8)


@_jit
def _iq4_index(x):
    """best_index_int8(16, kvalues_iq4nl, x): the nearest codebook entry (the upper one on a tie)."""
    if x <= F(IQ4_VALUES[0]):
        return 0
    if x >= F(IQ4_VALUES[15]):
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < F(IQ4_VALUES[mav]):
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - F(IQ4_VALUES[mu - 1]) < F(IQ4_VALUES[mu]) - x else mu


IQ4_LEVELS = IQ4_VALUES.astype(np.float32)


@_jit
def _iq4_level(x):
    """IQ4_LEVELS[_iq4_index(x)] without branches on the data, so that a block's 32 run as SIMD lanes:
    mu counts the levels at or below x (kept within 1..15), then the nearer of the two around x."""
    mu = 0
    for k in range(1, 15):
        mu += IQ4_LEVELS[k] <= x
    mu += 1
    lo, hi = IQ4_LEVELS[mu - 1], IQ4_LEVELS[mu]
    level = lo if x - lo < hi - x else hi
    level = IQ4_LEVELS[0] if x <= IQ4_LEVELS[0] else level
    return IQ4_LEVELS[15] if x >= IQ4_LEVELS[15] or x != x else level


@_jit
def _iq4_fit(xb, weight, inv):
    """sum(w*q*x) and sum(w*q*q) over a 32-wide block for codes chosen at scale 1/inv."""
    q = np.empty(32, np.float32)
    for j in range(32):
        q[j] = _iq4_level(inv * xb[j])
    sumqx, sumq2 = F0, F0
    for j in range(32):
        w = weight[j]
        sumqx += w * q[j] * xb[j]
        sumq2 += w * q[j] * q[j]
    return sumqx, sumq2


@_jit
def _iq4_super_block(x, qw, weighted, y, L, scales, weight):
    """quantize_row_iq4_nl_impl with ntry 7 (quantize_iq4_nl and quantize_iq4_xs): one super-block of
    32 (IQ4_NL) or 256 (IQ4_XS) values into y."""
    n = x.shape[0]
    nb = n // 32
    sigma2 = F0
    for j in range(n):
        sigma2 += x[j] * x[j]
    sigma2 *= F(2.0) / F(n)
    max_scale, amax_scale = F0, F0
    for ib in range(nb):
        xb = x[32 * ib : 32 * ib + 32]
        for j in range(32):
            weight[j] = qw[32 * ib + j] * np.sqrt(sigma2 + xb[j] * xb[j]) if weighted else xb[j] * xb[j]
        amax, mx = F0, F0
        for j in range(32):
            ax = abs(xb[j])
            if ax > amax:
                amax, mx = ax, xb[j]
        if amax < GROUP_MAX_EPS:
            scales[ib] = F0
            continue
        d = -mx / F(IQ4_VALUES[0])
        sumqx, sumq2 = _iq4_fit(xb, weight, F1 / d)  # (the codes chosen here are chosen again below)
        d = sumqx / sumq2 if sumq2 > F0 else F0
        best = d * sumqx
        for itry in range(-7, 8):
            sumqx, sumq2 = _iq4_fit(xb, weight, F(itry + IQ4_VALUES[0]) / mx)
            if sumq2 > F0 and sumqx * sumqx > best * sumq2:
                d = sumqx / sumq2
                best = d * sumqx
        scales[ib] = d
        if abs(d) > amax_scale:
            amax_scale, max_scale = abs(d), d
    if nb > 1:  # IQ4_XS: 6-bit sub-block scales of a super-block fp16 scale
        d = -max_scale / F(32.0)
        _put_fp16(y, 0, d)
        inv = F1 / d if d != F0 else F0
        scales_h = 0
        for ib in range(nb):
            l = max(-32, min(31, nearest_int(inv * scales[ib])))
            dl = d * F(l)
            idl = F1 / dl if dl != F0 else F0
            for j in range(32):
                L[32 * ib + j] = _iq4_index(idl * x[32 * ib + j])
            l += 32
            if ib % 2 == 0:
                y[4 + ib // 2] = l & 0xF
            else:
                y[4 + ib // 2] |= (l & 0xF) << 4
            scales_h |= (l >> 4) << (2 * (ib % 8))
        y[2] = scales_h & 0xFF
        y[3] = (scales_h >> 8) & 0xFF
        qs = 8
    else:  # IQ4_NL
        _put_fp16(y, 0, scales[0])
        inv = F1 / scales[0] if scales[0] != F0 else F0
        for j in range(n):
            L[j] = _iq4_index(inv * x[j])
        qs = 2
    for i in range(n // 32):
        for j in range(16):
            y[qs + 16 * i + j] = (L[32 * i + j] | (L[32 * i + 16 + j] << 4)) & 0xFF


@_jit
def _iq4(x, qw, y, s, weighted, n):
    """IQ4_NL (n=32) and IQ4_XS (n=256): super-blocks of n values, each searched on its own."""
    blocks = x.shape[0] // n
    type_bytes = y.shape[0] // blocks
    for b in range(blocks):
        qb = qw[n * b : n * (b + 1)] if weighted else qw
        _iq4_super_block(x[n * b : n * (b + 1)], qb, weighted, y[type_bytes * b : type_bytes * (b + 1)], s.L, s.scales, s.buf)


# ------------------------------------------------------------ row driver

GROUP_VALUES = 4096  # values encoded together: up to 16 super-blocks or 128 legacy blocks, one lane each sub-block
MAX_LANES = GROUP_VALUES // 16

_Scratch = namedtuple("_Scratch", "xt wt buf Lt Lauxt L v scales mins sw tail Ls Lm")


@_jit
def _scratch():
    f32, i32 = np.float32, np.int32
    return _Scratch(
        np.zeros(GROUP_VALUES, f32),
        np.zeros(GROUP_VALUES, f32),
        np.zeros(GROUP_VALUES, f32),
        np.zeros(GROUP_VALUES, i32),
        np.zeros(GROUP_VALUES, i32),
        np.zeros(GROUP_VALUES, i32),
        np.zeros(14 * MAX_LANES, f32),
        np.zeros(MAX_LANES, f32),
        np.zeros(MAX_LANES, f32),
        np.zeros(MAX_LANES, f32),
        np.zeros(16, f32),
        np.zeros(16, i32),
        np.zeros(16, i32),
    )


# (qtype, with imatrix) -> (encoder number, block, type size, encoder, its extra arguments, legacy row
# weights): the compiled ports of ggml's C encoders, with their literal parameters. The legacy imatrix
# paths weight each element by qw * sqrt(sigma2 + x**2), with sigma2 the mean square of the whole row;
# the k-quants compute their weights per super-block.
_ENCODERS = {}
for _qtype, _encoder, _ref, _impl, _row_weights in (
    (Q.Q4_0, _q4_0_q5_0, (False, 8), (True, 8), True),
    (Q.Q4_1, _q4_1_q5_1, (False, 15), (True, 15), True),
    (Q.Q5_0, _q4_0_q5_0, (False, 16), (True, 16), True),
    (Q.Q5_1, _q4_1_q5_1, (False, 31), (True, 31), True),
    (Q.Q8_0, _q8_0, (), (), False),
    (Q.Q2_K, _q2_k, (False, F(-0.5), F(0.1), 15), (True, F(-0.9), F(0.05), 36), False),
    (Q.Q3_K, _q3_k, (False,), (True,), False),
    (Q.Q4_K, _q45_k, (False, 15, F(-1.0), F(0.1), 20), (True, 15, F(-0.9), F(0.05), 36), False),
    (Q.Q5_K, _q45_k, (False, 31, F(-0.5), F(0.1), 15), (True, 31, F(-0.9), F(0.05), 36), False),
    (Q.Q6_K, _q6_k, (False,), (True,), False),
    (Q.IQ4_NL, _iq4, (False, 32), (True, 32), False),
    (Q.IQ4_XS, _iq4, (False, 256), (True, 256), False),
):
    _block, _size = GGML_TYPES[_qtype].block_size, GGML_TYPES[_qtype].type_size
    _ENCODERS[_qtype, False] = (len(_ENCODERS), _block, _size, _encoder, _ref, False)
    _ENCODERS[_qtype, True] = (len(_ENCODERS), _block, _size, _encoder, _impl, _row_weights)
_GROUP_ENCODERS = [entry[3:5] for entry in _ENCODERS.values()]


def _encode_group(encoder, x, qw, y, s):
    raise NotImplementedError  # replaced in compiled code by the overload below


@overload(_encode_group)
def _encode_group_overload(encoder, x, qw, y, s):
    # The encoder number is a compile-time literal, so each row-driver specialization compiles
    # (and caches) only its own encoder.
    if not isinstance(encoder, types.IntegerLiteral):
        raise numba.errors.TypingError("the encoder number must be a literal")
    group_encoder, extra = _GROUP_ENCODERS[encoder.literal_value]

    def impl(encoder, x, qw, y, s):
        group_encoder(x, qw, y, s, *extra)

    return impl


@numba.njit(cache=True, error_model="numpy", nogil=True, parallel=True)
def _encode_rows(encoder, block, type_bytes, row_weights, x, qw, out):
    numba.literally(encoder)
    rows, n = x.shape
    blocks = n // block
    group = max(1, GROUP_VALUES // block)
    chunks = min(rows, 256)  # scratch buffers are allocated once per chunk of rows
    for c in prange(chunks):
        s = _scratch()
        weights = np.empty(n if row_weights else 0, np.float32)
        for r in range(c * rows // chunks, (c + 1) * rows // chunks):
            xr = x[r]
            if row_weights:
                _importance_weights(xr, qw, _sum_x2(xr) / F(n), weights)
            for g0 in range(0, blocks, group):
                lo, hi = g0 * block, min(blocks, g0 + group) * block
                if row_weights:
                    wg = weights[lo:hi]
                elif qw.shape[0]:
                    wg = qw[lo:hi]
                else:
                    wg = qw
                yg = out[r, g0 * type_bytes : min(blocks, g0 + group) * type_bytes]
                _encode_group(encoder, xr[lo:hi], wg, yg, s)


def quantize_rows(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None, out: np.ndarray, threads: int = 1) -> None:
    """Encode float32 rows ``x`` [rows, n] into ``out`` (uint8 [rows, row bytes]) as ggml_quantize_chunk does.

    ``imatrix`` is the importance vector [n] or None (Q8_0 ignores it, as ggml does); rows are
    spread over ``threads`` threads. The first call of a type compiles its encoder (a few
    seconds), later processes load it from numba's cache.
    """
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be a writeable C-contiguous array")
    weighted = imatrix is not None and GGML_TYPES[qtype].uses_imatrix
    encoder, block, type_bytes, _, _, row_weights = _ENCODERS[qtype, weighted]
    x = np.ascontiguousarray(x, dtype=np.float32)
    qw = np.ascontiguousarray(imatrix, dtype=np.float32) if weighted else np.zeros(0, np.float32)
    rows, n = x.shape
    if not row_weights:
        # Blocks only see their own values and their column's importance, so short rows can be
        # joined into longer ones: more sub-blocks are searched side by side.
        merge = max(d for d in range(1, max(1, GROUP_VALUES // n) + 1) if rows % d == 0)
        x, out = x.reshape(rows // merge, merge * n), out.reshape(rows // merge, -1)
        qw = np.tile(qw, merge) if weighted else qw
    args = (block, type_bytes, row_weights, x, qw, out)
    signature = (types.literal(encoder), *(numba.typeof(a) for a in args))
    if signature not in _encode_rows.overloads:
        _encode_rows.compile(signature)  # or load it from numba's cache
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    # The compiled entry point directly: dispatching on a literal argument costs ~10 ms a call.
    _encode_rows.overloads[signature].entry_point(encoder, *args)
