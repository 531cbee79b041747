"""Running exported GPTQ, AWQ and compressed-tensors checkpoints.

W4A16 (GPTQ, AWQ, compressed-tensors W4A16): every quantized linear becomes a ``QuantLinearW4A16`` that
keeps the packed weights (Triton kernels on CUDA; compressed-tensors layers are repacked losslessly into
GPTQ's v2 layout on load). On CPU, where unpacking per token is slow, each is dequantized once to fp16
(rounded as the GPU kernels round) and the model computes in float32 (``models.compute_in_float32``):
half precision's memory, never a float32 copy.

W8A8 and FP8 (compressed-tensors): every quantized linear becomes a ``QuantLinearW8A8`` that keeps the
8-bit weights and rounds its input per token as the runtime does (``quant.w8a8.quantize_tokens``), so a
score is that of the 8-bit activations, not of the weights alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qtune.checkpoint_files import check_checkpoint
from qtune.formats import compressed_tensors as ct
from qtune.formats.gptq import pack_gptq_layer, read_quantization_config
from qtune.quant import CT_SCHEMES
from qtune.quant.w8a8 import ChannelWeight, quantize_tokens
from qtune.shards import CheckpointReader

PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")


class QuantLinearW8A8(nn.Module):
    """y = round_per_token(x) @ (weight * weight_scale)^T + bias, in float32, returned in x's dtype."""

    def __init__(self, weight: ChannelWeight, bias: torch.Tensor | None, activation: str) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.activation = activation
        self.register_buffer("weight", weight.values)
        self.register_buffer("weight_scale", weight.scales.float())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return ChannelWeight(self.weight, self.weight_scale).dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(quantize_tokens(x, self.activation), self.dequantize())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def runtime_name(model: nn.Module) -> str:
    """How a model from ``load_quantized_model`` computes, for a report's runtime column."""
    if any(isinstance(module, QuantLinearW8A8) for module in model.modules()):
        return "qtune, 8-bit weights, activations rounded per token (float32)"
    return "qtune W4A16 kernels" if torch.cuda.is_available() else "qtune, dequantized to fp16 (CPU)"


def is_quantized_checkpoint(path: Path) -> bool:
    try:
        return read_quantization_config(path).get("quant_method") in ("gptq", "awq", ct.QUANT_METHOD)
    except (OSError, ValueError):
        return False


def kernel_layout(quant: dict) -> str:
    if quant["quant_method"] == ct.QUANT_METHOD:
        return "gptq_v2"  # after repacking
    if quant["quant_method"] == "awq":
        return "awq"
    return "gptq_v2" if (quant.get("checkpoint_format") or quant.get("format")) == "gptq_v2" else "gptq"


def load_quantized_model(path: Path, backend: str = "auto", device: torch.device | str | None = None) -> nn.Module:
    """An HF causal LM for a GPTQ, AWQ or compressed-tensors checkpoint written by qtune (or by GPTQModel,
    AutoAWQ or llm-compressor in the same layouts), its quantized linears packed, on ``device`` (default:
    CUDA when there is one)."""
    from transformers import AutoConfig

    from qtune.blockwise import empty_model, move_computed_buffers
    from qtune.kernels.w4a16 import QuantLinearW4A16
    from qtune.models import compute_in_float32

    path = Path(path)
    check_checkpoint(path)
    quant = read_quantization_config(path)
    layout = kernel_layout(quant)
    compressed = quant["quant_method"] == ct.QUANT_METHOD
    activations = CT_SCHEMES[ct.ct_scheme(quant)].activations if compressed else None
    if activations:
        group_size, first, suffixes = -1, ".weight_scale", ct.CHANNEL_SUFFIXES + ("bias",)
    elif compressed:
        bits, group_size, sym = ct.read_ct_settings(quant)
        first, suffixes = ".weight_packed", ct.PACKED_SUFFIXES + ("bias",)
    else:
        group_size, first, suffixes = int(quant["group_size"]), ".qweight", PACKED_SUFFIXES
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = empty_model(config)
    reader = CheckpointReader(path)
    prefixes = [key.removesuffix(first) for key in reader.keys() if key.endswith(first)]
    for prefix in prefixes:
        tensors = {f"{prefix}.{s}": reader.get(f"{prefix}.{s}").to(device) for s in suffixes if f"{prefix}.{s}" in reader}
        parent_name, _, child = prefix.rpartition(".")
        if activations:
            weight = ct.unpack_ct_channel_layer({s: tensors[f"{prefix}.{s}"] for s in ct.CHANNEL_SUFFIXES})
            setattr(model.get_submodule(parent_name), child, QuantLinearW8A8(weight, tensors.get(f"{prefix}.bias"), activations))
            continue
        if compressed:
            layer = {s: tensors.pop(f"{prefix}.{s}") for s in ct.PACKED_SUFFIXES if f"{prefix}.{s}" in tensors}
            repacked = pack_gptq_layer(ct.unpack_ct_layer(layer, bits, group_size, sym), "gptq_v2", prefix)
            tensors.update({f"{prefix}.{s}": t.to(device) for s, t in repacked.items()})
        size = None if group_size == -1 else group_size
        setattr(model.get_submodule(parent_name), child, QuantLinearW4A16.from_state_dict(tensors, prefix, layout, size, backend))
    packed = {f"{prefix}.{s}" for prefix in prefixes for s in {*suffixes, *PACKED_SUFFIXES}}
    state = {key: reader.get(key).to(device) for key in reader.keys() if key not in packed}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [key for key in missing if key not in packed and not (tied and key == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    move_computed_buffers(model, device)
    if device.type == "cpu":
        if backend == "auto" and not activations:  # per-token unpacking is slow on CPU: dequantize once, to fp16 as the GPU kernels round
            for prefix in prefixes:
                _to_dense(model, prefix)
        compute_in_float32(model)
    return model.eval()


def _to_dense(model: nn.Module, prefix: str) -> None:
    packed = model.get_submodule(prefix)
    dense = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None, device="meta")
    dense.weight = nn.Parameter(packed.dequantize().contiguous(), requires_grad=False)
    if packed.bias is not None:
        dense.bias = nn.Parameter(packed.bias, requires_grad=False)
    parent_name, _, child = prefix.rpartition(".")
    setattr(model.get_submodule(parent_name), child, dense)
