"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales, then weight clipping.

Pure functions. Anything that needs the model ("run the block with these
weights") comes in as a callable, so the search is testable on bare tensors.

Scale search (AutoAWQ ``_compute_best_scale`` / llm-awq ``auto_scale``): for
alpha on a grid over [0, 1], s = mean|x|^alpha (or the duo form
mean|x|^alpha / mean|w|^(1-alpha)), normalised by sqrt(max(s) * min(s)); the
candidate weights are Q(W * s) / s and the alpha with the lowest output MSE of
the inspected module wins. s = 1 (plain round-to-nearest) is always a candidate,
so the chosen scales never do worse than RTN on the calibration data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from qtune.quant import DEFAULT_BITS, DEFAULT_GROUP_SIZE
from qtune.quant.rtn import awq_grid, check_bits, check_group_size, dequantize_codes, quantize_to_codes


def check_awq_group_size(in_features: int, group_size: int, layer: str = "layer") -> int:
    """AWQ's GEMM layout needs whole groups: refuse a group size that doesn't divide K."""
    width = check_group_size(group_size, in_features)
    if in_features % width != 0:
        divisors = [g for g in (256, 128, 64, 32, 16) if in_features % g == 0]
        hint = f"; try group_size={divisors[0]}" if divisors else ""
        raise ValueError(f"AWQ needs group_size to divide in_features: {layer} has K={in_features}, group_size={group_size}{hint}")
    return width


def awq_fake_quantize(weight: Tensor, bits: int = DEFAULT_BITS, group_size: int = DEFAULT_GROUP_SIZE) -> Tensor:
    """AWQ-convention (asymmetric, no widening to 0) group-wise fake quantization of [N, K]."""
    n, k = weight.shape
    width = check_awq_group_size(k, group_size)
    groups = weight.float().reshape(-1, width)
    scale, zero = awq_grid(groups, bits)
    return dequantize_codes(quantize_to_codes(groups, scale, zero, bits), scale, zero).reshape(n, k)


def activation_mean(x: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Per-input-channel mean |x| over tokens, accumulated in float32. x: [..., K]."""
    if token_mask is not None:
        x = x[token_mask.to(torch.bool)]
    x = x.reshape(-1, x.shape[-1])
    return x.abs().float().mean(dim=0)


def weight_mean(weights: Sequence[Tensor], group_size: int) -> Tensor:
    """Per-input-channel mean of |w| normalised by each group's max |w| (AutoAWQ's w_mean)."""
    w = torch.cat([weight.float() for weight in weights], dim=0)
    k = w.shape[1]
    width = check_awq_group_size(k, group_size)
    groups = w.abs().reshape(-1, width)
    groups = groups / (groups.amax(dim=1, keepdim=True) + 1e-6)
    return groups.reshape(-1, k).mean(dim=0)


def candidate_scales(x_mean: Tensor, w_mean: Tensor | None, ratio: float) -> Tensor:
    """s for one grid point; ``w_mean`` None gives the original llm-awq form mean|x|^ratio."""
    x_mean = x_mean.float()
    if w_mean is None:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    else:
        s = (x_mean.pow(ratio) / (w_mean.float().pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


@dataclass
class AwqScaleSearch:
    scales: Tensor  # [K]: divide the previous op's output by it, multiply the linears' inputs columns by it
    ratio: float  # chosen alpha; -1.0 means s = 1 (plain RTN) won
    error: float  # inspected-module output MSE with the chosen scales
    rtn_error: float  # the same with s = 1
    errors: list[tuple[float, float]]  # (alpha, error) for every grid point tried


def search_scales(
    x_mean: Tensor,
    weights: Sequence[Tensor],
    evaluate: Callable[[list[Tensor]], float],
    bits: int = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    n_grid: int = 20,
    duo_scaling: bool = True,
) -> AwqScaleSearch:
    """Grid-search alpha; ``evaluate(candidate_weights)`` returns the inspected module's output MSE.

    ``weights`` are the balanced linears' [N_i, K] weights sharing the input x.
    """
    check_bits(bits)
    if n_grid < 2:
        raise ValueError(f"n_grid must be at least 2, got {n_grid}")
    k = x_mean.shape[0]
    for weight in weights:
        if weight.shape[1] != k:
            raise ValueError(f"weights must have {k} input features to match x_mean, got {tuple(weight.shape)}")
    w_mean = weight_mean(weights, group_size) if duo_scaling else None

    def error_for(s: Tensor) -> float:
        candidates = [awq_fake_quantize(w.float() * s, bits, group_size) / s for w in weights]
        return float(evaluate(candidates))

    ones = torch.ones_like(x_mean, dtype=torch.float32)
    rtn_error = error_for(ones)
    best = (rtn_error, -1.0, ones)
    errors: list[tuple[float, float]] = []
    for i in range(n_grid):
        ratio = i / (n_grid - 1)
        s = candidate_scales(x_mean, w_mean, ratio)
        err = error_for(s)
        errors.append((ratio, err))
        if err < best[0]:
            best = (err, ratio, s)
    return AwqScaleSearch(scales=best[2], ratio=best[1], error=best[0], rtn_error=rtn_error, errors=errors)


def search_clip(
    weight: Tensor,
    x: Tensor,
    bits: int = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = 512,
    rows_per_batch: int = 64,
) -> Tensor:
    """Per-(output row, group) clipping threshold [N, G] minimising the group's output MSE.

    x: [T, K] input activations (already divided by any AWQ scales). Thresholds are
    max|w| * (1 - i / n_grid) for i < max_shrink * n_grid.
    """
    n, k = weight.shape
    width = check_awq_group_size(k, group_size)
    x = x.reshape(-1, k).float()
    step = max(1, x.shape[0] // n_sample_tokens)
    x = x[::step].reshape(-1, k // width, width)  # [T, G, width]
    best_max = torch.empty(n, k // width, dtype=torch.float32, device=weight.device)
    for r0 in range(0, n, rows_per_batch):
        w = weight[r0 : r0 + rows_per_batch].float().reshape(-1, k // width, width)  # [n, G, width]
        org_out = torch.einsum("tgj,ngj->ntg", x, w)
        org_max = w.abs().amax(dim=-1, keepdim=True)  # [n, G, 1]
        best_err = torch.full(org_max.shape[:2], float("inf"), device=w.device)
        chosen = org_max.squeeze(-1).clone()
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            clipped = torch.maximum(torch.minimum(w, max_val), -max_val)
            q = awq_fake_quantize(clipped.reshape(clipped.shape[0], -1), bits, width).reshape(clipped.shape)
            err = (torch.einsum("tgj,ngj->ntg", x, q) - org_out).pow(2).mean(dim=1)  # [n, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            chosen = torch.where(better, max_val.squeeze(-1), chosen)
        best_max[r0 : r0 + rows_per_batch] = chosen
    return best_max


def apply_clip(weight: Tensor, max_val: Tensor) -> Tensor:
    """Clamp each (row, group) of ``weight`` [N, K] to +-max_val [N, G]."""
    n, k = weight.shape
    groups = max_val.shape[1]
    if k % groups != 0 or max_val.shape[0] != n:
        raise ValueError(f"max_val {tuple(max_val.shape)} does not fit weight {tuple(weight.shape)}")
    w = weight.float().reshape(n, groups, k // groups)
    limit = max_val.float().unsqueeze(-1)
    return torch.maximum(torch.minimum(w, limit), -limit).reshape(n, k).to(weight.dtype)
