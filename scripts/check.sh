#!/usr/bin/env bash
# Every check CI runs, after `bash scripts/setup.sh --test`: lint and format, types, then the tests: the
# quick lane (pytest -m "not slow") and the slow lane (the end-to-end tests). The quickstart, the longest
# test by far, runs beside both lanes (its thread count follows the cores the others leave free; its gates
# hold at one thread and at two, docs/benchmarks.md). Extra arguments go to every pytest run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=.venv/bin
QUICKSTART=tests/test_quickstart.py::test_quickstart_meets_its_accuracy_targets
"$VENV/ruff" check qtune tests scripts kernels
"$VENV/ruff" format --check qtune tests scripts kernels
"$VENV/basedpyright"

log=$(mktemp -t qtune-quickstart-test.XXXXXX)
QTUNE_QUICKSTART_THREADS=adaptive "$VENV/python" -m pytest --basetemp="$log.tmp" "$QUICKSTART" "$@" > "$log" 2>&1 &
quickstart=$!
trap 'kill "$quickstart" 2> /dev/null || true' EXIT
lanes=0
"$VENV/python" -m pytest -m "not slow" "$@" || lanes=$?
if (( lanes == 0 )); then
  "$VENV/python" -m pytest -m slow --deselect "$QUICKSTART" "$@" || lanes=$?
fi
status=0
wait "$quickstart" || status=$?
trap - EXIT
echo "---- $QUICKSTART (run beside the lanes)"
cat "$log"
rm -rf "$log" "$log.tmp"
(( lanes == 0 && status == 0 ))
