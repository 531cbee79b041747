"""The quickstart end to end, as a user runs it: one command from the recipe to scored, deployable
artifacts and the report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import GenerationConfig

from oracles import vllm_runs
from support import REPO, qtune_cli

EXPORTS = ("model-Q8_0.gguf", "model-Q4_K_M.gguf", "ct-w4a16-g32-asym", "awq-4bit-g32-gptq")
IN_VLLM = {"merged": "float32", "ct-w4a16-g32-asym": "float16", "awq-4bit-g32-gptq": "float16"}  # vLLM's W4A16 kernels take half precision


@pytest.mark.slow
@pytest.mark.oracle  # llama.cpp scores its GGUF files, vLLM runs its checkpoints
def test_quickstart_meets_its_accuracy_targets(tmp_path: Path):
    run_dir = tmp_path / "quickstart"
    # scripts/check.sh runs this beside the other tests: then the thread count follows the free cores
    env = {"OMP_NUM_THREADS": None} if os.environ.get("QTUNE_QUICKSTART_THREADS") == "adaptive" else None
    result = qtune_cli("run", str(REPO / "recipes" / "quickstart.yaml"), "--set", f"output.dir={run_dir}", env=env, timeout=4800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scores = {name: json.loads((run_dir / "eval" / f"{name}.json").read_text()) for name in ("base", "adapter", "merged", *EXPORTS)}
    assert scores["base"]["task_metric"] <= 0.20
    assert scores["adapter"]["task_metric"] >= 0.80
    assert scores["merged"]["task_metric"] >= 0.80
    for name in EXPORTS:  # every deliverable within 5 points of the merged model (the gate), with 2 to spare
        assert scores[name]["status"] == "ok" and scores[name]["task_metric"] >= scores["merged"]["task_metric"] - 0.03, (name, scores[name])
    merge_report = json.loads((run_dir / "merge_report.json").read_text())
    assert merge_report["kl"][merge_report["chosen"]] <= 1e-3
    report = (run_dir / "report.md").read_text()
    for name in ("base", "adapter", "merged", *EXPORTS):
        assert f"| {name} |" in result.stdout and f"- {name}: " in report
    assert "FAIL" not in report and (run_dir / "report.html").is_file()
    _answers_like_its_evaluation_in_vllm(run_dir, scores, tmp_path / "vllm")  # without vLLM's venv this skips, the rest checked


def _answers_like_its_evaluation_in_vllm(run_dir: Path, scores: dict[str, dict], work: Path) -> None:
    """vLLM loads each file of IN_VLLM unchanged; its greedy answers equal those qtune's evaluation
    recorded (every one for the merged model, 90% for an export), and score within one answer of it."""
    from qtune import models
    from qtune.data import prepare_data
    from qtune.metrics import stop_token_ids
    from qtune.recipe import load_recipe
    from qtune.scorers import resolve_scorer

    loaded = load_recipe(run_dir / "recipe.resolved.yaml")
    recipe = loaded.recipe
    tokenizer = models.load_tokenizer(run_dir / "merged")
    prompts = prepare_data(recipe.data, tokenizer, loaded.base_dir, recipe.training.seed).eval_prompts
    longest = max(len(tokenizer(p["reference"], add_special_tokens=False)["input_ids"]) for p in prompts)
    stops = stop_token_ids(SimpleNamespace(generation_config=GenerationConfig.from_pretrained(run_dir / "merged")), tokenizer)
    ids = [tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in prompts]
    budget = min(recipe.evaluation.max_new_tokens, longest + 4)  # as qtune.metrics.task_accuracy
    files = {name: run_dir / "merged" if name == "merged" else run_dir / "exports" / name for name in IN_VLLM}
    runs = [{"model": files[name], "prompts": ids, "max_tokens": budget, "dtype": dtype, "stop_token_ids": stops} for name, dtype in IN_VLLM.items()]
    scorer = resolve_scorer(recipe.evaluation.scorer)
    for name, result in zip(IN_VLLM, vllm_runs(runs, work)):
        assert "answers" in result, f"vLLM refused {name}: {result.get('error')}"
        answers = [tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True).strip() for tokens in result["answers"]]
        correct = sum(bool(scorer(answer, p["reference"])) for answer, p in zip(answers, prompts))
        assert abs(correct - scores[name]["correct"]) <= 1, (name, correct, scores[name]["correct"])
        by_prompt = {p["prompt"][-200:]: answer for p, answer in zip(prompts, answers)}
        recorded = scores[name]["samples"]
        agree = sum(by_prompt[sample["prompt"]] == sample["answer"] for sample in recorded)
        assert agree == len(recorded) if name == "merged" else agree >= 0.9 * len(recorded), (name, agree, len(recorded))


def test_stage_commands_explain_a_missing_run(tmp_path: Path):
    for command in ("merge", "eval"):
        result = qtune_cli(command, str(tmp_path))
        assert result.returncode == 2
        assert "not a qtune run directory" in result.stderr and "Traceback" not in result.stderr
