"""``quant: auto``: each GGUF tensor's type chosen to lose the least on the user's data within a size budget.

1. **Error per tensor and type.** Each quantized tensor is encoded with every candidate type (by ggml's
   own encoders, so the error is the file's): the imatrix-weighted squared error
   sum_j imatrix_j * (w_ij - q(w)_ij)^2, the expected growth of the layer's squared output error on the
   calibration activations. It is estimated on an even sample of the rows and scaled up.
2. **Errors to KL.** One number per tensor category (attn_q, attn_v, ffn_down, token_embd, ...) turns
   that error into end-to-end KL: the KL on calibration rows of the model with that category alone
   quantized to a probe type, over its summed error. A tensor's predicted cost is its category's factor
   times its error; a mix's, their sum.
3. **Allocation.** Every tensor starts at its cheapest candidate; then, while the budget allows, the
   upgrade with the largest predicted KL saved per extra byte is taken (greedy marginal gain).
4. **Check.** The chosen mix is run on the calibration rows: its measured KL beside the predicted one.

The model runs one decoder block at a time (``blockwise.StreamedModel``); nothing holds it whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qtune.formats.gguf.layout import tensor_nbytes
from qtune.formats.gguf.mixes import allows_quantization, override_type, tensor_category
from qtune.quant.ggml_quants import dequantize, quantize

log = logging.getLogger(__name__)

Q = GGMLQuantizationType

# Rows a multiple of 256 take the k-quants and IQ4_XS; rows a multiple of 32 only the 32-wide types.
CANDIDATES = (Q.Q2_K, Q.Q3_K, Q.IQ4_XS, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0)
NARROW_CANDIDATES = (Q.Q4_0, Q.IQ4_NL, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
PROBE_TYPES = (Q.Q3_K, Q.Q4_0)  # the category probe: the first that fits a tensor's rows
SAMPLE_FRACTION = 8  # one row in this many is encoded to estimate a tensor's error (at least MIN_SAMPLE_ROWS)
MIN_SAMPLE_ROWS = 64


def candidates(n_per_row: int) -> tuple[GGMLQuantizationType, ...]:
    if n_per_row % 256 == 0:
        return CANDIDATES
    return NARROW_CANDIDATES if n_per_row % 32 == 0 else ()


def fits(qtype: GGMLQuantizationType, n_per_row: int) -> bool:
    return n_per_row % GGML_QUANT_SIZES[qtype][0] == 0


@dataclass
class TensorCost:
    """A tensor's size under each candidate type and its imatrix-weighted squared error (whole tensor)."""

    name: str
    category: str
    nbytes: dict[GGMLQuantizationType, int]
    error: dict[GGMLQuantizationType, float]


def round_trip(rows: torch.Tensor, qtype: GGMLQuantizationType, importance: torch.Tensor | None) -> torch.Tensor:
    """``rows`` encoded by ggml's ``qtype`` (importance-weighted where given) and decoded again."""
    return dequantize(quantize(rows, qtype, importance), qtype, rows.shape[1])


def weighted_error(rows: torch.Tensor, qtype: GGMLQuantizationType, importance: torch.Tensor | None) -> float:
    """sum over rows and columns of importance_j * (w - q(w))^2, with q ggml's encoding of ``qtype``."""
    back = round_trip(rows, qtype, importance)
    squared = (rows - back).double().square()
    return float((squared * importance.double()).sum() if importance is not None else squared.sum())


def sample_rows(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """An even sample of a 2-D tensor's rows and the factor that scales their error to the whole tensor."""
    rows = weight.reshape(-1, weight.shape[-1])
    count = min(rows.shape[0], max(MIN_SAMPLE_ROWS, rows.shape[0] // SAMPLE_FRACTION))
    index = torch.linspace(0, rows.shape[0] - 1, count).round().long().unique()
    return rows[index], rows.shape[0] / index.numel()


def tensor_cost(name: str, weight: torch.Tensor, importance: torch.Tensor | None, types: Sequence[GGMLQuantizationType]) -> TensorCost:
    sample, scale = sample_rows(weight)
    shape = tuple(weight.shape)
    return TensorCost(
        name,
        tensor_category(name),
        {t: tensor_nbytes(t, shape) for t in types},
        {t: scale * weighted_error(sample, t, importance) for t in types},
    )


def predicted_kl(costs: Sequence[TensorCost], factors: dict[str, float], types: dict[str, GGMLQuantizationType]) -> float:
    return sum(factors.get(c.category, 0.0) * c.error[types[c.name]] for c in costs)


def allocate(costs: Sequence[TensorCost], factors: dict[str, float], budget_bytes: int) -> dict[str, GGMLQuantizationType]:
    """Types within ``budget_bytes`` of tensor data: each tensor from its cheapest candidate, then the
    upgrade saving the most predicted KL per extra byte, while one fits. ValueError when even the
    cheapest mix does not fit."""
    chosen = {c.name: min(c.nbytes, key=c.nbytes.__getitem__) for c in costs}
    used = sum(c.nbytes[chosen[c.name]] for c in costs)
    if used > budget_bytes:
        raise ValueError(f"the smallest mix of the candidate types takes {used:,} bytes of tensor data, over the budget of {budget_bytes:,}")
    loss = {c.name: {t: factors.get(c.category, 0.0) * e for t, e in c.error.items()} for c in costs}
    while True:
        best: tuple[float, TensorCost, GGMLQuantizationType] | None = None
        for c in costs:
            now = chosen[c.name]
            for t, size in c.nbytes.items():
                extra = size - c.nbytes[now]
                saved = loss[c.name][now] - loss[c.name][t]
                if extra <= 0 or saved <= 0 or used + extra > budget_bytes:
                    continue
                if best is None or saved / extra > best[0]:
                    best = (saved / extra, c, t)
        if best is None:
            return chosen
        _, c, t = best
        used += c.nbytes[t] - c.nbytes[chosen[c.name]]
        chosen[c.name] = t


@dataclass
class AutoMix:
    """The chosen type of every quantized tensor and what it is expected to cost."""

    types: dict[str, GGMLQuantizationType]
    budget_bytes: int
    tensor_bytes: int  # of the chosen mix, quantized tensors and the rest
    n_params: int
    predicted_kl: float
    measured_kl: float | None
    factors: dict[str, float] = field(default_factory=dict)  # KL per unit of weighted error, per category
    probe_kl: dict[str, float] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)  # tensors the user's tensor_types set

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / max(1, self.n_params)

    def as_dict(self) -> dict:
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t.name] = counts.get(t.name, 0) + 1
        return {
            "bits_per_weight": round(self.bits_per_weight, 4),
            "budget_bits_per_weight": round(8.0 * self.budget_bytes / max(1, self.n_params), 4),
            "predicted_kl": self.predicted_kl,
            "measured_kl_on_calibration": self.measured_kl,
            "kl_per_error_by_category": self.factors,
            "probe_kl_by_category": self.probe_kl,
            "types": {name: t.name for name, t in self.types.items()},
            "type_counts": counts,
            "fixed_by_tensor_types": self.fixed,
        }


def choose_mix(
    plan,
    importance: dict[str, torch.Tensor],
    budget_bytes: int,
    measure_kl: Callable[[dict[str, GGMLQuantizationType]], float],
    tensor_types: Sequence[tuple[str, GGMLQuantizationType]] = (),
    device: str | torch.device = "cpu",
) -> AutoMix:
    """The mix for a ``convert.GGUFTensors`` plan. ``importance``: the imatrix by GGUF name;
    ``budget_bytes``: all tensor data; ``measure_kl(types)``: the calibration KL of the model with the
    tensors named in ``types`` quantized to those types (the others exact); ``tensor_types``: the
    user's (regex, type) overrides, which are kept and paid for from the budget."""
    quantized = [n for n in plan.order if allows_quantization(n, plan.shapes[n])]
    fixed, manual_names, costs, fixed_bytes = {}, [], [], 0
    for name in quantized:
        shape = plan.shapes[name]
        manual = override_type(name, tensor_types)
        if manual is not None:
            if not fits(manual, shape[-1]):
                raise ValueError(f"tensor_types: {name} has rows of {shape[-1]}, not a multiple of {GGML_QUANT_SIZES[manual][0]} ({manual.name})")
            fixed[name] = manual
            manual_names.append(name)
            fixed_bytes += tensor_nbytes(manual, shape)
            continue
        types = candidates(shape[-1])
        if not types:  # rows not a multiple of 32: llama.cpp's fallback keeps such a tensor in F16
            fixed[name] = Q.F16
            fixed_bytes += tensor_nbytes(Q.F16, shape)
            continue
        costs.append(tensor_cost(name, plan.load(name, device), importance.get(name), types))
    unquantized = sum(tensor_nbytes(Q.F32, plan.shapes[n]) for n in plan.order if n not in quantized)
    n_params = plan.n_params

    probe_kl, factors = {}, {}
    for category in sorted({c.category for c in costs}):
        members = [c for c in costs if c.category == category]
        probe = {c.name: next(t for t in PROBE_TYPES if t in c.error) for c in members}
        probe_kl[category] = measure_kl(probe)
        total = sum(c.error[probe[c.name]] for c in members)
        factors[category] = max(probe_kl[category], 0.0) / total if total > 0 else 0.0
        log.info("auto mix: %-12s %3d tensor(s) at the probe type: KL %.4g", category, len(members), probe_kl[category])

    chosen = allocate(costs, factors, budget_bytes - fixed_bytes - unquantized)
    types = {**fixed, **chosen}
    measured = measure_kl(types)
    tensor_bytes = unquantized + sum(tensor_nbytes(t, plan.shapes[n]) for n, t in types.items())
    predicted = predicted_kl(costs, factors, chosen)
    log.info(
        "auto mix: %.3f bits/weight (budget %.3f), predicted KL %.4g, measured %.4g on the calibration rows",
        8 * tensor_bytes / n_params,
        8 * budget_bytes / n_params,
        predicted,
        measured,
    )
    return AutoMix(types, budget_bytes, tensor_bytes, n_params, predicted, measured, factors, probe_kl, manual_names)


def calibration_kl(plan, checkpoint, importance: dict[str, torch.Tensor], rows: list[dict], pad_token_id: int, device: str | torch.device):
    """``measure_kl`` for ``choose_mix``: the mean per-token KL, on ``rows``, of the checkpoint (run one
    block at a time in float32) with some tensors encoded and decoded by ggml's types, against itself.
    Each tensor is quantized in the checkpoint's own layout: ggml encodes rows independently, so the
    GGUF's reordered q/k rows give the same values."""
    from qtune.blockwise import StreamedModel
    from qtune.merge import measure_candidates
    from qtune.metrics import streamed_outputs

    # the reference keeps its own skeleton: a candidate's head is loaded into its model's lm_head module
    reference = streamed_outputs(StreamedModel(checkpoint, device, torch.float32), rows, pad_token_id)
    streamed = StreamedModel(checkpoint, device, torch.float32)
    gguf_name = {src.key: name for name, src in plan.sources.items()}

    def measure(types: dict[str, GGMLQuantizationType]) -> float:
        def source(key: str) -> torch.Tensor:
            tensor = streamed.reader.get(key)
            name = gguf_name.get(key)
            if name not in types:
                return tensor
            rows = tensor.to(device=device, dtype=torch.float32).reshape(-1, plan.shapes[name][-1])
            weights = importance.get(name)
            return round_trip(rows, types[name], None if weights is None else weights.to(rows.device)).reshape(tensor.shape)

        return measure_candidates(streamed, {"mix": source}, reference)["mix"].mean_kl

    return measure
