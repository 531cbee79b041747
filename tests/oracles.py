"""The independent programs that prove qtune's files, in one place for the tests and the benchmark scripts:
llama.cpp (its quantizer, its runtime, its converter, libggml's quantize_chunk), GPTQModel's and vLLM's
venvs, and chromium.

Each is optional here: a function returns None (or skips the calling test) when its oracle is absent;
`scripts/build_oracles.sh` builds them all. A test that needs one is marked `oracle` (``needs`` below, or
conftest.ORACLE_FIXTURES for the fixtures that run one), so that CI's quick lane can run before the oracles
are built; conftest fails a test that skips for a missing oracle without that mark, and, under
QTUNE_REQUIRE_ORACLES=1 (CI after the build), one that skips for a missing oracle at all.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
MISSING = "oracle missing"
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None  # located, not imported (no libllama load)


def require(present: object, oracle: str) -> None:
    """Skip the calling test (or fixture) when ``oracle`` is absent, in the words conftest recognises."""
    if not present:
        pytest.skip(f"{MISSING}: {oracle} (bash scripts/build_oracles.sh builds it)")


def oracle_marks(present: object, oracle: str) -> list[pytest.MarkDecorator]:
    """`oracle`, and a skip in the words conftest recognises when ``oracle`` is absent (for pytestmark)."""
    return [pytest.mark.oracle, pytest.mark.skipif(not present, reason=f"{MISSING}: {oracle} (bash scripts/build_oracles.sh builds it)")]


def needs(present: object, oracle: str) -> Callable[[T], T]:
    """Mark a test `oracle` and skip it, in the words conftest recognises, when ``oracle`` is absent."""

    def mark(test: T) -> T:
        for decorator in oracle_marks(present, oracle):
            test = decorator(test)
        return test

    return mark


needs_llama_cpp = needs(HAS_LLAMA_CPP, "llama-cpp-python")


def oracle_skip_failure(reason: str, marked: bool, required: bool) -> str | None:
    """Why a skip must fail its test instead (conftest's hook), or None: a skip for a missing oracle fails
    a test not marked `oracle` (CI's quick lane would skip it unseen), and any test when ``required``."""
    if MISSING not in reason:
        return None
    if not marked:
        return "it skipped for a missing oracle but is not marked `oracle`: mark it (tests/oracles.py needs) or list its fixture in ORACLE_FIXTURES"
    if required:
        return "QTUNE_REQUIRE_ORACLES=1 and an oracle is missing"
    return None


def libggml_base() -> Path | None:
    """llama-cpp-python's libggml-base.so (ggml_quantize_chunk and the type traits), found without importing it."""
    spec = importlib.util.find_spec("llama_cpp")  # locate without importing (no libllama load)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "lib" / "libggml-base.so"
    return path if path.exists() else None


def llama_quantize(
    src: Path, dst: Path, quant: str, imatrix: dict[str, np.ndarray] | None = None, threads: int = 1, tensor_types: dict[str, str] | None = None
) -> None:
    """llama.cpp's llama_model_quantize with the ftype (and --pure) of qtune's mix ``quant``, and
    ``tensor_types`` ({regex: type}) as llama-quantize's --tensor-type overrides."""
    import llama_cpp

    from qtune.formats.gguf.mixes import QUANT_MIXES

    mix = QUANT_MIXES[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(mix.file_type)
    params.pure = mix.pure
    params.nthread = threads
    keep = []  # what the C structs point into, alive until the call returns
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            key = name.encode()
            keep += [values, key]
            entries[i].name = key
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        params.imatrix = entries
        keep.append(entries)
    if tensor_types:
        from gguf import GGMLQuantizationType

        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, name) in enumerate(tensor_types.items()):
            key = pattern.encode()
            keep.append(key)
            overrides[i].pattern = key
            overrides[i].type = int(GGMLQuantizationType[name.upper()])
        params.tt_overrides = overrides
        keep.append(overrides)
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {dst}")


@lru_cache(maxsize=1)
def gptqmodel_python() -> str | None:
    """An interpreter with GPTQModel and optimum: $QTUNE_ORACLE_PYTHON, else the oracle venv, else this one."""
    candidates = [os.environ.get("QTUNE_ORACLE_PYTHON"), str(REPO / ".cache/oracle-venv/bin/python"), sys.executable]
    probe = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('gptqmodel') and u.find_spec('optimum') else 1)"
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            if subprocess.run([candidate, "-c", probe], capture_output=True).returncode == 0:
                return candidate
    return None


def vllm_python() -> Path | None:
    """vLLM's CPU build, in its own venv (.cache/vllm-venv)."""
    python = REPO / ".cache" / "vllm-venv" / "bin" / "python"
    return python if python.is_file() else None


def vllm_runs(runs: list[dict], work: Path) -> list[dict]:
    """Greedy answers from vLLM, one run per model, all in one process (scripts/vllm_answers.py: each run
    is {"model", "prompts" as token ids, "max_tokens", "dtype", optional "ignore_eos", "stop_token_ids"});
    each result is {"answers": [[token ids], ...]} or {"error": vLLM's refusal}."""
    python = vllm_python()
    require(python, "vLLM's CPU build (.cache/vllm-venv)")
    work.mkdir(parents=True, exist_ok=True)
    request, answers = work / "vllm-request.json", work / "vllm-answers.json"
    request.write_text(json.dumps({"runs": [{**run, "model": str(run["model"])} for run in runs]}))
    script = REPO / "scripts" / "vllm_answers.py"
    done = subprocess.run([str(python), str(script), str(request), str(answers)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(answers.read_text())["runs"]


def vllm_greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int, dtype: str, work: Path, stop_token_ids: list[int] | None = None) -> list[list[int]]:
    """vLLM's greedy answers (token ids) for prompts given as token ids: ``max_tokens`` each, or up to one of
    ``stop_token_ids`` when given; an AssertionError with vLLM's own message when it refuses the model."""
    stops = {"ignore_eos": False, "stop_token_ids": stop_token_ids} if stop_token_ids else {"ignore_eos": True}
    (result,) = vllm_runs([{"model": model_dir, "prompts": prompts, "max_tokens": max_tokens, "dtype": dtype, **stops}], work)
    assert "answers" in result, f"vLLM refused {model_dir.name}: {result['error']}"
    return result["answers"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def llama_cpp_source() -> Path | None:
    """llama.cpp's sources (for convert_hf_to_gguf.py): $LLAMA_CPP_SRC or the sdist unpacked under .cache/sdist."""
    env = os.environ.get("LLAMA_CPP_SRC")
    candidates = [Path(env)] if env else sorted(REPO.glob(".cache/sdist/llama_cpp_python-*/vendor/llama.cpp"))
    return next((c for c in candidates if (c / "convert_hf_to_gguf.py").is_file()), None)


needs_llama_cpp_source = needs(llama_cpp_source(), "llama.cpp's sources (the llama-cpp-python sdist under .cache/sdist, or $LLAMA_CPP_SRC)")


def convert_with_llama_cpp(checkpoint: Path, outfile: Path, *args: str) -> Path:
    """Run llama.cpp's own convert_hf_to_gguf.py on a checkpoint (skips the test when its sources are absent)."""
    source = llama_cpp_source()
    require(source, "llama.cpp's sources (the llama-cpp-python sdist under .cache/sdist, or $LLAMA_CPP_SRC)")
    assert source is not None
    paths = [str(source / "gguf-py")]
    if importlib.util.find_spec("sentencepiece") is None:
        # the converter imports sentencepiece before noticing there is no tokenizer.model
        stub = outfile.parent / "sentencepiece-stub"
        stub.mkdir(exist_ok=True)
        (stub / "sentencepiece.py").write_text("class SentencePieceProcessor:\n    pass\n")
        paths.append(str(stub))
    subprocess.run(
        [sys.executable, str(source / "convert_hf_to_gguf.py"), str(checkpoint), *args, "--outfile", str(outfile)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"},
    )
    return outfile
