#!/usr/bin/env bash
# Every check CI runs, after `bash scripts/setup.sh --test`, failing fast:
#   1. lint and format (ruff), types (basedpyright);
#   2. the quick lane without oracles (pytest -m "not slow and not oracle"), while scripts/build_oracles.sh
#      builds the oracles beside it without touching .venv;
#   3. the oracles installed, then, in one pytest run so that their fixtures are built once, the quick tests
#      that need one and the slow lane (-m "oracle or slow": the end-to-end tests). The quickstart, the
#      longest test by far, runs beside this step (its thread count follows the cores the others leave
#      free; its gates hold at one thread and at two, docs/benchmarks.md).
# In step 3 an oracle that is missing fails its test instead of skipping it (QTUNE_REQUIRE_ORACLES=1).
# Extra arguments go to every pytest run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=.venv/bin
QUICKSTART=tests/test_quickstart.py::test_quickstart_meets_its_accuracy_targets
"$VENV/ruff" check qtune tests scripts kernels
"$VENV/ruff" format --check qtune tests scripts kernels
"$VENV/basedpyright"

build_log=$(mktemp -t qtune-oracles.XXXXXX)
bash scripts/build_oracles.sh --no-install > "$build_log" 2>&1 &
builder=$!
trap 'kill "$builder" 2> /dev/null || true' EXIT
"$VENV/python" -m pytest -m "not slow and not oracle" "$@"
wait "$builder" || { cat "$build_log"; echo "check: building the oracles failed (log above)" >&2; exit 1; }
bash scripts/build_oracles.sh >> "$build_log" 2>&1 || { cat "$build_log"; echo "check: installing the oracles failed (log above)" >&2; exit 1; }
rm -f "$build_log"

export QTUNE_REQUIRE_ORACLES=1
log=$(mktemp -t qtune-quickstart-test.XXXXXX)
QTUNE_QUICKSTART_THREADS=adaptive "$VENV/python" -m pytest --basetemp="$log.tmp" "$QUICKSTART" "$@" > "$log" 2>&1 &
quickstart=$!
trap 'kill "$quickstart" 2> /dev/null || true' EXIT
lanes=0
"$VENV/python" -m pytest -m "oracle or slow" --deselect "$QUICKSTART" "$@" || lanes=$?
status=0
wait "$quickstart" || status=$?
trap - EXIT
echo "---- $QUICKSTART (run beside the lanes)"
cat "$log"
rm -rf "$log" "$log.tmp"
(( lanes == 0 && status == 0 ))
