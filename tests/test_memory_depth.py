"""Bounded memory: two random Llamas of one width, differing only in depth, through every stage of a run,
each stage in its own process (scripts/bench_memory.py). Memory may grow with the batch of hidden states
and one block, not with depth: whole-model float32 code would grow by at least one float32 layer per layer.

Issue 12's targets, as a fraction of one decoder layer's float32 size per extra layer: merge and every
export at most 0.15, evaluation at most 0.6 (it holds the merged model in half precision). The merge
(which runs the adapter model block by block too) and the exports meet theirs and are held to it.
Evaluation's anonymous memory is held to its 0.6 target; its high-water mark (0.62-0.75 measured: the
bf16 model's mapped pages plus a KV cache that, at this small width, is large next to a layer) is held
to 0.95, a bound that whole-model float32 code (1.0 or more) still breaks; docs/benchmarks.md states it. Both the anonymous
memory and the resident high-water mark (which also counts memory-mapped checkpoint pages) are checked.
Training (two steps) has no target in the issue; it holds the base in NF4 (0.14 of float32) plus
per-layer LoRA factors, their gradients and Adam's moments, and is held to 0.5 (0.36-0.40 measured) and
its high-water mark, which adds the checkpoint's mapped bf16 pages, to 0.8 (0.50-0.55). Before CPU
training mapped its large allocations (qtune.host_memory) it grew by 0.6-2.0 from heap fragmentation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_memory  # noqa: E402

SHAPE = bench_memory.Shape(hidden=1024, intermediate=4096, heads=8, kv_heads=4)
DEPTHS = (2, 8)
STREAMED = ("merge", "export:gptq", "export:awq", "export:gguf-q4km")
TARGETS = {**{stage: 0.15 for stage in STREAMED}, "eval": 0.6}  # issue 12
BOUNDS = {**TARGETS, "train": 0.5}
HWM_BOUNDS = {**BOUNDS, "eval": 0.95, "train": 0.8}  # eval's mapped bf16 pages (0.5) plus KV cache and noise: 0.40-0.75 measured


# Fewer held-out rows and calibration tokens than the benchmark's: the same growth, a third of the time.
WORKLOAD = bench_memory.Workload(validation_rows=16, calibration_samples=4, calibration_seq_len=64)


@pytest.fixture(scope="module")
def growth(tmp_path_factory) -> dict[str, dict]:
    results = bench_memory.measure(tmp_path_factory.mktemp("depth"), SHAPE, list(DEPTHS), list(BOUNDS), workload=WORKLOAD)
    return {row["stage"]: row for row in bench_memory.growth_table(results, SHAPE)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(BOUNDS))
def test_peak_memory_barely_grows_with_depth(growth: dict[str, dict], stage: str):
    row = growth[stage]
    fp32_layer_mb = 4 * SHAPE.layer_params / 2**20
    low, high = DEPTHS
    hwm_growth = (row[f"hwm_mb_{high}"] - row[f"hwm_mb_{low}"]) / (high - low) / fp32_layer_mb
    print(f"{stage}: anon {row['growth_vs_fp32_layer']:.3f}, hwm {hwm_growth:.3f} of a {fp32_layer_mb:.0f} MB fp32 layer per layer")
    assert row["growth_vs_fp32_layer"] <= BOUNDS[stage], row
    assert hwm_growth <= HWM_BOUNDS[stage], row
