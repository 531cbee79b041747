#!/usr/bin/env bash
# Build llama-cpp-python once into a wheel cache, then install it.
#
# llama-cpp-python is the oracle of qtune's GGUF tests (tests/test_ggml_quants.py loads its
# libggml-base.so). PyPI has only its sdist, and compiling llama.cpp takes about 6 minutes on
# 2 cores, so the wheel is kept in a cache directory and reused (CI: cache that directory).
#
# Environment:
#   PYTHON                      interpreter to install into (default: .venv/bin/python, else python3)
#   LLAMA_CPP_WHEEL_DIR         wheel cache (default: <repo>/.cache/wheels)
#   LLAMA_CPP_PYTHON_VERSION    default 0.3.36 (the ggml version qtune's quantizers are checked against)
#   CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: nproc)
#   CMAKE_ARGS                  passed through to the llama.cpp build, e.g. "-DGGML_NATIVE=OFF" for a
#                               wheel that must run on other CPUs than the one that built it
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WHEEL_DIR="${LLAMA_CPP_WHEEL_DIR:-$ROOT/.cache/wheels}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi

mkdir -p "$WHEEL_DIR"
shopt -s nullglob
wheels=("$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl)

if (( ${#wheels[@]} == 0 )); then
  echo "build_llama_cpp: building llama-cpp-python $VERSION into $WHEEL_DIR (several minutes)"
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$PYTHON" -m pip wheel --no-deps "llama-cpp-python==$VERSION" -w "$WHEEL_DIR"
  wheels=("$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl)
  if (( ${#wheels[@]} == 0 )); then
    echo "build_llama_cpp: pip wheel finished but no llama_cpp_python-$VERSION wheel is in $WHEEL_DIR" >&2
    exit 1
  fi
else
  echo "build_llama_cpp: using cached ${wheels[0]}"
fi

"$PYTHON" -m pip install "${wheels[0]}"

"$PYTHON" - <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llama_cpp")
lib = pathlib.Path(spec.origin).parent / "lib" / "libggml-base.so" if spec else None
if lib is None or not lib.exists():
    sys.exit(f"build_llama_cpp: llama_cpp is installed but {lib} is missing")
print(f"build_llama_cpp: ok, {lib}")
PY
