"""compressed-tensors checkpoints (llm-compressor's format; read by vLLM, SGLang, and transformers with the
compressed-tensors package): the W4A16 scheme, "pack-quantized", symmetric or asymmetric.

Per quantized linear (K inputs, N outputs, G = K / group_size groups, or 1 per row for "channel"):
  weight_packed      int32 [N, K*bits/32]  codes along K, least significant bits first
  weight_scale       model dtype [N, G]
  weight_zero_point  int32 [N*bits/32, G]  asymmetric only: zero points packed along N the same way
  weight_shape       int64 [2]             (N, K)
The format's integers are signed (-2^(bits-1) .. 2^(bits-1)-1) and packed with 2^(bits-1) added, so the
stored nibbles are the unsigned codes and zeros qtune's quantizers make. Dequantized, in the scale's
dtype: (code - zero) * scale, where zero is 2^(bits-1) for a symmetric grid. A checkpoint lists the
quantized modules' class ("Linear") and ignores lm_head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from qtune.formats.gptq import pack_rows, unpack_rows
from qtune.quant import CT_SCHEMES
from qtune.quant.rtn import QuantizedWeight, check_group_size, default_g_idx

QUANT_METHOD = "compressed-tensors"
PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def _check_bits(bits: int) -> None:
    if bits not in CT_SCHEMES.values():
        raise ValueError(f"qtune writes compressed-tensors weights of {sorted(set(CT_SCHEMES.values()))} bits, not {bits}")


def pack_ct_layer(quantized: QuantizedWeight, scale_dtype: torch.dtype, layer: str = "layer") -> dict[str, Tensor]:
    """weight_packed / weight_scale / weight_zero_point / weight_shape for one linear layer."""
    _check_bits(quantized.bits)
    n, k = quantized.qweight_int.shape
    if not torch.equal(quantized.g_idx.long().cpu(), default_g_idx(k, quantized.group_size).long()):
        raise ValueError(f"{layer}: act-order (a permuted g_idx) is not written to compressed-tensors by qtune; export without act_order")
    zeros = quantized.zeros.to(torch.int64)
    if quantized.sym and not bool((zeros == 1 << (quantized.bits - 1)).all()):
        raise ValueError(f"{layer}: a symmetric grid has every zero at {1 << (quantized.bits - 1)}")
    tensors = {
        "weight_packed": pack_rows(quantized.qweight_int.t().contiguous(), quantized.bits).t().contiguous(),
        "weight_scale": quantized.scales.t().to(scale_dtype).reshape(-1).view(n, -1).clone(),  # plain strides when G = 1
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not quantized.sym:
        tensors["weight_zero_point"] = pack_rows(zeros.t().contiguous(), quantized.bits).contiguous()
    return tensors


def unpack_ct_layer(tensors: Mapping[str, Tensor], bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """QuantizedWeight back from one layer's tensors (scales in float32, as stored)."""
    _check_bits(bits)
    n, k = (int(v) for v in tensors["weight_shape"])
    codes = unpack_rows(tensors["weight_packed"].t().contiguous(), bits).t()[:, :k]
    scales = tensors["weight_scale"].float().t().contiguous()
    if sym:
        zeros = torch.full_like(scales, 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = unpack_rows(tensors["weight_zero_point"], bits)[:n].t().contiguous()
    check_group_size(group_size, k)
    return QuantizedWeight(
        qweight_int=codes.to(torch.uint8).contiguous(),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=default_g_idx(k, group_size),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


def ct_packed_shapes(
    out_features: int, in_features: int, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """What ``pack_ct_layer`` makes of an [out, in] linear: suffix -> (dtype, shape)."""
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    shapes = {
        "weight_packed": (torch.int32, (out_features, in_features * bits // 32)),
        "weight_scale": (scale_dtype, (out_features, groups)),
        "weight_shape": (torch.int64, (2,)),
    }
    if not sym:
        shapes["weight_zero_point"] = (torch.int32, (out_features * bits // 32, groups))
    return shapes


def ct_quantization_config(bits: int, group_size: int, sym: bool) -> dict[str, Any]:
    """config.json's quantization_config for a pack-quantized checkpoint: every Linear but lm_head."""
    _check_bits(bits)
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": QUANT_METHOD,
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None}},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def read_ct_settings(quantization_config: Mapping[str, Any]) -> tuple[int, int, bool]:
    """(bits, group_size, sym) of a pack-quantized checkpoint with one weight-only group, as qtune writes."""
    groups = quantization_config.get("config_groups") or {}
    if quantization_config.get("format") != "pack-quantized" or len(groups) != 1:
        raise ValueError("qtune reads pack-quantized compressed-tensors checkpoints with one config group")
    (group,) = groups.values()
    weights = group["weights"]
    if group.get("input_activations") or weights.get("type") != "int" or weights.get("actorder"):
        raise ValueError("qtune reads integer weight-only compressed-tensors checkpoints without act-order")
    group_size = -1 if weights.get("strategy") == "channel" else int(weights["group_size"])
    return int(weights["num_bits"]), group_size, bool(weights.get("symmetric", True))
