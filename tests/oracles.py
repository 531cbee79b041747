"""The independent programs that prove qtune's files, in one place for the tests and the benchmark scripts:
llama.cpp (its quantizer, its converter, libggml's quantize_chunk) and GPTQModel's venv.

Each is optional here: a function returns None (or skips the calling test) when its oracle is absent;
`scripts/setup.sh --test` builds them all.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def libggml_base() -> Path | None:
    """llama-cpp-python's libggml-base.so (ggml_quantize_chunk and the type traits), found without importing it."""
    spec = importlib.util.find_spec("llama_cpp")  # locate without importing (no libllama load)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "lib" / "libggml-base.so"
    return path if path.exists() else None


def llama_quantize(src: Path, dst: Path, quant: str, imatrix: dict[str, np.ndarray] | None = None, threads: int = 1) -> None:
    """llama.cpp's llama_model_quantize with the ftype (and --pure) of qtune's mix ``quant``."""
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


def llama_cpp_source() -> Path | None:
    """llama.cpp's sources (for convert_hf_to_gguf.py): $LLAMA_CPP_SRC or the sdist unpacked under .cache/sdist."""
    env = os.environ.get("LLAMA_CPP_SRC")
    candidates = [Path(env)] if env else sorted(REPO.glob(".cache/sdist/llama_cpp_python-*/vendor/llama.cpp"))
    return next((c for c in candidates if (c / "convert_hf_to_gguf.py").is_file()), None)


def convert_with_llama_cpp(checkpoint: Path, outfile: Path, *args: str) -> Path:
    """Run llama.cpp's own convert_hf_to_gguf.py on a checkpoint (skips the test when its sources are absent)."""
    import pytest

    source = llama_cpp_source()
    if source is None:
        pytest.skip("llama.cpp sources not found: unpack the llama-cpp-python sdist into .cache/sdist or set LLAMA_CPP_SRC")
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
