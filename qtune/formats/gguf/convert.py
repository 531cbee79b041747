"""HF checkpoint -> one GGUF file (llama.cpp): tensors, architecture metadata, tokenizer, chat template.

The tensors are quantized by qtune's own ggml quantizers (``qtune.quant.ggml_quants``), with the
per-tensor types of llama.cpp's mixes (``qtune.formats.gguf.mixes``), written in llama.cpp's tensor
order. Without an imatrix the result equals, tensor for tensor, what ``llama_model_quantize`` makes
from our F32 file. Supported architectures: those of ``qtune.architectures``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from qtune.architectures import Architecture
from qtune.cpu import fit_threads
from qtune.errors import QtuneError
from qtune.formats.gguf.layout import byte_shape, tensor_nbytes
from qtune.formats.gguf.mixes import Fallback, choose_types, explicit_types, llama_tensor_order, quant_mix
from qtune.formats.gguf.names import gguf_architecture, hf_to_gguf_name, hyperparameters, permute_for_rope, read_config
from qtune.formats.gguf.vocab import tokenizer_metadata
from qtune.formats.gguf.writer import write_atomically
from qtune.quant.ggml_quants import quantize
from qtune.quant.ggml_types import GGML_TYPES

Q = GGMLQuantizationType


@dataclass(frozen=True)
class TensorReport:
    name: str
    shape: tuple[int, ...]  # numpy order: [rows, n_per_row]
    qtype: str
    nbytes: int
    imatrix: bool  # quantized with importance weights

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / math.prod(self.shape)


@dataclass
class GGUFExportReport:
    path: Path
    quant: str
    file_type: int
    tensors: list[TensorReport] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    size_bytes: int = 0  # the whole file
    n_params: int = 0
    seconds: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        """Tensor data bits per parameter (llama.cpp's BPW)."""
        return 8.0 * sum(t.nbytes for t in self.tensors) / max(1, self.n_params)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.qtype] = counts.get(t.qtype, 0) + 1
        return counts

    def summary(self) -> str:
        types = ", ".join(f"{k} x{v}" for k, v in sorted(self.type_counts().items()))
        return (
            f"{self.path.name}: {self.quant}, {self.size_bytes / 2**20:.1f} MiB, {self.bits_per_weight:.2f} bpw, "
            f"{len(self.fallbacks)} fallbacks, {self.seconds:.1f} s ({types})"
        )


def export_gguf(
    checkpoint_dir: Path,
    output: Path,
    quant: str = "Q4_K_M",
    imatrix: dict[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    tensor_types: Sequence[tuple[str, GGMLQuantizationType]] = (),
    types: dict[str, GGMLQuantizationType] | None = None,
) -> GGUFExportReport:
    """Write ``checkpoint_dir`` (an HF safetensors checkpoint with its tokenizer) as one GGUF file.

    ``imatrix`` maps tensors (HF module names such as ``model.layers.0.mlp.down_proj`` or GGUF names
    such as ``blk.0.ffn_down.weight``) to per-input-column importances (mean x², ``qtune.imatrix``).
    ``tensor_types`` are the user's (regex, type) overrides of the mix, as llama-quantize's
    ``--tensor-type``; ``types`` gives every quantized tensor's type outright (``quant: auto``).
    The file is written under a temporary name beside ``output`` and renamed when complete.
    """
    with _gc_paused():
        return _write_gguf(checkpoint_dir, output, quant, imatrix, device, tensor_types, types)


@dataclass
class GGUFTensors:
    """What a checkpoint becomes in GGUF before any quantization: its tensors by GGUF name (each
    loaded on demand, in GGUF's layout), their numpy shapes, and llama.cpp's tensor order."""

    config: dict
    arch: Architecture
    hp: dict
    sources: dict[str, _Source]
    extra: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    order: list[str]

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    def load(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.extra[name] if name in self.extra else self.sources[name].load(device)

    def importance(self, imatrix: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """``imatrix`` (HF or GGUF names) by GGUF tensor name."""
        return _imatrix_by_gguf_name(imatrix, self.arch, self.shapes) if imatrix else {}

    def mix_settings(self, has_imatrix: bool) -> dict:
        """The model facts llama.cpp's mix rules read (``mixes.choose_types``' keyword arguments)."""
        hp = self.hp
        return dict(is_70b=self.arch.gguf_is_70b(hp["n_layer"], hp["n_head"], hp["n_head_kv"]), n_gqa=hp["n_head"] // hp["n_head_kv"], has_imatrix=has_imatrix)


def gguf_tensors(checkpoint_dir: Path) -> GGUFTensors:
    config = read_config(checkpoint_dir)
    arch = gguf_architecture(config)
    hp = hyperparameters(config)
    sources = _tensor_sources(checkpoint_dir, config, arch)
    extra = _extra_tensors(config, hp)
    shapes = {name: src.shape for name, src in sources.items()} | {n: tuple(t.shape) for n, t in extra.items()}
    return GGUFTensors(config, arch, hp, sources, extra, shapes, llama_tensor_order(shapes))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: the tokenizer's and the vocabulary's millions of small objects
    make each full pass cost ~0.1 s, several per export, and an export creates no cycles worth collecting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _write_gguf(
    checkpoint_dir: Path,
    output: Path,
    quant: str,
    imatrix: dict[str, torch.Tensor] | None,
    device: str | torch.device,
    tensor_types: Sequence[tuple[str, GGMLQuantizationType]],
    types: dict[str, GGMLQuantizationType] | None,
) -> GGUFExportReport:
    start = time.perf_counter()
    checkpoint_dir, output = Path(checkpoint_dir), Path(output)
    plan = gguf_tensors(checkpoint_dir)
    config, arch, hp, shapes, order = plan.config, plan.arch, plan.hp, plan.shapes, plan.order
    tokenizer_kv = tokenizer_metadata(checkpoint_dir, hp["vocab_size"])
    if types is None:
        mix = quant_mix(quant)
        choice = choose_types(mix.name, [(n, shapes[n]) for n in order], hp["n_layer"], tensor_types=tensor_types, **plan.mix_settings(bool(imatrix)))
    else:
        choice = explicit_types(quant, types, [(n, shapes[n]) for n in order])
        mix = choice.mix
    importance = plan.importance(imatrix)

    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_arch)
    _add_model_metadata(writer, config, checkpoint_dir, arch, hp)
    for key, (value, vtype, sub_type) in tokenizer_kv.items():
        writer.add_key_value(key, value, vtype, sub_type)
    # last and in this order, as llama_model_quantize re-sets them: its output is then byte-identical
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(mix.file_type))

    report = GGUFExportReport(path=output, quant=mix.name, file_type=int(mix.file_type), fallbacks=choice.fallbacks)
    for name in order:
        qtype, shape = choice.types[name], shapes[name]
        nbytes = tensor_nbytes(qtype, shape)
        writer.add_tensor_info(name, byte_shape(qtype, shape), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        report.n_params += math.prod(shape)

    def tensor_bytes() -> Iterator[np.ndarray]:
        for name in order:
            fit_threads()
            qtype, shape = choice.types[name], shapes[name]
            weight = plan.load(name, device)
            weights = importance.get(name)
            if not GGML_TYPES[qtype].uses_imatrix:
                weights = None
            rows = weight.reshape(-1, shape[-1]) if len(shape) > 1 else weight.reshape(1, -1)
            data = quantize(rows, qtype, None if weights is None else weights.to(rows.device))
            report.tensors.append(TensorReport(name, shape, qtype.name, data.numel(), weights is not None))
            yield data.cpu().numpy().reshape(-1)

    write_atomically(writer, output, tensor_bytes())
    report.size_bytes = output.stat().st_size
    report.seconds = time.perf_counter() - start
    return report


def _add_model_metadata(writer: gguf.GGUFWriter, config: dict, checkpoint_dir: Path, arch: Architecture, hp: dict) -> None:
    name = config.get("_name_or_path") or checkpoint_dir.name
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(str(name).rstrip("/").split("/")[-1])
    writer.add_block_count(hp["n_layer"])
    writer.add_context_length(hp["n_ctx"])
    writer.add_embedding_length(hp["n_embd"])
    writer.add_feed_forward_length(hp["n_ff"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_rope_freq_base(float(hp["rope"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(hp["eps"]))
    if config.get("head_dim") is not None:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    if hp["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp["rope"]["factor"]))
    swa = [kind == "sliding_attention" for kind in config.get("layer_types") or []]
    optional = {  # gguf-py's add_<key>; None: not written
        "vocab_size": hp["vocab_size"],
        "rope_dimension_count": hp["rope_dim"],
        "rope_scaling_orig_ctx_len": int(config.get("original_max_position_embeddings") or hp["n_ctx"]),
        "sliding_window": int(config.get("sliding_window") or 0),
        "attn_logit_softcapping": config.get("attn_logit_softcapping"),
        "final_logit_softcapping": config.get("final_logit_softcapping"),
        "rope_freq_base_swa": hp.get("rope_swa", {}).get("rope_theta"),
        # llama.cpp's default pattern unless the config's layers differ from it
        "sliding_window_pattern": swa if swa and swa != _default_swa(arch, len(swa)) else None,
    }
    for key in arch.gguf_keys:
        if optional[key] is not None:
            getattr(writer, f"add_{key}")(optional[key])


def _default_swa(arch: Architecture, n_layer: int) -> list[bool]:
    """llama.cpp's sliding-window layers by default: all but every ``gguf_swa_period``-th."""
    period = arch.gguf_swa_period or 1
    return [i % period < period - 1 for i in range(n_layer)]


@dataclass
class _Source:
    file: Path
    key: str
    shape: tuple[int, ...]
    permute_heads: int | None  # Q/K rows to reorder for llama.cpp's RoPE layout
    offset: float = 0.0  # added to a norm's weight (llama.cpp's norms scale by the weight itself)

    def load(self, device: str | torch.device) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt", device="cpu") as f:
            t = f.get_tensor(self.key)
        t = t.to(device=device, dtype=torch.float32)
        if self.permute_heads:
            t = permute_for_rope(t, self.permute_heads)
        if self.offset:
            t = t + self.offset
        return t.contiguous()


def _tensor_sources(checkpoint_dir: Path, config: dict, arch: Architecture) -> dict[str, _Source]:
    from safetensors import safe_open

    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({checkpoint_dir / f for f in weight_map.values()})
    elif (checkpoint_dir / "model.safetensors").is_file():
        files = [checkpoint_dir / "model.safetensors"]
    else:
        files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise QtuneError(f"{checkpoint_dir} has no .safetensors weights (GGUF export reads safetensors checkpoints)")
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    sources: dict[str, _Source] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                name = hf_to_gguf_name(key, config["model_type"])
                permute = arch.rope_heads(key, n_head, n_head_kv)
                offset = arch.norm_offset if key.endswith("norm.weight") else 0.0
                sources[name] = _Source(file, key, tuple(f.get_slice(key).get_shape()), permute, offset)
    if config.get("tie_word_embeddings", False):
        sources.pop("output.weight", None)
    if "token_embd.weight" not in sources:
        raise QtuneError(f"{checkpoint_dir} has no model.embed_tokens.weight")
    return sources


def _extra_tensors(config: dict, hp: dict) -> dict[str, torch.Tensor]:
    """llama3 RoPE scaling is a per-frequency factor tensor in GGUF (rope_freqs.weight)."""
    if hp["rope_type"] != "llama3":
        return {}
    rope, dim = hp["rope"], hp["head_dim"]
    freqs = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    # float32 tensor arithmetic per frequency, as llama.cpp's converter does, for the same bits
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(torch.tensor(1.0))
        elif wavelen > old_ctx / low:
            factors.append(torch.tensor(float(factor)))
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": torch.stack(factors).to(torch.float32)}


def _imatrix_by_gguf_name(imatrix: dict[str, torch.Tensor], arch: Architecture, shapes: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, values in imatrix.items():
        name = key if key in shapes or re.match(r"(blk\.\d+\.|output\.|token_embd\.)", key) else hf_to_gguf_name(key, arch.model_type)
        if name not in shapes:
            continue  # e.g. output.weight of a tied model
        values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        if values.numel() != shapes[name][-1]:
            raise ValueError(f"imatrix entry {key} has {values.numel()} values but {name} has rows of {shapes[name][-1]}")
        if not torch.isfinite(values).all():
            raise ValueError(f"imatrix entry {key} has non-finite values")
        out[name] = values
    return out
