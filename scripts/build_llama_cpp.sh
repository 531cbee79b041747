#!/usr/bin/env bash
# Build llama-cpp-python once into a wheel cache, then install it.
#
# llama-cpp-python is the oracle of qtune's GGUF tests (tests/test_ggml_quants.py loads its
# libggml-base.so) and the runtime `qtune eval` scores GGUF files with. PyPI has only its sdist, and
# compiling llama.cpp takes about 6 minutes on 2 cores, so the wheel is kept in a cache directory
# and reused (CI: cache that directory).
#
# The build is portable, never -march=native: a CPU (or a virtual machine) can advertise instructions
# it does not run. One seen here advertised AMX, whose first tile load in a Q8_0 matmul died with
# SIGILL. The instruction sets are the ones the kernel reports as usable (/proc/cpuinfo flags, which
# Linux clears for features the OS has not enabled), capped at x86-64-v3 (AVX2, FMA, F16C, BMI2) so
# that one wheel runs the same kernels on every machine that can run it. The set is part of the
# cache key: a wheel built for another set is never reused.
#
# --wheel-only builds (or finds) the wheel and installs nothing.
#
# Environment:
#   PYTHON                      interpreter to install into (default: .venv/bin/python, else python3)
#   LLAMA_CPP_WHEEL_DIR         wheel cache (default: <repo>/.cache/wheels)
#   LLAMA_CPP_PYTHON_VERSION    default 0.3.36 (the ggml version qtune's quantizers are checked against)
#   CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: nproc)
#   CMAKE_ARGS                  appended to the portable flags (later flags win)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WHEEL_DIR="${LLAMA_CPP_WHEEL_DIR:-$ROOT/.cache/wheels}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi

# x86-64 only: the instruction sets both the CPU and the OS allow, up to x86-64-v3.
FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
ISA="portable"
if [[ "$(uname -m)" == "x86_64" ]]; then
  cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  ISA="x86"
  for pair in sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2; do
    flag="${pair%%:*}" option="${pair##*:}"
    if [[ "$cpu_flags" == *" $flag "* ]]; then FLAGS+=("-DGGML_$option=ON"); ISA+="-$flag"; else FLAGS+=("-DGGML_$option=OFF"); fi
  done
fi
# The wheel's file name cannot carry the build flags, so each set of flags gets its own folder.
[[ -n "${CMAKE_ARGS:-}" ]] && ISA+="-$(printf '%s' "$CMAKE_ARGS" | sha1sum | cut -c1-8)"
export CMAKE_ARGS="${FLAGS[*]} ${CMAKE_ARGS:-}"
WHEEL_DIR="$WHEEL_DIR/$ISA"

mkdir -p "$WHEEL_DIR"
shopt -s nullglob
wheels=("$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl)

if (( ${#wheels[@]} == 0 )); then
  echo "build_llama_cpp: building llama-cpp-python $VERSION for $ISA into $WHEEL_DIR (several minutes)"
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$PYTHON" -m pip wheel --no-deps --no-cache-dir "llama-cpp-python==$VERSION" -w "$WHEEL_DIR"
  wheels=("$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl)
  if (( ${#wheels[@]} == 0 )); then
    echo "build_llama_cpp: pip wheel finished but no llama_cpp_python-$VERSION wheel is in $WHEEL_DIR" >&2
    exit 1
  fi
else
  echo "build_llama_cpp: using cached ${wheels[0]}"
fi

[[ "${1:-}" == "--wheel-only" ]] && exit 0
"$PYTHON" -m pip install "${wheels[0]}"
# A build for other flags may already be installed under the same version: replace it.
"$PYTHON" -m pip install --no-deps --force-reinstall "${wheels[0]}"

"$PYTHON" - <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llama_cpp")
lib = pathlib.Path(spec.origin).parent / "lib" / "libggml-base.so" if spec else None
if lib is None or not lib.exists():
    sys.exit(f"build_llama_cpp: llama_cpp is installed but {lib} is missing")
print(f"build_llama_cpp: ok, {lib}")
PY
