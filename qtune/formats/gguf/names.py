"""HF checkpoints in llama.cpp's terms: GGUF tensor names, the architecture entry, hyperparameters and
the RoPE row order, from the registry in ``qtune.architectures``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from qtune.architectures import ARCHITECTURES, Architecture, supported
from qtune.errors import QtuneError

Q = GGMLQuantizationType


def read_config(checkpoint_dir: Path) -> dict:
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise QtuneError(f"{checkpoint_dir} has no config.json; is it a Hugging Face checkpoint?")
    return json.loads(path.read_text(encoding="utf-8"))


def unsupported_message(model_type: str) -> str:
    return f"GGUF export does not support the '{model_type}' architecture; supported: {supported()}"


def gguf_architecture(config: dict) -> Architecture:
    model_type = config.get("model_type", "?")
    if model_type not in ARCHITECTURES:
        raise QtuneError(unsupported_message(model_type))
    if config.get("num_local_experts") or config.get("num_experts"):
        raise QtuneError(f"GGUF export does not support mixture-of-experts {model_type} models")
    return ARCHITECTURES[model_type]


def hyperparameters(config: dict) -> dict:
    n_head = config["num_attention_heads"]
    hp = {
        "n_layer": config["num_hidden_layers"],
        "n_embd": config["hidden_size"],
        "n_ff": config["intermediate_size"],
        "n_head": n_head,
        "n_head_kv": config.get("num_key_value_heads") or n_head,
        "n_ctx": config.get("max_position_embeddings", 4096),
        "eps": config.get("rms_norm_eps", 1e-6),
        "vocab_size": config["vocab_size"],
        "head_dim": config.get("head_dim") or config["hidden_size"] // n_head,
    }

    rope = dict(config.get("rope_parameters") or {})
    if "full_attention" in rope:  # per layer type (Gemma 3): the global layers' RoPE, and the local ones' base
        hp["rope_swa"] = dict(rope.get("sliding_attention") or {})
        if hp["rope_swa"].get("rope_type", "default") != "default":
            raise QtuneError(f"GGUF export supports sliding-window layers with default RoPE, not '{hp['rope_swa'].get('rope_type')}'")
        rope = dict(rope["full_attention"])
    if config.get("rope_scaling"):
        rope.update(config["rope_scaling"])
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise QtuneError(f"GGUF export supports RoPE types default, linear and llama3, not '{rope_type}'")
    hp["rope"], hp["rope_type"] = rope, rope_type
    hp["rope_dim"] = int(hp["head_dim"] * rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    return hp


def hf_to_gguf_name(hf_name: str, model_type: str = "llama") -> str:
    """The GGUF tensor name of an HF parameter or module name (``.weight`` is assumed when absent)."""
    if model_type not in ARCHITECTURES:
        raise QtuneError(unsupported_message(model_type))
    arch = ARCHITECTURES[model_type]
    if not hf_name.endswith((".weight", ".bias")):
        hf_name += ".weight"
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in arch.gguf_global_tensors:
        return f"{arch.gguf_global_tensors[stem]}.{suffix}"
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if match and match.group(2) in arch.gguf_layer_tensors:
        return f"blk.{match.group(1)}.{arch.gguf_layer_tensors[match.group(2)]}.{suffix}"
    raise QtuneError(f"no GGUF tensor name for '{hf_name}' in a {model_type} model")


def permute_for_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF keeps each head's rotary halves apart; llama.cpp wants them as interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
