"""Merging the adapter into a standard checkpoint, on the base that reproduces the adapter model best.

A QLoRA adapter was trained against dequant(NF4(W)), not W. Merging into the dequantized weights
reproduces the trained model; merging into the original weights drops the quantization noise the
adapter may have learned to compensate. Both are measured against the adapter model (mean per-token
KL on the validation split) and the closer one is kept, with the numbers recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from qtune.evaluate import Divergence, divergence

log = logging.getLogger(__name__)

MERGE_BASES = ("dequantized", "original")
KL_GATE = 1e-3


@dataclass
class LoraDelta:
    delta: torch.Tensor
    magnitude: torch.Tensor | None = None  # DoRA's per-row magnitude vector


@dataclass
class MergeReport:
    chosen: str
    dtype: str
    kl: dict[str, float] = field(default_factory=dict)
    top1: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    gate: float = KL_GATE

    @property
    def passes(self) -> bool:
        return self.kl[self.chosen] <= self.gate

    def as_dict(self) -> dict:
        return {**asdict(self), "passes": self.passes}


def _hf_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.")


def lora_deltas(peft_model) -> dict[str, LoraDelta]:
    """Each LoRA layer's weight update (scaling · B·A), in float32, keyed by the HF module name."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapter = module.active_adapters[0]
        if adapter not in module.lora_A:
            continue
        delta = module.get_delta_weight(adapter).detach().float().cpu()
        magnitude = None
        if module.use_dora.get(adapter):
            magnitude = module.lora_magnitude_vector[adapter].weight.detach().float().cpu()
        deltas[_hf_name(name)] = LoraDelta(delta, magnitude)
    return deltas


def dequantized_weights(model) -> dict[str, torch.Tensor]:
    """Every 4-bit linear's weight as the adapter model saw it: dequant(NF4(W)), in float32."""
    import bitsandbytes as bnb
    from bitsandbytes.nn import Linear4bit

    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            w = module.weight
            weights[_hf_name(name).removesuffix(".base_layer")] = bnb.functional.dequantize_4bit(w.data, w.quant_state).float().cpu()
    return weights


def apply_deltas(weights: dict[str, torch.Tensor], deltas: dict[str, LoraDelta]) -> dict[str, torch.Tensor]:
    """W + ΔW for every adapted module (DoRA: m · (W + ΔW) / ‖W + ΔW‖ per output row)."""
    merged = {}
    for module_name, lora in deltas.items():
        key = f"{module_name}.weight"
        combined = weights[key].float() + lora.delta
        if lora.magnitude is not None:
            combined = combined * (lora.magnitude / torch.linalg.norm(combined, dim=1)).unsqueeze(1)
        merged[key] = combined
    return merged


def candidate_state(base_name: str, original: dict[str, torch.Tensor], dequantized: dict[str, torch.Tensor], deltas: dict[str, LoraDelta]) -> dict[str, torch.Tensor]:
    weights = dict(original)
    if base_name == "dequantized":
        weights.update({f"{name}.weight": w for name, w in dequantized.items()})
    weights.update(apply_deltas(weights, deltas))
    return weights


def choose_dtype(requested: str, config_dtype: torch.dtype | None, weights: dict[str, torch.Tensor]) -> torch.dtype:
    """fp16 keeps three more mantissa bits than bf16, so it is preferred whenever every weight fits its range."""
    if requested != "auto":
        return getattr(torch, requested)
    if config_dtype in (torch.float16, torch.bfloat16):
        return config_dtype
    fits_fp16 = all(w.abs().max().item() < 60000 for w in weights.values() if w.is_floating_point() and w.numel())
    return torch.float16 if fits_fp16 else torch.bfloat16


def rounded(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in weights.items()}


def measure_bases(
    adapter_model,
    full_model,
    original: dict[str, torch.Tensor],
    dequantized: dict[str, torch.Tensor],
    deltas: dict[str, LoraDelta],
    rows: Sequence[dict],
    pad_token_id: int,
    dtype: torch.dtype,
    bases: Sequence[str] = MERGE_BASES,
) -> dict[str, Divergence]:
    """Load each candidate merge (rounded to the output dtype) into ``full_model`` and score it against the adapter model."""
    results = {}
    for base_name in bases:
        state = rounded(candidate_state(base_name, original, dequantized, deltas), dtype)
        full_model.load_state_dict(state, strict=False)
        results[base_name] = divergence(adapter_model, full_model, rows, pad_token_id)
        log.info("merge into the %s base: KL %.3g nats/token, top-1 agreement %.4f", base_name,
                 results[base_name].mean_kl, results[base_name].top1_agreement)
    return results
