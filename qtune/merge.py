"""Merging the adapter into a standard checkpoint, on the base that reproduces the adapter model best.

A QLoRA adapter was trained against dequant(NF4(W)), not W. Merging into the dequantized weights
reproduces the trained model; merging into the original weights drops the quantization noise the
adapter may have learned to compensate. Both are measured against the adapter model (mean per-token
KL on the validation split) and the closer one is kept, with the numbers recorded.

The merge streams: the base checkpoint is read one tensor at a time, dequant(NF4(W)) is rebuilt from W
with the very bitsandbytes calls that loading for training made, and the candidates are measured by
running them one decoder block at a time (``blockwise.StreamedModel``) on the validation rows. The
adapter model runs the same way first: peft's own LoRA layers, injected into a skeleton on the meta
device, over the rebuilt NF4 weights, one block at a time; only its head's inputs are kept. No stage
holds a whole model, 4-bit or float32, so the merge's memory does not grow with depth.

Everything is computed in float32 on every device, so the KL a merge reports means the same on a CPU
and on a GPU: it is the merged checkpoint's rounding to half precision, measured against the
adapter model's exact arithmetic (training itself computed in the compute dtype, bf16 on most GPUs).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from qtune import memory_plan, models, rundir
from qtune.blockwise import StreamedModel, TensorSource, release, skeleton
from qtune.checkpoint_files import copy_generation_config
from qtune.context import load_context
from qtune.errors import QtuneError, stage
from qtune.memory_plan import MERGE_MEASURE_TOKENS
from qtune.metrics import Divergence, ReferenceOutputs, capped, divergence_sum, streamed_outputs
from qtune.models import bnb_config, compute_dtype, device_map
from qtune.paths import atomic_dir, write_text_atomic
from qtune.recipe import ModelSection, QuantizationSection, parse_size
from qtune.shards import CheckpointReader, ShardedWriter

log = logging.getLogger(__name__)

MERGE_BASES = ("dequantized", "original")
KL_GATE = 1e-3


def measurement_rows(rows: Sequence[dict], budget: int = MERGE_MEASURE_TOKENS) -> list[dict]:
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
        if adapter in getattr(module, "lora_embedding_A", {}):
            raise ValueError(f"{name}: LoRA on an embedding is not supported by the merge; adapt linear layers only")
        if adapter not in module.lora_A:
            continue
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"{name}: LoRA on a transposed (Conv1D) weight is not supported by the merge")
        magnitude = None
        if module.use_dora.get(adapter):
            magnitude = module.lora_magnitude_vector[adapter].weight.detach().float().cpu()
        deltas[_hf_name(name)] = LoraDelta(
            module.lora_A[adapter].weight.detach().cpu().clone(),
            module.lora_B[adapter].weight.detach().cpu().clone(),
            float(module.scaling[adapter]),
            magnitude,
        )
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
            specs[key] = NF4Spec(weight.quant_type, weight.blocksize, weight.compress_statistics, weight.quant_storage, weight.quant_state.dtype, weight.device)
    return specs


def planned_nf4_specs(checkpoint: Path, model: ModelSection, quant: QuantizationSection, device: torch.device) -> dict[str, NF4Spec]:
    """``nf4_specs`` of the model that loading for training builds, without loading a weight: transformers'
    own bitsandbytes quantizer converts a meta skeleton, which says which linears became 4-bit and how;
    each was cast to the load dtype (the compute dtype) and quantized on ``device``."""
    from bitsandbytes.nn import Linear4bit
    from transformers.quantizers import AutoHfQuantizer

    if not quant.load_in_4bit:
        return {}
    dtype = compute_dtype(quant)
    planned = skeleton(checkpoint, model.trust_remote_code, model.attn_implementation)
    AutoHfQuantizer.from_config(bnb_config(quant), pre_quantized=False).preprocess_model(planned, dtype=dtype, device_map=device_map())
    return {
        f"{name}.weight": NF4Spec(m.weight.quant_type, m.weight.blocksize, m.weight.compress_statistics, m.weight.quant_storage, dtype, torch.device(device))
        for name, m in planned.named_modules()
        if isinstance(m, Linear4bit)
    }


def nf4_roundtrip(weight: Tensor, spec: NF4Spec) -> Tensor:
    """dequant(NF4(W)) exactly as the training forward saw it: the same cast, the same Params4bit
    quantization on the same device (as transformers' loader does it), the same dequantize."""
    import bitsandbytes as bnb

    param = bnb.nn.Params4bit(
        weight.to(spec.dtype),
        requires_grad=False,
        quant_type=spec.quant_type,
        blocksize=spec.blocksize,
        compress_statistics=spec.compress_statistics,
        quant_storage=spec.quant_storage,
    ).to(spec.device)
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


@dataclass
class StreamedAdapter:
    """The adapter model as a ``StreamedModel``: peft's LoRA layers injected into the meta skeleton, their
    factors kept aside (they are small) and given back each time a block loads."""

    streamed: StreamedModel
    lora: dict[str, Tensor]  # the skeleton's LoRA tensors by state-dict name
    deltas: dict[str, LoraDelta]

    def source(self, specs: dict[str, NF4Spec]) -> TensorSource:
        """State-dict name -> tensor for the adapter model: LoRA factors as saved, base weights rebuilt
        as dequant(NF4(W)) where training quantized them."""
        streamed = self.streamed

        def tensor(name: str) -> Tensor:
            if name in self.lora:
                return self.lora[name]
            stored = streamed.head_source_name(name.replace(".base_layer.", "."))
            weight = streamed.reader.get(stored)
            plain = name.replace(".base_layer.", ".")
            return nf4_roundtrip(weight, specs[plain]) if plain in specs else weight

        return tensor


def _saved_lora_name(model_key: str, adapter: str) -> tuple[str, ...]:
    """Where peft's adapter file keeps a LoRA tensor of the injected model (the adapter name dropped,
    peft's prefix added; DoRA's magnitude is saved without its ``.weight``)."""
    head, _, leaf = model_key.rpartition(".")
    key = f"{head.removesuffix('.' + adapter)}.{leaf}" if head.endswith("." + adapter) else head if leaf == adapter else model_key
    return f"base_model.model.{key}", f"base_model.model.{key.removesuffix('.weight')}"


def streamed_adapter(checkpoint: Path, adapter_dir: Path, device: torch.device | str, model: ModelSection) -> StreamedAdapter:
    """The trained adapter on a meta skeleton of the base (no base weight is loaded)."""
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file

    streamed = StreamedModel(checkpoint, device, torch.float32, model.trust_remote_code, model.attn_implementation)
    config = PeftConfig.from_pretrained(adapter_dir)
    if getattr(config, "modules_to_save", None):
        raise ValueError(f"the adapter in {adapter_dir} saves whole modules (modules_to_save); the merge takes LoRA layers only")
    peft_model = PeftModel(streamed.model, config, low_cpu_mem_usage=True).eval()  # LoRA layers on the meta device
    saved = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    lora = {}
    for name in streamed.model.state_dict(keep_vars=True):
        if any(f".{part}." in f".{name}." for part in ("lora_A", "lora_B", "lora_magnitude_vector")):
            found = [key for key in _saved_lora_name(name, peft_model.active_adapter) if key in saved]
            if not found:
                raise ValueError(f"{adapter_dir}/adapter_model.safetensors lacks {name}, which its adapter config implies")
            lora[name] = saved.pop(found[0])
    if saved:
        raise ValueError(f"{adapter_dir}/adapter_model.safetensors holds tensors its adapter config does not explain, e.g. {next(iter(saved))}")
    streamed.model.load_state_dict(lora, strict=False, assign=True)  # the factors alone, for lora_deltas
    deltas = lora_deltas(peft_model)
    release(streamed.model)
    return StreamedAdapter(streamed, lora, deltas)


def candidate_source(
    base_name: str, reader: CheckpointReader, specs: dict[str, NF4Spec], deltas: dict[str, LoraDelta], dtype: torch.dtype
) -> Callable[[str], Tensor]:
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
def measure_candidates(streamed: StreamedModel, sources: dict[str, Callable[[str], Tensor]], reference: ReferenceOutputs) -> dict[str, Divergence]:
    """Each candidate's divergence from the reference, each candidate run one decoder block at a time from
    its source (a function of the checkpoint's tensor names)."""
    results = {}
    for name, source in sources.items():
        hidden = streamed.final_hidden(reference.batches, source)
        head = streamed.output_head(source)

        def candidate_logits(index: int, batch: dict, hidden=hidden, head=head) -> Callable[[Tensor], Tensor]:
            flat = hidden[index].flatten(0, 1)
            return lambda positions: capped(head(flat[positions.to(flat.device)]), reference.cap)

        try:
            results[name] = divergence_sum(reference, candidate_logits)
        finally:
            release(head)
        del hidden
    return results


def output_names(streamed: StreamedModel) -> list[str]:
    """The tensors a merged checkpoint holds, in the model's state-dict order (a tied head is not stored)."""
    names = [n for n in streamed.model.state_dict(keep_vars=True) if not (n == "lm_head.weight" and streamed.tied)]
    missing = [n for n in names if streamed.head_source_name(n) not in streamed.reader]
    if missing:
        raise ValueError(f"the base checkpoint lacks {len(missing)} tensor(s) its model needs, e.g. {missing[0]}")
    return names


def write_merged(streamed: StreamedModel, source: Callable[[str], Tensor], dtype: torch.dtype, folder: Path, max_shard_bytes: int) -> list[str]:
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


@dataclass
class MergeResult:
    folder: Path
    report: MergeReport


def merge_run(run_dir: Path) -> MergeResult:
    """Merge the run's adapter into a standard HF checkpoint in run_dir/merged."""
    run_dir = run_dir.resolve()
    with stage("merge", run_dir):
        rundir.remove_staging(run_dir)
        return _merge_run(run_dir)


def _merge_run(run_dir: Path) -> MergeResult:
    adapter_dir = run_dir / rundir.ADAPTER_DIR
    rundir.load_run_recipe(run_dir)  # a clear error when run_dir is not a run directory at all
    if not adapter_dir.is_dir():
        raise QtuneError(f"{run_dir} has no trained adapter yet; run qtune train first")
    context = load_context(run_dir)
    loaded, checkpoint, tokenizer = context.loaded, context.checkpoint, context.tokenizer
    memory_plan.log_stage(loaded, "merge")
    recipe = loaded.recipe
    rows = measurement_rows(context.held_out_rows())
    if not rows:
        raise QtuneError("merging needs held-out rows to compare the merge bases; give the recipe a validation split")

    device = models.device()
    specs = planned_nf4_specs(checkpoint, recipe.model, recipe.quantization, device)
    try:
        adapter = streamed_adapter(checkpoint, adapter_dir, device, recipe.model)
    except ValueError as exc:
        raise QtuneError(str(exc)) from None
    if not adapter.deltas:
        raise QtuneError(f"the adapter in {adapter_dir} has no LoRA layers to merge")
    reference = streamed_outputs(adapter.streamed, rows, tokenizer.pad_token_id, adapter.source(specs))
    deltas = adapter.deltas
    del adapter

    streamed = StreamedModel(checkpoint, device, torch.float32, recipe.model.trust_remote_code, recipe.model.attn_implementation)
    dtype = choose_dtype(recipe.output.merge_dtype, config_dtype(checkpoint), lambda: checkpoint_absmax(streamed.reader))
    bases = MERGE_BASES if recipe.output.merge_base == "auto" else (recipe.output.merge_base,)
    if not specs:
        bases = ("original",)  # an unquantized base has no dequantized variant
    sources = {name: candidate_source(name, streamed.reader, specs, deltas, dtype) for name in bases}
    scores = measure_candidates(streamed, sources, reference)
    for name, score in scores.items():
        log.info("merge into the %s base: KL %.3g nats/token, top-1 agreement %.4f", name, score.mean_kl, score.top1_agreement)
    del reference
    chosen = min(scores, key=lambda name: scores[name].mean_kl)
    report = MergeReport(
        chosen=chosen,
        dtype=str(dtype).removeprefix("torch."),
        kl={k: v.mean_kl for k, v in scores.items()},
        top1={k: v.top1_agreement for k, v in scores.items()},
        tokens=scores[chosen].tokens,
    )
    with atomic_dir(run_dir / rundir.MERGED_DIR, overwrite=True) as staging:
        write_merged(streamed, sources[chosen], dtype, staging, parse_size(recipe.output.max_shard_size))
        write_merged_config(checkpoint, dtype, staging, recipe.model.trust_remote_code)
        tokenizer.save_pretrained(staging)
    write_text_atomic(run_dir / rundir.MERGE_REPORT, json.dumps(report.as_dict(), indent=2))
    if not report.passes:
        log.warning("the merged model differs from the adapter model by %.3g nats/token (gate %.0e)", report.kl[chosen], report.gate)
    log.info("merged into the %s base (%s)", chosen, report.dtype)
    return MergeResult(run_dir / rundir.MERGED_DIR, report)
