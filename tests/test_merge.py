"""Merging: both bases measured, the closer one chosen, and a checkpoint plain transformers can load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import tiny_llama_dir, tiny_recipe, write_recipe

from qtune import merge
from qtune.pipeline import evaluate_run, merge_run
from qtune.recipe import load_recipe
from qtune.train import train


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("merge")
    base = tiny_llama_dir(work / "llama", hidden=128)
    recipe = write_recipe(work / "recipe.yaml", tiny_recipe(base, work / "run", training={"max_steps": 4, "learning_rate": 5e-3}))
    run_dir = train(load_recipe(recipe))
    merge_run(run_dir)
    return run_dir


def test_merge_measures_both_bases_and_keeps_the_closer(merged_run: Path):
    report = json.loads((merged_run / "merge_report.json").read_text())
    assert set(report["kl"]) == {"dequantized", "original"}
    assert report["chosen"] == min(report["kl"], key=report["kl"].get)
    # The adapter was trained on the NF4 weights, so merging into them reproduces the adapter model.
    assert report["chosen"] == "dequantized"
    assert report["kl"]["dequantized"] <= 1e-3 and report["passes"]
    assert report["kl"]["original"] > report["kl"]["dequantized"]
    assert report["dtype"] in ("float16", "bfloat16")


def test_merged_checkpoint_loads_in_plain_transformers(merged_run: Path):
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"path = {str(merged_run / 'merged')!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(path)\n"
        "tok = AutoTokenizer.from_pretrained(path)\n"
        "assert tok.chat_template\n"
        "assert not any(m.startswith('qtune') or m.startswith('peft') for m in sys.modules), 'qtune or peft imported'\n"
        "print(model.dtype, sum(p.numel() for p in model.parameters()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    files = {p.name for p in (merged_run / "merged").iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt")) for name in files)


def test_merged_model_matches_the_adapter_model_on_eval(merged_run: Path):
    results = evaluate_run(merged_run, ["adapter", "merged"])
    assert results["adapter"]["perplexity"] == pytest.approx(results["merged"]["perplexity"], rel=1e-2)
    assert (merged_run / "eval" / "merged.json").is_file()


def test_apply_deltas_dora_formula():
    weight = torch.randn(6, 4)
    delta = torch.randn(6, 4) * 0.1
    magnitude = torch.rand(6) + 0.5
    merged = merge.apply_deltas({"m.weight": weight}, {"m": merge.LoraDelta(delta, magnitude)})["m.weight"]
    combined = weight + delta
    assert torch.allclose(merged, magnitude[:, None] * combined / combined.norm(dim=1, keepdim=True))
    assert torch.allclose(merged.norm(dim=1), magnitude)


def test_choose_dtype_prefers_fp16_when_it_fits():
    small = {"w": torch.ones(3)}
    assert merge.choose_dtype("auto", torch.float32, small) == torch.float16
    assert merge.choose_dtype("auto", torch.float32, {"w": torch.tensor([1e6])}) == torch.bfloat16
    assert merge.choose_dtype("auto", torch.bfloat16, small) == torch.bfloat16
    assert merge.choose_dtype("float32", torch.bfloat16, small) == torch.float32
