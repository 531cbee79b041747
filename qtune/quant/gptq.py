"""GPTQ (Frantar et al., 2022): second-order weight quantization, one linear layer at a time.

Algorithm as published (IST-DASLab ``gptq.py``): dead columns zeroed, optional
act-order, damping as a fraction of the mean Hessian diagonal, upper Cholesky
factor of H^-1, lazy block updates, group grids chosen on the already-updated
weights when each group starts, un-permute with g_idx.

Group-aware ordering is the act-order gain without its runtime cost: groups stay
the original contiguous columns (so g_idx stays trivial and loaders need no
reordering), but they are solved most salient first (by the largest diag(H) in
the group), and within a group the columns in descending diag(H).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qtune.quant import DEFAULT_BITS, DEFAULT_DAMP, DEFAULT_GROUP_SIZE
from qtune.quant.rtn import (
    QuantizedWeight,
    check_bits,
    check_group_size,
    check_weight,
    dequantize_codes,
    dequantize_grouped,
    gptq_grid,
    quantize_to_codes,
)

MAX_DAMP = 100.0  # relative to mean(diag(H)); past this the Hessian is beyond repair
DAMP_GROWTH = 10.0


class HessianAccumulator:
    """Running H = 2/n * sum(x x^T) over all tokens seen so far, in float32."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    def add_batch(self, x: Tensor, token_mask: Tensor | None = None) -> None:
        """Add activations ``x`` [..., K]; ``token_mask`` [...] (bool) drops padding tokens."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected activations with last dim {self.in_features}, got {tuple(x.shape)}")
        x = x.detach()
        if token_mask is not None:
            x = x[token_mask.to(torch.bool)]
        x = x.reshape(-1, self.in_features).to(device=self.hessian.device, dtype=torch.float32)
        batch_tokens = x.shape[0]
        if batch_tokens == 0:
            return
        total = self.n_tokens + batch_tokens
        self.hessian.mul_(self.n_tokens / total)
        x = x * (2.0 / total) ** 0.5
        self.hessian.addmm_(x.t(), x)
        self.n_tokens = total


@dataclass
class GPTQResult(QuantizedWeight):
    """QuantizedWeight plus the fake-quantized weight and what the solver did."""

    weight: Tensor = field(default=None)  # type: ignore[assignment]  # [N, K] float32 dequantized
    damp: float = 0.0  # fraction of mean(diag(H)) actually added
    damp_requested: float = 0.0
    damp_retries: int = 0
    loss: float = 0.0  # sum over columns of (w - q)^2 / d^2 / 2, the GPTQ proxy loss
    dead_columns: int = 0
    perm: Tensor | None = None  # processing order of the columns; None in natural order


def _working_copies(weight: Tensor, hessian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float32 copies of ``weight`` [N, K] and its input Hessian [K, K] to solve on, and the dead columns
    (inputs that never fired): zeroed in the weight, given a unit diagonal in the Hessian."""
    check_weight(weight)
    k = weight.shape[1]
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a weight with {k} input features, got {tuple(hessian.shape)}")
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h, dead


def _inverse_hessian_factor(hessian: Tensor, damp: float) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor of (H + damp*mean(diag)*I)^-1, raising damp x10 until it exists."""
    mean_diag = float(torch.diag(hessian).mean())
    finite = bool(torch.isfinite(hessian).all())
    if not (mean_diag > 0 and finite):
        raise ValueError(f"Hessian is unusable (mean diagonal {mean_diag}, all finite: {finite})")
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    retries = 0
    current = damp
    while current <= MAX_DAMP:
        lower, info = torch.linalg.cholesky_ex(hessian + current * mean_diag * eye)
        if int(info) == 0:
            # cholesky_solve against I gives the same inverse; cholesky_inverse is many times slower on
            # multi-threaded CPU builds (docs/benchmarks.md, "GPTQ and AWQ").
            inverse = torch.cholesky_solve(eye, lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, current, retries
        current *= DAMP_GROWTH
        retries += 1
    raise ValueError(f"Hessian is not positive definite even with damping {current / DAMP_GROWTH:g} x mean(diag)")


def group_aware_order(diag: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Column processing order and group processing order for group-aware GPTQ.

    Full groups are ranked by their largest diagonal entry (descending, ties in original order) and
    each is solved columns-by-descending-diagonal; a partial last group keeps its place at the end.
    Returns (perm over columns, order over full groups).
    """
    k = diag.numel()
    full = k // width
    by_group = diag[: full * width].reshape(full, width)
    within = torch.argsort(by_group, dim=1, descending=True, stable=True)
    group_order = torch.argsort(by_group.max(dim=1).values, descending=True, stable=True)
    columns = (within + torch.arange(full, device=diag.device).unsqueeze(1) * width)[group_order].reshape(-1)
    tail = torch.arange(full * width, k, device=diag.device)
    return torch.cat([columns, tail]), group_order


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    bits: int = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    sym: bool = True,
    act_order: bool = False,
    damp: float = DEFAULT_DAMP,
    block_size: int = 128,
    group_aware: bool = False,
) -> GPTQResult:
    """Quantize ``weight`` [N, K] given the layer-input Hessian [K, K].

    Groups are consecutive in processing order; with act-order that order is
    argsort(diag(H), descending) and g_idx maps each original column to its group.
    With ``group_aware`` (ignored under act-order) groups keep their original
    columns and only the solving order changes (see ``group_aware_order``).
    A partial last group is allowed (ceil(K / group_size) groups).
    """
    check_bits(bits)
    if not damp > 0:
        raise ValueError(f"damp must be positive, got {damp}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    w, h, dead = _working_copies(weight, hessian)
    n, k = w.shape
    width = check_group_size(group_size, k)

    perm = group_order = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
    elif group_aware:
        perm, group_order = group_aware_order(torch.diag(h), width)
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]

    hinv, damp_used, retries = _inverse_hessian_factor(h, damp)

    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    n_groups = (k + width - 1) // width
    scales = torch.zeros(n_groups, n, dtype=torch.float32, device=w.device)
    zeros = torch.zeros(n_groups, n, dtype=torch.float32, device=w.device)
    losses = torch.zeros(n, k, dtype=torch.float32, device=w.device)
    scale = zero = None

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % width == 0:
                # the grid sees the weights after all earlier error feedback, including the
                # lazily deferred part for group columns that lie beyond this block
                need = min(width, k - col)
                group_cols = w1[:, i : i + need]
                extra = need - group_cols.shape[1]
                if extra > 0:
                    pending = err1[:, :i] @ hinv[i1:col, i2 : i2 + extra]
                    group_cols = torch.cat([group_cols, w[:, i2 : i2 + extra] - pending], dim=1)
                scale, zero = gptq_grid(group_cols, bits, sym)
                scales[col // width] = scale
                zeros[col // width] = zero
            column = w1[:, i]
            d = hinv1[i, i]
            q = quantize_to_codes(column.unsqueeze(1), scale, zero, bits).squeeze(1)
            codes[:, col] = q.to(torch.uint8)
            deq = dequantize_codes(q.unsqueeze(1), scale, zero).squeeze(1)
            losses[:, col] = (column - deq) ** 2 / d**2 / 2
            err = (column - deq) / d
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    group_of_position = torch.arange(k, device=w.device) // width
    g_idx = group_of_position
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if group_order is None:
            g_idx = group_of_position[invperm]
        else:  # the p-th group solved is original group group_order[p]
            solved = len(group_order)
            scales[:solved] = scales[:solved][torch.argsort(group_order)]
            zeros[:solved] = zeros[:solved][torch.argsort(group_order)]
    g_idx = g_idx.to(torch.int32)
    zeros_int = zeros.to(torch.int32)
    return GPTQResult(
        qweight_int=codes,
        scales=scales,
        zeros=zeros_int,
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
        weight=dequantize_grouped(codes, scales, zeros_int, g_idx),
        damp=damp_used,
        damp_requested=damp,
        damp_retries=retries,
        loss=float(losses.sum()),
        dead_columns=int(dead.sum()),
        perm=perm,
    )


def gptq_fixed_grid(
    weight: Tensor, hessian: Tensor, round_column: Callable[[Tensor], Tensor], damp: float = DEFAULT_DAMP, block_size: int = 128
) -> tuple[Tensor, float]:
    """GPTQ's solve on a grid fixed before it starts, the same for every column (one scale per row, e.g.
    FP8's): ``round_column`` rounds a column [N] to the grid. With no groups, the columns are solved in
    descending diag(H) (act-order) at no cost to the layout. Returns the rounded weight and GPTQ's loss."""
    w, h, _ = _working_copies(weight, hessian)
    k = w.shape[1]
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    hinv, _, _ = _inverse_hessian_factor(h, damp)
    rounded = torch.zeros_like(w)
    loss = 0.0
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = w1[:, i]
            deq = round_column(column)
            rounded[:, i1 + i] = deq
            err = (column - deq) / hinv1[i, i]
            loss += float((err**2).sum()) / 2
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return rounded[:, torch.argsort(perm)], loss
