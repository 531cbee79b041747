"""Merging the adapter into a standard checkpoint, on the base that reproduces the adapter model best.

A QLoRA adapter was trained against dequant(NF4(W)), not W. Merging into the dequantized weights
reproduces the trained model; merging into the original weights drops the quantization noise the
adapter may have learned to compensate. Both are measured against the adapter model (mean per-token
KL on the validation split) and the closer one is kept, with the numbers recorded.

The merge streams: the base checkpoint is read one tensor at a time, dequant(NF4(W)) is rebuilt from W
with the very bitsandbytes calls that loading for training made, and the candidates are measured by
running them one decoder block at a time (``blockwise.StreamedModel``) on the validation rows. The
adapter model runs once first and only its head's inputs are kept (``evaluate.model_reference``), so
no stage holds a whole model in float32, or the adapter model and a candidate at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from qtune.blockwise import StreamedModel, release
from qtune.checkpoint_files import copy_generation_config
from qtune.evaluate import Divergence, ReferenceOutputs, divergence_sum
from qtune.shards import CheckpointReader, ShardedWriter

log = logging.getLogger(__name__)

MERGE_BASES = ("dequantized", "original")
KL_GATE = 1e-3
MEASURE_TOKENS = 32768  # held-out tokens the bases are compared on (their hidden states: 512 MB each at H=4096)


def measurement_rows(rows: Sequence[dict], budget: int = MEASURE_TOKENS) -> list[dict]:
    """The first held-out rows that fit in ``budget`` tokens (at least one)."""
    kept, total = [], 0
    for row in rows:
        total += len(row["input_ids"])
        if kept and total > budget:
            break
        kept.append(row)
    return kept


@dataclass
class LoraDelta:
    """One adapted linear's LoRA factors; the dense update is formed only when its tensor is merged."""

    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]
    scaling: float
    magnitude: torch.Tensor | None = None  # DoRA's per-row magnitude vector

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """scaling · B·A in float32, computed as peft's get_delta_weight computes it."""
        a, b = self.lora_a.to(device), self.lora_b.to(device)
        if a.dtype in (torch.float16, torch.bfloat16) and a.device.type == "cpu":
            return ((b.float() @ a.float()) * self.scaling).to(a.dtype).float()
        return ((b @ a) * self.scaling).float()


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
    """Each LoRA layer's factors (a few MB in all, never the dense updates), keyed by the HF module name."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapter = module.active_adapters[0]
        if adapter not in module.lora_A:
            continue
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"{name}: LoRA on a transposed (Conv1D) weight is not supported by the merge")
        magnitude = None
        if module.use_dora.get(adapter):
            magnitude = module.lora_magnitude_vector[adapter].weight.detach().float().cpu()
        deltas[_hf_name(name)] = LoraDelta(module.lora_A[adapter].weight.detach().cpu().clone(),
                                           module.lora_B[adapter].weight.detach().cpu().clone(),
                                           float(module.scaling[adapter]), magnitude)
    return deltas


@dataclass(frozen=True)
class NF4Spec:
    """How bitsandbytes quantized one linear when the base was loaded for training."""

    quant_type: str
    blocksize: int
    compress_statistics: bool
    quant_storage: torch.dtype
    dtype: torch.dtype  # the dtype the weight was cast to before quantizing (the compute dtype)
    device: torch.device  # where it was quantized


def nf4_specs(model) -> dict[str, NF4Spec]:
    """Checkpoint weight name -> NF4Spec, for every 4-bit linear of a loaded (adapter) model."""
    from bitsandbytes.nn import Linear4bit

    specs = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            weight = module.weight
            key = f"{_hf_name(name).removesuffix('.base_layer')}.weight"
            specs[key] = NF4Spec(weight.quant_type, weight.blocksize, weight.compress_statistics, weight.quant_storage,
                                 weight.quant_state.dtype, weight.device)
    return specs


def nf4_roundtrip(weight: Tensor, spec: NF4Spec) -> Tensor:
    """dequant(NF4(W)) exactly as the training forward saw it: the same cast, the same Params4bit
    quantization on the same device (as transformers' loader does it), the same dequantize."""
    import bitsandbytes as bnb

    param = bnb.nn.Params4bit(weight.to(spec.dtype), requires_grad=False, quant_type=spec.quant_type,
                              blocksize=spec.blocksize, compress_statistics=spec.compress_statistics,
                              quant_storage=spec.quant_storage).to(spec.device)
    return bnb.functional.dequantize_4bit(param.data, param.quant_state)


def apply_delta(weight: Tensor, lora: LoraDelta) -> Tensor:
    """W + ΔW in float32 (DoRA: m · (W + ΔW) / ‖W + ΔW‖ per output row)."""
    combined = weight.float() + lora.delta(weight.device)
    if lora.magnitude is not None:
        magnitude = lora.magnitude.to(weight.device)
        combined = combined * (magnitude / torch.linalg.norm(combined, dim=1)).unsqueeze(1)
    return combined


def apply_deltas(weights: dict[str, Tensor], deltas: dict[str, LoraDelta]) -> dict[str, Tensor]:
    """``apply_delta`` for every adapted module of a state dict."""
    return {f"{name}.weight": apply_delta(weights[f"{name}.weight"], lora) for name, lora in deltas.items()}


def candidate_source(base_name: str, reader: CheckpointReader, specs: dict[str, NF4Spec],
                     deltas: dict[str, LoraDelta], dtype: torch.dtype) -> Callable[[str], Tensor]:
    """Tensor name -> that tensor of the merge on ``base_name``, already in the output dtype."""

    def tensor(name: str) -> Tensor:
        weight = reader.get(name)
        if not weight.is_floating_point():
            return weight
        if base_name == "dequantized" and name in specs:
            weight = nf4_roundtrip(weight, specs[name])
        lora = deltas.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if lora is not None:
            weight = apply_delta(weight, lora)
        return weight.to(dtype)

    return tensor


def choose_dtype(requested: str, config_dtype: torch.dtype | None, absmax: Callable[[], float]) -> torch.dtype:
    """The checkpoint's own half-precision dtype when it has one; otherwise fp16, which keeps three more
    mantissa bits than bf16, whenever every weight fits its range (``absmax`` is only called then)."""
    if requested != "auto":
        return getattr(torch, requested)
    if config_dtype in (torch.float16, torch.bfloat16):
        return config_dtype
    return torch.float16 if absmax() < 60000 else torch.bfloat16


def checkpoint_absmax(reader: CheckpointReader) -> float:
    """The largest magnitude of any floating tensor in the checkpoint, one tensor at a time."""
    largest = 0.0
    for name in reader.keys():
        tensor = reader.get(name)
        if tensor.is_floating_point() and tensor.numel():
            largest = max(largest, tensor.abs().max().item())
    return largest


def config_dtype(checkpoint: Path) -> torch.dtype | None:
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


@torch.no_grad()
def measure_candidates(streamed: StreamedModel, sources: dict[str, Callable[[str], Tensor]],
                       reference: ReferenceOutputs) -> dict[str, Divergence]:
    """Each candidate's divergence from the adapter model, each run one decoder block at a time."""
    results = {}
    for name, source in sources.items():
        hidden = streamed.final_hidden(reference.batches, source)
        head = streamed.output_head(source)

        def candidate_logits(index: int, batch: dict, hidden=hidden, head=head) -> Callable[[Tensor], Tensor]:
            flat = hidden[index].flatten(0, 1)
            return lambda positions: head(flat[positions.to(flat.device)])

        try:
            results[name] = divergence_sum(reference, candidate_logits)
        finally:
            release(head)
        del hidden
        log.info("merge into the %s base: KL %.3g nats/token, top-1 agreement %.4f", name, results[name].mean_kl,
                 results[name].top1_agreement)
    return results


def output_names(streamed: StreamedModel) -> list[str]:
    """The tensors a merged checkpoint holds, in the model's state-dict order (a tied head is not stored)."""
    names = [n for n in streamed.model.state_dict(keep_vars=True) if not (n == "lm_head.weight" and streamed.tied)]
    missing = [n for n in names if streamed.head_source_name(n) not in streamed.reader]
    if missing:
        raise ValueError(f"the base checkpoint lacks {len(missing)} tensor(s) its model needs, e.g. {missing[0]}")
    return names


def write_merged(streamed: StreamedModel, source: Callable[[str], Tensor], dtype: torch.dtype, folder: Path,
                 max_shard_bytes: int) -> list[str]:
    """Stream the chosen merge (``source``, already in ``dtype``) into safetensors shards in ``folder``;
    returns the shard file names."""
    names = output_names(streamed)
    entries = []
    for name in names:
        stored = streamed.head_source_name(name)
        kept = streamed.reader.dtype(stored)
        entries.append((name, dtype if kept.is_floating_point else kept, streamed.reader.shape(stored)))
    writer = ShardedWriter(folder, entries, max_shard_bytes)
    for name in names:
        writer.add(name, source(streamed.head_source_name(name)))
    return writer.close()


def write_merged_config(checkpoint: Path, dtype: torch.dtype, folder: Path, trust_remote_code: bool = False) -> None:
    """The base's config (with the merged dtype) and generation config, as save_pretrained writes them."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    config.dtype = dtype
    config.save_pretrained(folder)
    copy_generation_config(checkpoint, folder, config)
