"""A PEFT LoRA adapter as a GGUF adapter file for llama.cpp's ``--lora`` and Ollama's ``ADAPTER``, laid
out as llama.cpp's ``convert_lora_to_gguf.py`` writes it."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from qtune.errors import QtuneError
from qtune.formats.gguf.layout import byte_shape, tensor_nbytes
from qtune.formats.gguf.names import gguf_architecture, hf_to_gguf_name, hyperparameters, permute_for_rope, read_config
from qtune.formats.gguf.writer import write_atomically
from qtune.quant.ggml_quants import quantize

Q = GGMLQuantizationType


LORA_TYPES = ("F32", "F16", "BF16")


@dataclass
class GGUFLoraReport:
    path: Path
    rank: int
    alpha: float
    tensors: int
    seconds: float = 0.0


def export_gguf_lora(adapter_dir: Path, base_checkpoint: Path, output: Path, dtype: str = "F16") -> GGUFLoraReport:
    """Write a PEFT LoRA adapter as a GGUF LoRA adapter (llama.cpp ``--lora``, Ollama ``ADAPTER``).

    ``base_checkpoint`` gives the architecture (config.json): the file applies to a GGUF of that base.
    Tensors are named ``<base tensor>.lora_a`` [rank, in] and ``.lora_b`` [out, rank], with llama's Q/K
    row permutation applied to B, as llama.cpp's convert_lora_to_gguf writes them. llama.cpp scales
    B·A by alpha / rank; an rsLoRA adapter or one with per-module ranks or alphas has its scaling folded
    into B instead (and alpha = rank). DoRA adapters, and adapters that train whole modules
    (``modules_to_save``), have no GGUF LoRA form: export the merged model.
    """
    from safetensors.torch import load_file

    start = time.perf_counter()
    adapter_dir, output = Path(adapter_dir), Path(output)
    dtype = dtype.upper()
    if dtype not in LORA_TYPES:
        raise QtuneError(f"a GGUF LoRA adapter is written as {', '.join(LORA_TYPES)}, not {dtype}")
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise QtuneError(f"{adapter_dir} is not a PEFT LoRA adapter (needs adapter_config.json and adapter_model.safetensors)")
    lora = json.loads(config_file.read_text(encoding="utf-8"))
    if lora.get("peft_type", "LORA") != "LORA":
        raise QtuneError(f"{adapter_dir} is a {lora.get('peft_type')} adapter; only LoRA adapters have a GGUF form")
    if lora.get("use_dora"):
        raise QtuneError("a DoRA adapter has no GGUF LoRA form (llama.cpp applies plain B·A); export the merged model instead")
    if lora.get("modules_to_save"):
        raise QtuneError(
            f"the adapter trains whole modules ({', '.join(lora['modules_to_save'])}), which a GGUF LoRA cannot carry; export the merged model instead"
        )
    config = read_config(Path(base_checkpoint))
    arch = gguf_architecture(config)
    hp = hyperparameters(config)
    rank, alpha = int(lora["r"]), float(lora["lora_alpha"])
    rank_pattern, alpha_pattern = lora.get("rank_pattern") or {}, lora.get("alpha_pattern") or {}
    fold_scale = bool(lora.get("use_rslora")) or bool(rank_pattern) or bool(alpha_pattern)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise QtuneError(f"unexpected tensor {key} in {weights_file} (bias or embedding LoRA is not supported)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor.to(torch.float32)

    tensors: dict[str, torch.Tensor] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise QtuneError(f"{module} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]
        name = hf_to_gguf_name(module, config["model_type"]).removesuffix(".weight")
        if fold_scale:
            suffix = module.rsplit(".", 1)[-1]
            r_m = int(next((v for k, v in rank_pattern.items() if module.endswith(k) or k == suffix), rank))
            alpha_m = float(next((v for k, v in alpha_pattern.items() if module.endswith(k) or k == suffix), alpha))
            scaling = alpha_m / (math.sqrt(r_m) if lora.get("use_rslora") else r_m)
            b = b * scaling  # llama.cpp's alpha / rank is then 1: alpha is written as the rank
        heads = arch.rope_heads(module, hp["n_head"], hp["n_head_kv"])
        if heads:
            b = permute_for_rope(b, heads)
        tensors[f"{name}.weight.lora_a"] = a
        tensors[f"{name}.weight.lora_b"] = b
    if not tensors:
        raise QtuneError(f"{weights_file} holds no LoRA tensors")
    ranks = {t.shape[0] for n, t in tensors.items() if n.endswith(".lora_a")}
    if fold_scale and len(ranks) > 1:
        raise QtuneError("modules with different ranks cannot share one GGUF alpha; use one rank for every module")
    written_alpha = float(ranks.pop()) if fold_scale else alpha

    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, written_alpha)
    qtype = Q[dtype]
    for name, tensor in tensors.items():
        writer.add_tensor_info(name, byte_shape(qtype, tuple(tensor.shape)), np.dtype(np.uint8), tensor_nbytes(qtype, tuple(tensor.shape)), raw_dtype=qtype)
    write_atomically(writer, output, (quantize(t, qtype).numpy().reshape(-1) for t in tensors.values()))
    return GGUFLoraReport(output, rank, written_alpha, len(tensors), time.perf_counter() - start)
