"""Every architecture beyond llama's own layout, through every stage of ``qtune run`` on a tiny random
model of its real config: train, merge, GGUF / GPTQ / AWQ export, evaluation of each artifact (the GGUF
files in llama.cpp) and the report. Their formats are proven against the independent readers in
test_gguf_export.py (llama.cpp against transformers) and test_gptq_awq_loaders.py (GPTQModel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oracles import needs_llama_cpp
from qtune.gguf_model import gguf_runtime
from support import FULL_RUN_EXPORT_NAMES, FULL_RUN_EXPORTS, full_run_recipe, qtune_cli, write_recipe

EXPORTS = [e for e in FULL_RUN_EXPORTS if e.get("quant") != "Q4_K_M"]  # one GGUF type is enough here: CI time
EXPORT_NAMES = [n for n in FULL_RUN_EXPORT_NAMES if "Q4_K_M" not in n]

NEW_ARCHITECTURES = {
    "qwen3": {"head_dim": 24},  # q/k norms; heads x head_dim (96) wider than hidden
    "phi3": {"num_key_value_heads": 4},  # fused qkv and gate_up; MHA, so AWQ folds o's scales into qkv's v rows
    # norms storing weight - 1, soft caps, GELU, every other layer sliding; llama.cpp scales queries by head_dim
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"]},
}


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("model_type", list(NEW_ARCHITECTURES))
def test_run_end_to_end(tmp_path: Path, model_type: str):
    recipe = full_run_recipe(tmp_path, tmp_path / "run", model_type, hidden=64, **NEW_ARCHITECTURES[model_type])
    recipe["export"] = EXPORTS
    recipe["evaluation"] |= {"max_samples": 4, "max_new_tokens": 8}
    result = qtune_cli("run", str(write_recipe(tmp_path / "recipe.yaml", recipe)), timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "merged" / "config.json").read_text())["model_type"] == model_type
    scores = {name: json.loads((run_dir / "eval" / f"{name}.json").read_text()) for name in ["base", "adapter", "merged", *EXPORT_NAMES]}
    for name, scored in scores.items():
        assert scored["status"] == "ok", (name, scored)
        assert np.isfinite(scored["perplexity"]) and scored["size_bytes"] > 0, name
        if name != "merged":
            assert scored["kl_vs_merged"] > -1e-6 and 0 <= scored["top1_vs_merged"] <= 1, name
    assert scores["adapter"]["kl_vs_merged"] <= 1e-3  # the merge is faithful
    assert scores["base"]["kl_vs_merged"] > scores["adapter"]["kl_vs_merged"]  # training changed the model
    assert scores["model-Q8_0.gguf"]["runtime"] == gguf_runtime()
    # llama.cpp runs the Q8_0 file as transformers runs the merged model: closer than the base is (measured
    # 6e-6 to 8e-6 against 1.7e-3 to 2.5e-3 on these tiny models)
    assert scores["model-Q8_0.gguf"]["kl_vs_merged"] < scores["base"]["kl_vs_merged"] / 10
    report_md = (run_dir / "report.md").read_text()
    for name in scores:
        assert f"| {name} |" in report_md, name
