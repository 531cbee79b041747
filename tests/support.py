"""Shared builders for tests: tiny random models with a real tokenizer, and recipes around them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO / "recipes" / "data"
# real models' configs, for memory plans (the benchmark scripts import them from here too)
LLAMA31_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
LLAMA31_70B = {**LLAMA31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64}


def builtin_tokenizer():
    from qtune.models import builtin_checkpoint, load_tokenizer

    return load_tokenizer(builtin_checkpoint("smollm2-135m-instruct"))


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def label_spans(tokenizer, labels) -> list[str]:
    """The decoded text of each contiguous run of trainable labels."""
    from qtune.data import IGNORE_INDEX

    spans, run = [], []
    for label in list(labels) + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if run:
                spans.append(decode(tokenizer, run))
            run = []
        else:
            run.append(label)
    return spans


TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)


def tiny_model(model_type: str = "llama", seed: int = 0, **config: object):  # noqa: ANN201 - a transformers model
    """A randomly initialised model of ``model_type`` in memory, in eval mode: ``TINY_CONFIG`` with ``config``
    over it. Every tiny model in the tests is built here (on disk: `tiny_model_dir`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**TINY_CONFIG, **config})).eval()


def tiny_model_dir(
    path: Path,
    model_type: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    tied: bool = True,
    max_shard_size: str | None = None,
    **config: object,
) -> Path:
    """A `tiny_model` with the built-in model's tokenizer (and its vocabulary), saved as a normal checkpoint
    (in shards of ``max_shard_size`` when given); ``config`` overrides its config."""
    if (path / "config.json").is_file():
        return path
    tokenizer = builtin_tokenizer()
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = tiny_model(model_type, seed, **{**settings, **config})
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(path)
    return path


def tiny_recipe(base: Path, out_dir: Path, **sections) -> dict:
    recipe = {
        "model": {"base": str(base)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"},
        "data": {
            "train": str(QUICKSTART_DATA / "quickstart_train.jsonl"),
            "validation": str(QUICKSTART_DATA / "quickstart_validation.jsonl"),
            "max_length": 128,
            "max_train_samples": 64,
        },
        "training": {
            "max_steps": 6,
            "micro_batch_size": 4,
            "learning_rate": 1e-3,
            "save_steps": 2,
            "logging_steps": 1,
            "optimizer": "paged_adamw_8bit",
            "gradient_checkpointing": False,
            "seed": 3,
            "warmup_steps": 1,
        },
        "tracking": {"mode": "offline", "project": "qtune-tests"},
        "output": {"dir": str(out_dir)},
        "evaluation": {"max_samples": 8, "max_new_tokens": 24},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


FULL_RUN_EXPORTS = [
    {"format": "gguf", "quant": "Q8_0"},
    {"format": "gguf", "quant": "Q4_K_M", "samples": 8, "seq_len": 128},
    {"format": "gptq", "group_size": 32, "samples": 8, "seq_len": 128},
    {"format": "awq", "group_size": 32, "samples": 8, "seq_len": 128},
]
FULL_RUN_EXPORT_NAMES = ["model-Q8_0.gguf", "model-Q4_K_M.gguf", "gptq-4bit-g32", "awq-4bit-g32"]


def full_run_recipe(work: Path, out_dir: Path, model_type: str = "llama", hidden: int = 128, **config: object) -> dict:
    """A tiny model through every stage of ``qtune run``: 4 training steps, every export format, gates open."""
    base = tiny_model_dir(work / model_type, model_type, hidden=hidden, **config)
    recipe = tiny_recipe(base, out_dir, training={"max_steps": 4})
    recipe["export"] = FULL_RUN_EXPORTS
    recipe["evaluation"]["gates"] = {"max_kl_vs_merged": 10.0, "min_task_ratio": 0.0}
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def qtune_cli(*args: str, env: dict[str, str | None] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """``qtune ARGS`` in a subprocess; ``env`` adds variables (None removes one)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "qtune", *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    history = json.loads((run_dir / "train_log.json").read_text())
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def wandb_records(path: Path) -> list:
    """Every record of an offline W&B run file (``run-*.wandb``), parsed with wandb's own protobufs.

    The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB
    blocks of chunks, each with a 7-byte header (crc32, length, type: full/first/middle/last).
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, header, position, pending, records = 32768, 7, 7, b"", []
    while position + header <= len(data):
        left_in_block = block - position % block
        if left_in_block < header:
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + header])
        if kind == 0 and length == 0:
            position += left_in_block
            continue
        chunk = data[position + header : position + header + length]
        position += header + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def dense_wide_llama_dir(src: Path, dst: Path, hidden: int = 768, heads: int = 12, kv_heads: int = 4, seed: int = 0) -> Path:
    """A function-preserving rewrite of the llama checkpoint ``src`` whose weights are dense and whose
    rows are ``hidden`` wide.

    The built-in model is a dequantized Q4_1 GGUF: every block of 32 weights holds at most 16 values,
    which 4-bit k-quants nearly reproduce, so its perplexity under each GGUF type says little about
    the quantizers. Here the residual stream is padded with zeros to ``hidden`` (with dummy heads
    whose projections are zero, and RMSNorm gains and eps rescaled for the wider mean), the norm
    gains are folded into the next linears, and the residual stream is rotated by a random
    orthogonal matrix. The logits are unchanged; every weight is now continuous, and with hidden =
    768 every row is a multiple of 256, so llama.cpp's mixes apply without fallbacks.
    """
    import json
    import math
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if (dst / "config.json").is_file():
        return dst
    config = json.loads((src / "config.json").read_text())
    width, head_dim = config["hidden_size"], config["hidden_size"] // config["num_attention_heads"]
    if heads * head_dim != hidden or hidden < width or heads // kv_heads != config["num_attention_heads"] // config["num_key_value_heads"]:
        raise ValueError(f"cannot widen {width} to {hidden} with {heads} heads of {head_dim} and {kv_heads} kv heads")
    weights = {k: v.to(torch.float64) for k, v in load_file(src / "model.safetensors").items()}
    weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    rotation, _ = torch.linalg.qr(torch.randn(hidden, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))

    def pad(t, rows: int, cols: int):
        out = torch.zeros(rows, cols, dtype=t.dtype)
        out[: t.shape[0], : t.shape[1]] = t
        return out

    def gain(name: str):
        out = torch.zeros(hidden, dtype=torch.float64)
        out[:width] = weights[name] * math.sqrt(width / hidden)
        return out

    def reads_residual(name: str, norm: str, rows: int | None = None):  # x -> W x after RMSNorm
        w = weights[name]
        return (pad(w, rows or w.shape[0], hidden) * gain(norm)) @ rotation

    def writes_residual(name: str, cols: int | None = None):  # W x added to the residual stream
        w = weights[name]
        return rotation.T @ pad(w, hidden, cols or w.shape[1])

    vocab = config["vocab_size"]
    out = {
        "model.embed_tokens.weight": pad(weights["model.embed_tokens.weight"], vocab, hidden) @ rotation,
        "lm_head.weight": reads_residual("lm_head.weight", "model.norm.weight"),
        "model.norm.weight": torch.ones(hidden, dtype=torch.float64),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float64)
        out[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.float64)
        out[p + "self_attn.q_proj.weight"] = reads_residual(p + "self_attn.q_proj.weight", p + "input_layernorm.weight", hidden)
        for name in ("k_proj", "v_proj"):
            out[p + f"self_attn.{name}.weight"] = reads_residual(p + f"self_attn.{name}.weight", p + "input_layernorm.weight", kv_heads * head_dim)
        out[p + "self_attn.o_proj.weight"] = writes_residual(p + "self_attn.o_proj.weight", hidden)
        for name in ("gate_proj", "up_proj"):
            out[p + f"mlp.{name}.weight"] = reads_residual(p + f"mlp.{name}.weight", p + "post_attention_layernorm.weight")
        out[p + "mlp.down_proj.weight"] = writes_residual(p + "mlp.down_proj.weight")
    if set(out) != set(weights):
        raise ValueError(f"unexpected tensors: {sorted(set(out) ^ set(weights))}")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)
    config.update(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=config["rms_norm_eps"] * width / hidden,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    save_file({k: v.to(torch.float32).contiguous() for k, v in out.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
