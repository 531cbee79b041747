"""compressed-tensors checkpoints (llm-compressor's format; read by vLLM, SGLang, and transformers with the
compressed-tensors package): the schemes of ``qtune.quant.CT_SCHEMES``.

W4A16, "pack-quantized", symmetric or asymmetric. Per quantized linear (K inputs, N outputs,
G = K / group_size groups, or 1 per row for "channel"):
  weight_packed      int32 [N, K*bits/32]  codes along K, least significant bits first
  weight_scale       model dtype [N, G]
  weight_zero_point  int32 [N*bits/32, G]  asymmetric only: zero points packed along N the same way
  weight_shape       int64 [2]             (N, K)
The format's integers are signed (-2^(bits-1) .. 2^(bits-1)-1) and packed with 2^(bits-1) added, so the
stored nibbles are the unsigned codes and zeros qtune's quantizers make. Dequantized, in the scale's
dtype: (code - zero) * scale, where zero is 2^(bits-1) for a symmetric grid. A checkpoint lists the
quantized modules' class ("Linear") and ignores lm_head.

W8A8 ("int-quantized") and FP8 ("float-quantized"): 8-bit weights, one scale per output channel, and
activations the runtime rounds per token with a dynamic symmetric scale (the config's input_activations):
  weight        int8 or float8_e4m3fn [N, K]
  weight_scale  model dtype [N, 1]
Dequantized: weight * weight_scale (exact in float32), rounded to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from qtune.formats.gptq import pack_rows, unpack_rows
from qtune.quant import CT_SCHEMES
from qtune.quant.rtn import QuantizedWeight, check_group_size, default_g_idx
from qtune.quant.w8a8 import FP8_DTYPE, ChannelWeight

QUANT_METHOD = "compressed-tensors"
PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
CHANNEL_SUFFIXES = ("weight", "weight_scale")
FORMATS = {"W4A16": "pack-quantized", "W8A8": "int-quantized", "FP8": "float-quantized"}
_CHANNEL_DTYPES = {"W8A8": torch.int8, "FP8": FP8_DTYPE}


def _check_bits(bits: int) -> None:
    if bits != CT_SCHEMES["W4A16"].weight_bits:
        raise ValueError(f"qtune writes pack-quantized compressed-tensors weights of {CT_SCHEMES['W4A16'].weight_bits} bits, not {bits}")


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


def pack_ct_channel_layer(quantized: ChannelWeight, scheme: str, scale_dtype: torch.dtype, layer: str = "layer") -> dict[str, Tensor]:
    """weight / weight_scale of one linear for the W8A8 or FP8 scheme; the scales must be exact in
    ``scale_dtype`` (the model's, as llm-compressor stores them, and as transformers casts them on load)."""
    if quantized.values.dtype != _CHANNEL_DTYPES[scheme]:
        raise ValueError(f"{layer}: {scheme} stores {_CHANNEL_DTYPES[scheme]} weights, not {quantized.values.dtype}")
    scales = quantized.scales.reshape(-1, 1).to(scale_dtype)
    if not torch.equal(scales.float(), quantized.scales.float().reshape(-1, 1)):
        raise ValueError(f"{layer}: its scales are not exact in {scale_dtype}")
    return {"weight": quantized.values.contiguous(), "weight_scale": scales.contiguous()}


def unpack_ct_channel_layer(tensors: Mapping[str, Tensor]) -> ChannelWeight:
    return ChannelWeight(tensors["weight"], tensors["weight_scale"].float().reshape(-1))


def ct_channel_shapes(out_features: int, in_features: int, scheme: str, scale_dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """What ``pack_ct_channel_layer`` makes of an [out, in] linear: suffix -> (dtype, shape)."""
    return {"weight": (_CHANNEL_DTYPES[scheme], (out_features, in_features)), "weight_scale": (scale_dtype, (out_features, 1))}


def ct_channel_quantization_config(scheme: str) -> dict[str, Any]:
    """config.json's quantization_config for W8A8 or FP8: per-channel 8-bit weights, dynamic per-token
    8-bit input activations, every Linear but lm_head."""
    kind = CT_SCHEMES[scheme].weight_type
    weights = {
        "num_bits": 8,
        "type": kind,
        "symmetric": True,
        "strategy": "channel",
        "group_size": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    activations = {**weights, "strategy": "token", "dynamic": True, "observer": None}
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMATS[scheme],
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations, "output_activations": None}},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _only_group(quantization_config: Mapping[str, Any]) -> dict[str, Any]:
    groups = quantization_config.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError("qtune reads compressed-tensors checkpoints with one config group")
    (group,) = groups.values()
    return group


def ct_scheme(quantization_config: Mapping[str, Any]) -> str:
    """Which of qtune's schemes a compressed-tensors checkpoint holds (a ValueError for any other)."""
    fmt = quantization_config.get("format")
    scheme = next((scheme for scheme, name in FORMATS.items() if name == fmt), None)
    if scheme is None:
        raise ValueError(f"qtune reads compressed-tensors formats {', '.join(FORMATS.values())}, not {fmt!r}")
    if CT_SCHEMES[scheme].per_channel:
        group = _only_group(quantization_config)
        weights, activations = group["weights"], group.get("input_activations") or {}
        expected = CT_SCHEMES[scheme].weight_type
        per_token = activations.get("strategy") == "token" and activations.get("dynamic")
        if weights.get("strategy") != "channel" or weights.get("type") != expected or not per_token:
            raise ValueError(f"qtune reads {fmt} checkpoints with per-channel {expected} weights and dynamic per-token activations")
    return scheme


def read_ct_settings(quantization_config: Mapping[str, Any]) -> tuple[int, int, bool]:
    """(bits, group_size, sym) of a pack-quantized checkpoint with one weight-only group, as qtune writes."""
    if quantization_config.get("format") != FORMATS["W4A16"]:
        raise ValueError("qtune reads pack-quantized compressed-tensors checkpoints with one config group")
    group = _only_group(quantization_config)
    weights = group["weights"]
    if group.get("input_activations") or weights.get("type") != "int" or weights.get("actorder"):
        raise ValueError("qtune reads integer weight-only compressed-tensors checkpoints without act-order")
    group_size = -1 if weights.get("strategy") == "channel" else int(weights["group_size"])
    return int(weights["num_bits"]), group_size, bool(weights.get("symmetric", True))
