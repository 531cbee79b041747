"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout, read by transformers, optimum, vLLM).

Per quantized linear (K inputs, N outputs, G = ceil(K / group_size) groups):
  qweight int32 [K*bits/32, N]  codes packed along K, least significant bits first
  qzeros  int32 [G, N*bits/32]  zeros packed along N the same way
  scales  fp16  [G, N]
  g_idx   int32 [K]             group of each input channel
  bias    fp16  [N]             if the layer has one
3-bit codes form one continuous LSB-first bit stream: 32 values in 3 words.

checkpoint_format "gptq" (v1) stores zero - 1 (kernels add 1 back); "gptq_v2" stores
zeros as they are. v1 cannot hold a zero of 0, so asymmetric grids default to v2.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from qtune.paths import atomic_dir
from qtune.quant.rtn import SUPPORTED_BITS, QuantizedWeight, check_group_size

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
WEIGHTS_NAME = "model.safetensors"
_MASK32 = 0xFFFFFFFF


def _pack_unit(bits: int) -> tuple[int, int]:
    """(values, words) in the smallest run of whole int32 words holding whole values."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    lcm = bits * 32 // math.gcd(bits, 32)
    return lcm // bits, lcm // 32


def _to_int32(words: Tensor) -> Tensor:
    words = words & _MASK32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes [R, C] along R into int32 [R*bits/32, C], LSB first."""
    values, words = _pack_unit(bits)
    rows, cols = codes.shape
    if rows % values != 0:
        raise ValueError(f"{bits}-bit packing needs a multiple of {values} rows, got {rows}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    x = codes.to(torch.int64).reshape(rows // values, values, cols)
    out = torch.zeros(rows // values, words, cols, dtype=torch.int64, device=codes.device)
    for j in range(values):
        for word in range(words):
            offset = j * bits - 32 * word
            if offset >= 32 or offset + bits <= 0:
                continue
            part = x[:, j] << offset if offset >= 0 else x[:, j] >> -offset
            out[:, word] |= part & _MASK32
    return _to_int32(out.reshape(-1, cols))


def unpack_rows(packed: Tensor, bits: int) -> Tensor:
    """Inverse of ``pack_rows``: int32 [R*bits/32, C] to int32 codes [R, C]."""
    values, words = _pack_unit(bits)
    if packed.shape[0] % words != 0:
        raise ValueError(f"{bits}-bit unpacking needs a multiple of {words} packed rows, got {packed.shape[0]}")
    w = (packed.to(torch.int64) & _MASK32).reshape(-1, words, packed.shape[1])
    maxq = (1 << bits) - 1
    out = torch.empty(w.shape[0], values, packed.shape[1], dtype=torch.int64, device=packed.device)
    for j in range(values):
        word, shift = divmod(j * bits, 32)
        value = w[:, word] >> shift
        if shift + bits > 32:
            value = value | (w[:, word + 1] << (32 - shift))
        out[:, j] = value & maxq
    return out.reshape(-1, packed.shape[1]).to(torch.int32)


def pack_gptq_layer(quantized: QuantizedWeight, checkpoint_format: str = "gptq", layer: str = "layer") -> dict[str, Tensor]:
    """qweight / qzeros / scales / g_idx tensors for one linear layer."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    bits = quantized.bits
    values, _ = _pack_unit(bits)
    n, k = quantized.qweight_int.shape
    if k % values or n % values:
        raise ValueError(f"{layer}: {bits}-bit GPTQ packing needs in_features and out_features divisible by {values}, got K={k}, N={n}")
    zeros = quantized.zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if int(zeros.min()) < 1:
            raise ValueError(
                f"{layer}: checkpoint_format 'gptq' (v1) stores zero-1 and cannot hold a zero of 0 (asymmetric grid); use checkpoint_format='gptq_v2'"
            )
        zeros = zeros - 1
    return {
        "qweight": pack_rows(quantized.qweight_int.t().contiguous(), bits).contiguous(),
        "qzeros": pack_rows(zeros.t().contiguous(), bits).t().contiguous(),
        "scales": quantized.scales.to(torch.float16).contiguous(),
        "g_idx": quantized.g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq_layer(tensors: Mapping[str, Tensor], bits: int, group_size: int, sym: bool, checkpoint_format: str = "gptq") -> QuantizedWeight:
    """QuantizedWeight back from one layer's qweight / qzeros / scales / g_idx."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    scales = tensors["scales"]
    codes = unpack_rows(tensors["qweight"], bits).t().to(torch.uint8).contiguous()
    n = scales.shape[1]
    zeros = unpack_rows(tensors["qzeros"].t().contiguous(), bits).t()[:, :n].contiguous()
    if checkpoint_format == "gptq":
        zeros = zeros + 1  # v1 stores zero - 1
    k = codes.shape[1]
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(k, dtype=torch.int32) // check_group_size(group_size, k)
    return QuantizedWeight(
        qweight_int=codes,
        scales=scales.float(),
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


def _uniform(quantized_layers: Mapping[str, QuantizedWeight]) -> tuple[int, int, bool]:
    if not quantized_layers:
        raise ValueError("no quantized layers to write")
    settings = {(q.bits, q.group_size, q.sym) for q in quantized_layers.values()}
    if len(settings) != 1:
        raise ValueError(f"all layers must share bits/group_size/sym, found {sorted(settings)}")
    return settings.pop()


def _has_act_order(quantized: QuantizedWeight) -> bool:
    k = quantized.qweight_int.shape[1]
    trivial = torch.arange(k, device=quantized.g_idx.device) // check_group_size(quantized.group_size, k)
    return not torch.equal(quantized.g_idx.long(), trivial)


def collect_tensors(
    model: nn.Module,
    quantized_layers: Mapping[str, Any],  # QuantizedWeight, or what pack_layer takes
    pack_layer: Callable[[str, Any], dict[str, Tensor]],
    dtype: torch.dtype | None,
    prefix: str = "",
) -> dict[str, Tensor]:
    """The state dict of ``model`` (a whole model, or one block whose names start with ``prefix``) with
    each quantized linear's weight replaced by its packed tensors; other floating tensors in ``dtype``."""
    modules = {prefix + name: module for name, module in model.named_modules()}
    state = {prefix + key: value for key, value in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    for name, quantized in quantized_layers.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"quantized layer {name!r} is not an nn.Linear of the model")
        if tuple(module.weight.shape) != tuple(quantized.shape):
            raise ValueError(f"{name}: quantized shape {tuple(quantized.shape)} != weight {tuple(module.weight.shape)}")
        for suffix, tensor in pack_layer(name, quantized).items():
            out[f"{name}.{suffix}"] = tensor.cpu()
        if module.bias is not None:
            out[f"{name}.bias"] = module.bias.detach().to(torch.float16).cpu().contiguous()
    seen_storage: set[int] = set()
    for key, tensor in state.items():
        module_name = key.rsplit(".", 1)[0]
        if module_name in quantized_layers:
            continue
        if tensor.data_ptr() in seen_storage and tensor.numel():
            continue  # tied weights (lm_head = embed_tokens) are stored once
        seen_storage.add(tensor.data_ptr())
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.cpu().contiguous()
    return out


def gptq_packed_shapes(out_features: int, in_features: int, bits: int, group_size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """What ``pack_gptq_layer`` makes of an [out, in] linear: suffix -> (dtype, shape)."""
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    return {
        "qweight": (torch.int32, (in_features * bits // 32, out_features)),
        "qzeros": (torch.int32, (groups, out_features * bits // 32)),
        "scales": (torch.float16, (groups, out_features)),
        "g_idx": (torch.int32, (in_features,)),
    }


def quantized_config(checkpoint: str | os.PathLike[str], quantization_config: dict[str, Any], dtype: torch.dtype):
    """The checkpoint's config with a quantization_config, and its stored tensors' dtype."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    config.quantization_config = quantization_config
    config.dtype = dtype
    return config


def write_model_files(tmp: Path, model: nn.Module, tensors: dict[str, Tensor], quantization_config: dict[str, Any], tokenizer: Any) -> None:
    """safetensors + config.json (with quantization_config) + generation config + tokenizer."""
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config
    config.save_pretrained(tmp)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def gptq_quantization_config(
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    checkpoint_format: str,
    damp_percent: float,
    true_sequential: bool,
) -> dict[str, Any]:
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": False,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "damp_percent": damp_percent,
        "true_sequential": true_sequential,
        "static_groups": False,
        "meta": {"quantizer": ["qtune"]},
    }


def write_gptq_checkpoint(
    model: nn.Module,
    quantized_layers: Mapping[str, QuantizedWeight],
    out_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    *,
    checkpoint_format: str | None = None,
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a GPTQ checkpoint directory atomically; returns its path.

    ``checkpoint_format`` defaults to "gptq" (v1) for symmetric grids and "gptq_v2" otherwise.
    ``dtype`` converts the non-quantized floating tensors (embeddings, norms, lm_head);
    None keeps the model's own dtypes.
    """
    bits, group_size, sym = _uniform(quantized_layers)
    if checkpoint_format is None:
        checkpoint_format = "gptq" if sym else "gptq_v2"
    desc_act = any(_has_act_order(q) for q in quantized_layers.values())
    tensors = collect_tensors(model, quantized_layers, lambda name, q: pack_gptq_layer(q, checkpoint_format, name), dtype)
    config = gptq_quantization_config(bits, group_size, sym, desc_act, checkpoint_format, damp_percent, true_sequential)
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        write_model_files(tmp, model, tensors, config, tokenizer)
        (tmp / "quantize_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def read_quantization_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    config = json.loads((Path(path) / "config.json").read_text())
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        raise ValueError(f"{path}/config.json has no quantization_config")
    return quant


def read_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {path}")
    tensors: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def dequantize_gptq_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """State dict of a GPTQ checkpoint with every quantized linear as a float32 ``.weight``."""
    quant = read_quantization_config(path)
    if quant.get("quant_method") != "gptq":
        raise ValueError(f"{path} is not a GPTQ checkpoint (quant_method={quant.get('quant_method')!r})")
    bits, group_size, sym = int(quant["bits"]), int(quant["group_size"]), bool(quant.get("sym", True))
    checkpoint_format = quant.get("checkpoint_format") or quant.get("format") or "gptq"
    tensors = read_tensors(path)
    prefixes = [key[: -len(".qweight")] for key in tensors if key.endswith(".qweight")]
    state: dict[str, Tensor] = {}
    for prefix in prefixes:
        suffixes = ("qweight", "qzeros", "scales", "g_idx")
        layer = {s: tensors.pop(f"{prefix}.{s}") for s in suffixes if f"{prefix}.{s}" in tensors}
        state[f"{prefix}.weight"] = unpack_gptq_layer(layer, bits, group_size, sym, checkpoint_format).dequantize()
    state.update(tensors)
    return state


def load_dequantized_state(state: Mapping[str, Tensor], path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A plain HF model from ``path``'s config (quantization dropped) holding ``state``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    converted = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit its config: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def load_dequantized_gptq_model(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> nn.Module:
    """Our own reader: dequantize every layer and return an ordinary HF causal LM (for eval)."""
    return load_dequantized_state(dequantize_gptq_checkpoint(path), path, dtype)
