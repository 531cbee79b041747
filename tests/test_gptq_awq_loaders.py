"""Independent loader proof: GPTQModel 7.6.0 (through transformers) reads our GPTQ / AWQ checkpoints
and its logits match our own dequantize-and-run path.

GPTQModel pins numpy 2.2.x, so it lives in its own venv and runs as a subprocess. The interpreter
is taken from $QTUNE_ORACLE_PYTHON, else .cache/oracle-venv/bin/python in the repo, else this
Python; the tests skip when none of them has gptqmodel and optimum (bash scripts/build_oracles.sh builds
the venv).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

import support
from oracles import gptqmodel_python, require
from qtune.formats.awq import load_dequantized_awq_model, write_awq_checkpoint
from qtune.formats.gptq import load_dequantized_gptq_model, write_gptq_checkpoint
from qtune.layerwise import quantize_model_awq, quantize_model_gptq

pytestmark = pytest.mark.slow

KL_LIMIT = 1e-4

ORACLE_SCRIPT = r"""
import os, sys, json, torch
from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig
input_ids = torch.load(sys.argv[1])
for path, out in zip(sys.argv[2::2], sys.argv[3::2]):
    quant = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    if quant["quant_method"] == "gptq":
        loading = GPTQConfig(bits=quant["bits"], backend="gptq_torch")
    else:
        loading = AwqConfig(backend="torch_awq")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map="cpu", quantization_config=loading
    )
    kernels = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Linear")} - {"Linear"})
    with torch.no_grad():
        logits = model.eval()(input_ids).logits.float()
    torch.save({"logits": logits, "kernels": kernels}, out)
"""

TINY = {**support.TINY_CONFIG, "initializer_range": 0.1, "tie_word_embeddings": False}


def mean_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    log_p, log_q = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def build_checkpoints(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint dir, 'gptq' | 'awq'), each quantized by our own code."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (8, 32), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :8] = 0
    made: dict[str, tuple[Path, str]] = {}

    def llama(seed: int, **overrides: object) -> torch.nn.Module:
        return support.tiny_model("llama", seed, **{**TINY, **overrides})

    def of_type(model_type: str, seed: int, **overrides: object) -> torch.nn.Module:
        return support.tiny_model(model_type, seed, **{**TINY, **overrides})

    gptq_cases = {
        "gptq_sym_v1": (llama(1), dict(bits=4, group_size=32)),
        "gptq_asym_v2_act_order": (llama(2), dict(bits=4, group_size=32, sym=False, act_order=True)),
        "gptq_partial_group": (
            llama(3, hidden_size=96, intermediate_size=192, num_key_value_heads=4, tie_word_embeddings=True),
            dict(bits=4, group_size=64),
        ),
        "gptq_8bit": (llama(4), dict(bits=8, group_size=64)),
        "gptq_3bit_act_order": (llama(5), dict(bits=3, group_size=32, act_order=True)),
        "gptq_2bit_asym": (llama(7), dict(bits=2, group_size=32, sym=False)),
        "gptq_qwen3_asym": (of_type("qwen3", 10, head_dim=24), dict(bits=4, group_size=32, sym=False)),
        "gptq_gemma2": (of_type("gemma2", 14, head_dim=16, query_pre_attn_scalar=16, sliding_window=8), dict(bits=4, group_size=32)),
        "gptq_gemma3": (of_type("gemma3_text", 16, head_dim=16, query_pre_attn_scalar=16, sliding_window=8), dict(bits=4, group_size=32, sym=False)),
        "gptq_phi3_act_order": (of_type("phi3", 11, pad_token_id=0, eos_token_id=1), dict(bits=4, group_size=32, act_order=True)),
    }
    for name, (model, options) in gptq_cases.items():
        result = quantize_model_gptq(model, ids, mask, **options)
        made[name] = (write_gptq_checkpoint(model, result.quantized_layers, root / name), "gptq")

    awq_cases = {
        "awq_llama_mha": llama(6, num_key_value_heads=4),
        "awq_qwen2_gqa_tied": of_type("qwen2", 8, tie_word_embeddings=True),
        "awq_qwen3": of_type("qwen3", 12, head_dim=24),
        "awq_gemma2_mha": of_type("gemma2", 15, num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
        "awq_gemma3": of_type("gemma3_text", 17, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
        "awq_phi3_mha": of_type("phi3", 13, num_key_value_heads=4, pad_token_id=0, eos_token_id=1),  # scales folded into qkv's v rows
    }
    for name, model in awq_cases.items():
        result = quantize_model_awq(model, ids, mask, group_size=32)
        made[name] = (write_awq_checkpoint(model, result.quantized_layers, root / name), "awq")
    return made


@pytest.fixture(scope="module")
def oracle_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.Tensor, dict]]:
    python = gptqmodel_python()
    require(python, "GPTQModel and optimum (.cache/oracle-venv, or $QTUNE_ORACLE_PYTHON)")
    root = tmp_path_factory.mktemp("oracle")
    torch.set_num_threads(1)
    checkpoints = build_checkpoints(root)
    eval_ids = torch.randint(0, TINY["vocab_size"], (3, 24), generator=torch.Generator().manual_seed(9))
    torch.save(eval_ids, root / "eval_ids.pt")
    (root / "oracle.py").write_text(ORACLE_SCRIPT)
    args = [python, str(root / "oracle.py"), str(root / "eval_ids.pt")]
    for name, (path, _) in checkpoints.items():
        args += [str(path), str(root / f"{name}.oracle.pt")]
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = {}
    for name, (path, kind) in checkpoints.items():
        ours = (load_dequantized_gptq_model if kind == "gptq" else load_dequantized_awq_model)(path)
        with torch.no_grad():
            our_logits = ours(eval_ids).logits
        results[name] = (our_logits, torch.load(root / f"{name}.oracle.pt"))
    return results


@pytest.mark.parametrize(
    "name",
    [
        "gptq_sym_v1",
        "gptq_asym_v2_act_order",
        "gptq_partial_group",
        "gptq_8bit",
        "gptq_3bit_act_order",
        "gptq_2bit_asym",
        "gptq_qwen3_asym",
        "gptq_phi3_act_order",
        "gptq_gemma2",
        "gptq_gemma3",
        "awq_llama_mha",
        "awq_qwen2_gqa_tied",
        "awq_qwen3",
        "awq_phi3_mha",
        "awq_gemma2_mha",
        "awq_gemma3",
    ],
)
def test_gptqmodel_reads_our_checkpoint(oracle_results: dict, name: str) -> None:
    our_logits, oracle = oracle_results[name]
    expected_kernel = "AwqTorchLinear" if name.startswith("awq") else "TorchLinear"
    assert expected_kernel in oracle["kernels"], oracle["kernels"]  # really went through GPTQModel
    their_logits = oracle["logits"]
    assert mean_kl(our_logits, their_logits) <= KL_LIMIT
    assert torch.allclose(our_logits, their_logits, atol=1e-2, rtol=0)  # logits span about +-4
    # a random model has near-ties, so the top-1 may flip only where the top two are that close
    top2 = our_logits.topk(2, dim=-1).values
    flipped = our_logits.argmax(-1) != their_logits.argmax(-1)
    assert ((top2[..., 0] - top2[..., 1])[flipped] < 2e-2).all()
