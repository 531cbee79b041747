#!/usr/bin/env bash
# Every check CI runs, after `bash scripts/setup.sh --test`: lint and format, types, the quick lane
# (pytest -m "not slow"), then the slow lane (the end-to-end tests). Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=.venv/bin
"$VENV/ruff" check qtune tests scripts kernels
"$VENV/ruff" format --check qtune tests scripts kernels
"$VENV/basedpyright"
"$VENV/python" -m pytest -m "not slow" "$@"
"$VENV/python" -m pytest -m slow "$@"
