#!/usr/bin/env bash
# Everything the GPU path needs proven, in one call on a lent H100/H200 (issue 14, point 4):
#   1. the kernel and liger tests, compiled on the device (tests/test_kernels.py, tests/test_liger.py);
#   2. NF4 dequant against copy bandwidth and bitsandbytes, W4A16 at batch 1/16/128 against the
#      bandwidth floor and dequantize-then-cuBLAS (scripts/bench_kernels.py --skip-train);
#   3. QLoRA steps of a random Llama-3-8B-shaped model, one process per variant (plain transformers +
#      peft + bitsandbytes; qtune with fused kernels and liger-kernel off and on), with step-0 loss and
#      gradient agreement (scripts/bench_qlora_step.py);
# then one table (gpu_verify.md) and one JSON (gpu_verify.json), under $OUT (the device tool's) or .cache/gpu-verify.
#
#   here:   bash scripts/build_device_deps.sh          # device_deps/: bitsandbytes, peft, pydantic, gguf, liger-kernel
#   there:  bash scripts/gpu_verify.sh                 # carry device_deps; GPU_VERIFY_LAYERS=32 for the whole depth
#   here:   bash scripts/gpu_verify.sh --smoke-cpu     # tiny shapes on CPU: checks the script, times nothing
#
# The machine has torch 2.11, Triton 3.6, transformers 5.17 and no network; device_deps brings the rest.
# Each part has its own time limit (tests 120 s, kernels 100 s, each step variant 50 s), so one that hangs cannot
# take the others down and the whole stays under 8 minutes. None of it has run on a GPU yet: the limits and the
# default depth (16 layers) are guesses for the first run to correct.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RESULTS="${OUT:-$ROOT/.cache/gpu-verify}"
mkdir -p "$RESULTS"
rm -f "$RESULTS"/step-*.json
export PYTHONUNBUFFERED=1
SMOKE=()
if [[ "${1:-}" == --smoke-cpu ]]; then  # here: the project's venv (device_deps holds the GPU machine's Python 3.12 wheels)
  SMOKE=(--smoke-cpu)
  PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
else
  export PYTHONPATH="$ROOT/device_deps:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  PYTHON="${PYTHON:-python3}"
fi
LAYERS="${GPU_VERIFY_LAYERS:-16}"  # 32 (the whole 8B depth) if the first runs show the time allows

if [[ ${#SMOKE[@]} == 0 ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_verify: no CUDA device (use --smoke-cpu to check the script on CPU)"
  exit 0
fi
"$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$RESULTS/versions.txt"

status=0
if [[ ${#SMOKE[@]} == 0 ]]; then  # on CPU the test suite runs them (CI); here they must run compiled
  timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_liger.py > "$RESULTS/tests.log" 2>&1 || status=1
  echo "tests (compiled): $(tail -n 1 "$RESULTS/tests.log")"
fi
timeout 100 "$PYTHON" scripts/bench_kernels.py --skip-train "${SMOKE[@]}" > "$RESULTS/kernels.log" 2>&1 || status=1
sed -n '/^## summary/,$p' "$RESULTS/kernels.log"

for variant in plain qtune qtune-fused qtune-liger qtune-fused-liger; do
  timeout 50 "$PYTHON" scripts/bench_qlora_step.py --variant "$variant" --layers "$LAYERS" --json "$RESULTS/step-$variant.json" \
    "${SMOKE[@]}" > "$RESULTS/step-$variant.log" 2>&1 || status=1
  [[ -f "$RESULTS/step-$variant.json" ]] || echo "{\"variant\": \"$variant\", \"error\": \"no result in 50 s (see step-$variant.log)\"}" > "$RESULTS/step-$variant.json"
done
{
  echo "# gpu_verify: $(cat "$RESULTS/versions.txt")"
  echo
  [[ -f "$RESULTS/tests.log" ]] && echo "tests (compiled): $(tail -n 1 "$RESULTS/tests.log")" && echo
  sed -n '/^## summary/,$p' "$RESULTS/kernels.log"
  echo
  echo "## QLoRA steps, Llama-3-8B shape, $LAYERS layers, seq 2048, paged 8-bit AdamW, bf16 autocast (one process each; on CPU: tiny)"
  "$PYTHON" scripts/bench_qlora_step.py --table "$RESULTS"
} > "$RESULTS/gpu_verify.md"
cat "$RESULTS/gpu_verify.md"
exit $status
