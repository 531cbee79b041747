"""Float32 building blocks and scale searches of ggml's quantizers (ggml-quants.c, ggml 0.25.3).

Every routine works on a batch of blocks at once: ``x`` is ``[B, n]`` float32, one block per row,
and returns what the C routine of the same name returns for each block. The results are
bit-identical to the C code because the float32 operations are done in the C expression order:

* sums run element by element along a block (never ``torch.sum``'s pairwise reduction);
* a tensor is never divided by a Python number or a scalar tensor, and a number never by a tensor:
  CUDA turns the first into a multiply by the reciprocal and torch's ``__rtruediv__`` does the
  second on every device, and both can differ from a true division in the last bit (``div`` below);
* ``nearest_int`` reproduces ggml's magic-number rounding, including its wrap-around out of range;
* ``sqrt`` is computed in float64 and rounded: torch's float32 sqrt is not correctly rounded;
* integer stores into C ``uint8_t``/``int8_t`` are emulated with ``u8``/``i8``;
* candidate grids are tried and accepted in the C order (``make_qkx_quants``' steps depend on the
  previously accepted min, so they run one after another).

Internally blocks are transposed to element-major ``[n, B]`` so that each sequential step works
on a contiguous vector of all blocks.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = float(np.float32(1e-15))


def f32(value: float) -> float:
    """A Python float holding exactly the float32 nearest to ``value``."""
    return float(np.float32(value))


def div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """IEEE float32 division of same-device tensors (numbers are materialized first)."""
    if not torch.is_tensor(a):
        a = torch.full_like(b, a)
    if not torch.is_tensor(b):
        b = torch.full_like(a, b)
    if a.shape != b.shape:
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.contiguous(), b.contiguous()
    return a / b


def sqrt(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt, as C's sqrtf.

    torch.sqrt on float32 CPU tensors is not correctly rounded (vectorized approximations differ
    in the last bit for ~15% of inputs); the float64 root rounded to float32 is exact.
    """
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even by adding 1.5 * 2**23 and reading the mantissa."""
    return ((v + 12582912.0).view(torch.int32) & 0x007FFFFF) - 0x00400000


def u8(v: torch.Tensor) -> torch.Tensor:
    """Value after a C store into uint8_t (kept as int32)."""
    return v & 0xFF


def i8(v: torch.Tensor) -> torch.Tensor:
    """Value after a C store into int8_t (kept as int32)."""
    return ((v & 0xFF) ^ 0x80) - 0x80


def fp16_bits(v: torch.Tensor) -> torch.Tensor:
    """IEEE half (round to nearest even) bit patterns of float32 values, as int32 in [0, 65535]."""
    return v.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF


def fp16_round(v: torch.Tensor) -> torch.Tensor:
    """float32 -> fp16 -> float32, what GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)) gives."""
    return v.to(torch.float16).to(torch.float32)


def u16_le(bits: torch.Tensor) -> torch.Tensor:
    """[...] int32 holding 16-bit patterns -> [..., 2] little-endian byte values."""
    return torch.stack([bits & 0xFF, (bits >> 8) & 0xFF], dim=-1)


def _em(x: torch.Tensor) -> torch.Tensor:
    """[..., n] -> element-major [n, ...] contiguous, so per-element steps touch contiguous memory."""
    return x.movedim(-1, 0).contiguous()


def _seqsum_rows(p: torch.Tensor, from_first: bool = False) -> torch.Tensor:
    acc = p[0].clone() if from_first else p[0] + 0.0
    for i in range(1, p.shape[0]):
        acc = acc + p[i]
    return acc


def seqsum(p: torch.Tensor, from_first: bool = False) -> torch.Tensor:
    """Sequential float32 sum over the last dim.

    ``from_first=False`` is C's ``float s = 0; for (...) s += p[i];`` (so a -0.0 first term gives
    +0.0); ``from_first=True`` is ``float s = p[0]; for (i = 1; ...) s += p[i];``.
    """
    return _seqsum_rows(_em(p), from_first)


def seq_min(x: torch.Tensor) -> torch.Tensor:
    """``min = x[0]; if (x[i] < min) min = x[i];`` over the last dim (first of equal values wins)."""
    xt = _em(x)
    acc = xt[0]
    for i in range(1, xt.shape[0]):
        acc = torch.where(xt[i] < acc, xt[i], acc)
    return acc


def seq_max(x: torch.Tensor) -> torch.Tensor:
    """``max = x[0]; if (x[i] > max) max = x[i];`` over the last dim."""
    xt = _em(x)
    acc = xt[0]
    for i in range(1, xt.shape[0]):
        acc = torch.where(xt[i] > acc, xt[i], acc)
    return acc


def seq_max_from_zero(x: torch.Tensor) -> torch.Tensor:
    """``m = 0; if (x[i] > m) m = x[i];`` over the last dim."""
    xt = _em(x)
    acc = torch.zeros_like(xt[0])
    for i in range(xt.shape[0]):
        acc = torch.where(xt[i] > acc, xt[i], acc)
    return acc


def signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``amax = max = 0; if (|x[i]| > amax) { amax = |x[i]|; max = x[i]; }`` -> (max, amax)."""
    xt = _em(x)
    amax = torch.zeros_like(xt[0])
    signed = torch.zeros_like(xt[0])
    for i in range(xt.shape[0]):
        ax = xt[i].abs()
        take = ax > amax
        amax = torch.where(take, ax, amax)
        signed = torch.where(take, xt[i], signed)
    return signed, amax


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants with rmse_type=1 (weights x**2, or ``qw`` when given).

    Returns (scale [B], L [B, n] in 0..2*nmax-1).
    """
    signed_max, amax = signed_absmax(x)
    xt = _em(x)  # [n, B]
    w = xt * xt if qw is None else _em(qw)
    wx = w * xt

    def trial(c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        l = nearest_int(div(c, signed_max) * xt).clamp(-nmax, nmax - 1)
        lf = l.to(torch.float32)
        return l, _seqsum_rows(wx * lf), _seqsum_rows((w * lf) * lf)

    L, sumlx, suml2 = trial(float(-nmax))
    scale = torch.where(suml2 != 0, div(sumlx, suml2), torch.zeros_like(amax))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        l, sumlx, suml2 = trial(f32(-(np.float32(nmax) + np.float32(0.1) * np.float32(i))))
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(take, l, L)
        scale = torch.where(take, div(sumlx, suml2), scale)
        best = torch.where(take, scale * sumlx, best)

    zero = amax < GROUP_MAX_EPS
    L = torch.where(zero, 0, L + nmax).t()
    scale = torch.where(zero, 0.0, scale)
    return scale, L


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants with do_rmse=true: coordinate descent on the weighted (x**2) fit.

    Returns (scale [B], L [B, n] in 0..2*nmax-1).
    """
    signed_max, amax = signed_absmax(x)
    xt = _em(x)
    iscale = div(float(-nmax), signed_max)
    L = nearest_int(iscale * xt).clamp(-nmax, nmax - 1)  # [n, B]
    w = xt * xt
    wx = w * xt
    lf = L.to(torch.float32)
    sums = _seqsum_rows(torch.stack([wx * lf, (w * lf) * lf], dim=1))
    sumlx, suml2 = sums[0], sums[1]
    # A pass that changes nothing leaves the state as it was, so running all 5 passes for every
    # block gives what the C early exit gives.
    for _ in range(5):
        for i in range(xt.shape[0]):
            wi, wxi, xi = w[i], wx[i], xt[i]
            li = L[i]
            lif = li.to(torch.float32)
            slx = sumlx - wxi * lif
            sl2 = suml2 - (wi * lif) * lif
            new_l = nearest_int(div(xi * sl2, slx)).clamp(-nmax, nmax - 1)
            nlf = new_l.to(torch.float32)
            slx_new = slx + wxi * nlf
            sl2_new = sl2 + (wi * nlf) * nlf
            take = (slx > 0) & (new_l != li) & (sl2_new > 0) & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new)
            L[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
    scale = torch.where(suml2 > 0, div(sumlx, suml2), torch.zeros_like(sumlx))
    zero = amax < GROUP_MAX_EPS
    L = torch.where(zero, 0, L + nmax).t()
    scale = torch.where(zero, 0.0, scale)
    return scale, L


def make_qkx_quants(
    x: torch.Tensor,
    weights: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants / make_qkx3_quants (identical once weights are given): affine fit.

    Returns (scale [B], the_min [B] (= -min, >= 0 up to sign of zero), L [B, n] in 0..nmax).
    The steps run one after another: an accepted step moves ``min``, which the next step's
    grid depends on.
    """
    mn = seq_min(x)
    mx = seq_max(x)
    sum_w = seqsum(weights, from_first=True)
    sum_x = seqsum(weights * x, from_first=True)
    mn = torch.where(mn > 0, 0.0, mn)
    flat = mx <= mn  # min <= 0 <= ... so this is C's max == min as well

    # element-major [n, B] so that the running sums add contiguous vectors
    xt, wt = x.t().contiguous(), weights.t().contiguous()

    def quants(iscale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        return nearest_int(iscale * (xt - minimum)).clamp(0, nmax).to(torch.float32)

    def error(scale: torch.Tensor, minimum: torch.Tensor, lf: torch.Tensor) -> torch.Tensor:
        diff = (scale * lf + minimum) - xt
        return _seqsum_rows(wt * (diff.abs() if use_mad else diff * diff))

    iscale = div(float(nmax), mx - mn)
    scale = div(1.0, iscale)
    L = quants(iscale, mn)
    best = error(scale, mn, L)

    rmin32, rdelta32, nmax32 = np.float32(rmin), np.float32(rdelta), np.float32(nmax)
    for step in range(nstep + 1):
        c = float(rmin32 + rdelta32 * np.float32(step) + nmax32)
        la = quants(div(c, mx - mn), mn)
        wl = wt * la
        sums = _seqsum_rows(torch.stack([wl, wl * la, wl * xt], dim=1))
        sum_l, sum_l2, sum_xl = sums[0], sums[1], sums[2]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = div(sum_l2 * sum_x - sum_l * sum_xl, D)
        clip = this_min > 0
        this_min = torch.where(clip, 0.0, this_min)
        this_scale = torch.where(clip, div(sum_xl, sum_l2), this_scale)
        cur = error(this_scale, this_min, la)
        take = (D > 0) & (cur < best)
        L = torch.where(take, la, L)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)

    L = torch.where(flat, 0.0, L).t().to(torch.int32)
    scale = torch.where(flat, 0.0, scale)
    return scale, -mn, L


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants: non-negative scales (here the sub-block scales/mins) on a 0..nmax grid.

    Returns (scale [B], L [B, n] as the C uint8_t values).
    """
    mx = seq_max_from_zero(x)
    zero = mx < GROUP_MAX_EPS
    xt, wt = _em(x), _em(qw)  # [n, B]
    wx = wt * xt

    def mse(step: torch.Tensor, lf: torch.Tensor) -> torch.Tensor:
        diff = xt - step * lf
        return _seqsum_rows((wt * diff) * diff)

    iscale = div(float(nmax), mx)
    l0 = u8(nearest_int(iscale * xt))  # the C code stores this first guess in uint8_t L[]
    best = mse(div(1.0, iscale), l0.to(torch.float32))
    trial_is = [i for i in range(-4, 5) if i != 0]
    for i in trial_is:
        iscale_is = div(float(np.float32(0.1) * np.float32(i) + np.float32(nmax)), mx)
        l = nearest_int(iscale_is * xt).clamp(max=nmax)
        err = mse(div(1.0, iscale_is), l.to(torch.float32))
        take = err < best
        best = torch.where(take, err, best)
        iscale = torch.where(take, iscale_is, iscale)

    l = nearest_int(iscale * xt).clamp(max=nmax)
    lf = l.to(torch.float32)
    sums = _seqsum_rows(torch.stack([wx * lf, (wt * lf) * lf], dim=1))
    sumlx, suml2 = sums[0], sums[1]
    L = u8(l)
    for _ in range(5):  # see make_q3_quants on why the early exit needs no emulation
        for i in range(xt.shape[0]):
            wi, wxi, xi = wt[i], wx[i], xt[i]
            li = L[i]
            lif = li.to(torch.float32)
            slx = sumlx - wxi * lif
            sl2 = suml2 - (wi * lif) * lif
            new_l = nearest_int(div(xi * sl2, slx)).clamp(max=nmax)
            nlf = new_l.to(torch.float32)
            slx_new = slx + wxi * nlf
            sl2_new = sl2 + (wi * nlf) * nlf
            take = (slx > 0) & (sl2 > 0) & (new_l != li) & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new)
            L[i] = torch.where(take, u8(new_l), li)
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
    scale = torch.where(suml2 > 0, div(sumlx, suml2), torch.zeros_like(sumlx))
    L = torch.where(zero, 0, L).t()
    scale = torch.where(zero, 0.0, scale)
    return scale, L
