#!/usr/bin/env bash
# Build device_deps/ (git-ignored): pure-python packages, unpacked, for the GPU machine, which has
# torch 2.11+cu130, triton, transformers, accelerate and peft but no bitsandbytes and no network.
#   scripts/build_device_deps.sh            # here, where pip reaches PyPI
#   PYTHONPATH=device_deps python3 ...      # there (carry device_deps with the run)
# bitsandbytes keeps only libbitsandbytes_cuda130.so (torch there is CUDA 13.0); peft is pinned
# to the version tested here. The folder must stay under 64 MiB (the device's tree limit).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/device_deps"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
# pydantic and its parts, and gguf: qtune.recipe imports them (the fused-kernel switch test and the training benchmarks);
# liger-kernel: training.liger
PACKAGES=(bitsandbytes==0.50.2 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0 liger-kernel==0.8.5)
KEEP_LIB=libbitsandbytes_cuda130.so

WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT

"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$WHEELS" "${PACKAGES[@]}"

rm -rf "$OUT"
mkdir -p "$OUT"
for wheel in "$WHEELS"/*.whl; do
  "$PYTHON" -m zipfile -e "$wheel" "$OUT"
done

find "$OUT/bitsandbytes" -maxdepth 1 -name 'libbitsandbytes_*' ! -name "$KEEP_LIB" -delete
[ -f "$OUT/bitsandbytes/$KEEP_LIB" ] || { echo "error: $KEEP_LIB missing from the wheel" >&2; exit 1; }
find "$OUT" -name '__pycache__' -type d -prune -exec rm -rf {} +

size_kib=$(du -sk "$OUT" | cut -f1)
if [ "$size_kib" -gt $((64 * 1024)) ]; then
  echo "error: device_deps is $((size_kib / 1024)) MiB, over the 64 MiB limit" >&2
  exit 1
fi
echo "device_deps: $((size_kib / 1024)) MiB ($(ls "$OUT" | tr '\n' ' '))"
