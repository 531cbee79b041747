"""Running exported GPTQ and AWQ checkpoints: packed 4-bit weights through qtune's W4A16 kernels on CUDA,
or every layer dequantized once on CPU (the same numbers, computed the simple way)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qtune.checkpoint_files import check_checkpoint
from qtune.formats.awq import load_dequantized_awq_model
from qtune.formats.gptq import load_dequantized_gptq_model, read_quantization_config, read_tensors


def is_w4a16_checkpoint(path: Path) -> bool:
    try:
        return read_quantization_config(path).get("quant_method") in ("gptq", "awq")
    except (OSError, ValueError):
        return False


def kernel_layout(quant: dict) -> str:
    if quant["quant_method"] == "awq":
        return "awq"
    return "gptq_v2" if (quant.get("checkpoint_format") or quant.get("format")) == "gptq_v2" else "gptq"


def load_w4a16_model(path: Path, use_kernels: bool | None = None, backend: str = "auto") -> nn.Module:
    """An HF causal LM for a GPTQ/AWQ checkpoint written by qtune (or by GPTQModel/AutoAWQ in the same layouts).

    With ``use_kernels`` (default: on CUDA) every quantized linear becomes a ``QuantLinearW4A16`` that keeps
    the packed weights; otherwise the model holds the dequantized weights in float32.
    """
    path = Path(path)
    check_checkpoint(path)
    quant = read_quantization_config(path)
    loader = load_dequantized_awq_model if quant["quant_method"] == "awq" else load_dequantized_gptq_model
    use_kernels = torch.cuda.is_available() if use_kernels is None else use_kernels
    if not use_kernels:
        return loader(path, torch.float32)
    from qtune.kernels.w4a16 import QuantLinearW4A16

    model = loader(path, torch.float16)
    tensors = read_tensors(path)
    layout, group_size = kernel_layout(quant), int(quant["group_size"])
    prefixes = [key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight")]
    for prefix in prefixes:
        parent_name, _, child = prefix.rpartition(".")
        parent = model.get_submodule(parent_name)
        size = None if group_size == -1 else group_size
        setattr(parent, child, QuantLinearW4A16.from_state_dict(tensors, prefix, layout, size, backend))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()
