"""AWQ checkpoints in the GEMM layout (AutoAWQ ``WQLinear_GEMM``; read by transformers, GPTQModel, vLLM).

Per quantized linear (K inputs, N outputs, group size G dividing K), 4-bit only:
  qweight int32 [K, N/8]    codes packed along N; nibble i of word c holds column 8c + AWQ_ORDER[i]
  qzeros  int32 [K/G, N/8]  raw zeros (no -1 offset), same interleave
  scales  fp16  [K/G, N]
  bias    fp16  [N]         if the layer has one
AWQ scales are already folded into the preceding norms/linears, which are stored as ordinary tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qtune.formats.gptq import (
    collect_tensors,
    load_dequantized_state,
    read_quantization_config,
    read_tensors,
    write_model_files,
)
from qtune.paths import atomic_dir
from qtune.quant.awq import check_awq_group_size
from qtune.quant.rtn import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column offset stored in nibble i
_MASK32 = 0xFFFFFFFF


def pack_awq_columns(codes: Tensor) -> Tensor:
    """4-bit codes [R, N] to int32 [R, N/8] with the AWQ interleave."""
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"AWQ packing needs a multiple of 8 columns, got {cols}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("AWQ codes must lie in [0, 15]")
    x = codes.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    words = (x << shifts).sum(dim=-1) & _MASK32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_awq_columns(packed: Tensor) -> Tensor:
    """Inverse of ``pack_awq_columns``: int32 [R, N/8] to int32 codes [R, N]."""
    words = packed.to(torch.int64) & _MASK32
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=packed.device)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF  # [R, N/8, 8], nibble order
    codes = torch.empty_like(nibbles)
    codes[:, :, list(AWQ_ORDER)] = nibbles
    return codes.reshape(packed.shape[0], -1).to(torch.int32)


def pack_awq_layer(quantized: QuantizedWeight, layer: str = "layer") -> dict[str, Tensor]:
    if quantized.bits != 4:
        raise ValueError(f"{layer}: AWQ GEMM holds 4-bit weights only, got {quantized.bits}-bit")
    n, k = quantized.qweight_int.shape
    width = check_awq_group_size(k, quantized.group_size, layer)
    if n % 8:
        raise ValueError(f"{layer}: AWQ packing needs out_features divisible by 8, got N={n}")
    trivial = torch.arange(k, device=quantized.g_idx.device) // width
    if not torch.equal(quantized.g_idx.long(), trivial):
        raise ValueError(f"{layer}: AWQ has no g_idx, so act-order (permuted groups) cannot be written")
    return {
        "qweight": pack_awq_columns(quantized.qweight_int.t().contiguous()),
        "qzeros": pack_awq_columns(quantized.zeros),
        "scales": quantized.scales.to(torch.float16).contiguous(),
    }


def awq_packed_shapes(out_features: int, in_features: int, group_size: int, layer: str = "layer") -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """What ``pack_awq_layer`` makes of an [out, in] linear: suffix -> (dtype, shape)."""
    groups = in_features // check_awq_group_size(in_features, group_size, layer)
    return {
        "qweight": (torch.int32, (in_features, out_features // 8)),
        "qzeros": (torch.int32, (groups, out_features // 8)),
        "scales": (torch.float16, (groups, out_features)),
    }


def unpack_awq_layer(tensors: Mapping[str, Tensor], group_size: int) -> QuantizedWeight:
    codes = unpack_awq_columns(tensors["qweight"]).t().to(torch.uint8).contiguous()  # [N, K]
    k = codes.shape[1]
    width = check_awq_group_size(k, group_size)
    return QuantizedWeight(
        qweight_int=codes,
        scales=tensors["scales"].float(),
        zeros=unpack_awq_columns(tensors["qzeros"]),
        g_idx=torch.arange(k, dtype=torch.int32) // width,
        bits=4,
        group_size=group_size,
        sym=False,
    )


def awq_quantization_config(group_size: int, modules_to_not_convert: list[str] | None) -> dict[str, Any]:
    return {
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
        "bits": 4,
        "group_size": group_size,
        "modules_to_not_convert": modules_to_not_convert,
    }


def write_awq_checkpoint(
    model: nn.Module,
    quantized_layers: Mapping[str, QuantizedWeight],
    out_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    *,
    modules_to_not_convert: list[str] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an AWQ GEMM checkpoint directory atomically; returns its path."""
    if not quantized_layers:
        raise ValueError("no quantized layers to write")
    group_sizes = {q.group_size for q in quantized_layers.values()}
    if len(group_sizes) != 1:
        raise ValueError(f"all layers must share one group_size, found {sorted(group_sizes)}")
    group_size = group_sizes.pop()
    tensors = collect_tensors(model, quantized_layers, lambda name, q: pack_awq_layer(q, name), dtype)
    config = awq_quantization_config(group_size, modules_to_not_convert)
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        write_model_files(tmp, model, tensors, config, tokenizer)
    return Path(out_dir)


def dequantize_awq_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """State dict of an AWQ GEMM checkpoint with every quantized linear as a float32 ``.weight``."""
    quant = read_quantization_config(path)
    if quant.get("quant_method") != "awq":
        raise ValueError(f"{path} is not an AWQ checkpoint (quant_method={quant.get('quant_method')!r})")
    version = str(quant.get("version", quant.get("format", "gemm"))).lower()
    if version != "gemm" or int(quant.get("bits", 4)) != 4:
        raise ValueError(f"{path}: only 4-bit AWQ GEMM is readable, got version={version!r} bits={quant.get('bits')}")
    group_size = int(quant["group_size"])
    tensors = read_tensors(path)
    prefixes = [key[: -len(".qweight")] for key in tensors if key.endswith(".qweight")]
    state: dict[str, Tensor] = {}
    for prefix in prefixes:
        layer = {s: tensors.pop(f"{prefix}.{s}") for s in ("qweight", "qzeros", "scales")}
        state[f"{prefix}.weight"] = unpack_awq_layer(layer, group_size).dequantize()
    state.update(tensors)
    return state


def load_dequantized_awq_model(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> nn.Module:
    """Our own reader: dequantize every layer and return an ordinary HF causal LM (for eval)."""
    return load_dequantized_state(dequantize_awq_checkpoint(path), path, dtype)
