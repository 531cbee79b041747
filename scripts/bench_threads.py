"""How GPTQ and AWQ export time degrades when other processes share the cores (issue 18, point 1).

Each measurement quantizes the first --layers decoder blocks of a run's merged model (GPTQ 4-bit g32 asym,
and AWQ g32 with GPTQ rounding, the quickstart's settings) in a fresh process, with
--busy processes spinning on the CPU beside it. Thread settings are applied per process before torch
starts:

  default   torch's own choice (one thread per core, OpenMP's default wait policy)
  passive   OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning
  spin10k   GOMP_SPINCOUNT=10000: spin briefly (libgomp's default is 300,000 spins), then sleep
  spin100k  GOMP_SPINCOUNT=100000
  qtune     what `qtune` itself sets at start-up (qtune.cpu.configure_threads)
  single    one thread

Idle and loaded runs alternate, and every configuration runs in each round, so load drift on a shared
machine hits all of them alike. The table gives median seconds and loaded/idle ratios.

    .venv/bin/python scripts/bench_threads.py RUN_DIR --layers 6 --busy 0 1 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin100k": {"GOMP_SPINCOUNT": "100000"},
    "qtune": None,  # qtune.cpu.configure_threads() in the worker
    "single": {"OMP_NUM_THREADS": "1"},
}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "GOMP_SPINCOUNT", "NUMBA_THREADING_LAYER")


def worker(run_dir: Path, layers: int, method: str, use_qtune: bool) -> dict:
    if use_qtune:
        from qtune.cpu import configure_threads

        configure_threads()
    import torch
    from transformers import AutoModelForCausalLM

    from qtune import layerwise, rundir
    from qtune.calibration import calibration_set
    from qtune.models import load_tokenizer

    loaded = rundir.load_run_recipe(run_dir)
    tokenizer = load_tokenizer(run_dir / "merged")
    calibration = calibration_set(tokenizer, loaded.recipe.data, loaded.base_dir, None, 16, 256)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:layers]
    started = time.perf_counter()
    if method == "gptq":
        layerwise.quantize_model_gptq(model, calibration.input_ids, calibration.attention_mask, bits=4, group_size=32, sym=False, damp=0.05)
    else:
        layerwise.quantize_model_awq(model, calibration.input_ids, calibration.attention_mask, bits=4, group_size=32, rounding="gptq", damp=0.05)
    return {
        "seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in THREAD_VARIABLES if os.environ.get(k)},
    }


def measure(run_dir: Path, layers: int, method: str, config: str, busy: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(CONFIGS[config] or {})
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        result = subprocess.run(
            [sys.executable, __file__, "--worker", str(run_dir), "--layers", str(layers), "--method", method]
            + (["--qtune"] if CONFIGS[config] is None else []),
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--methods", nargs="+", default=["gptq", "awq"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--busy", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--qtune", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(REPO))
        print(json.dumps(worker(args.run_dir, args.layers, args.method, args.qtune)))
        return
    times: dict[tuple, list[float]] = {}
    for round_ in range(args.rounds):
        for busy in args.busy if round_ % 2 == 0 else list(reversed(args.busy)):
            for method in args.methods:
                for config in args.configs if round_ % 2 == 0 else list(reversed(args.configs)):
                    result = measure(args.run_dir, args.layers, method, config, busy)
                    times.setdefault((method, config, busy), []).append(result["seconds"])
                    print(
                        f"round {round_ + 1}: {method:4} {config:8} busy={busy} {result['seconds']:7.1f} s ({result['threads']} threads, {result['env']})",
                        flush=True,
                    )
    print(f"\n{args.layers} decoder blocks of {args.run_dir / 'merged'}, {os.cpu_count()} CPUs, median of {args.rounds}")
    print("| method | threads | " + " | ".join(f"busy={b} s" for b in args.busy) + " | " + " | ".join(f"busy={b} / idle" for b in args.busy if b) + " |")
    print("|---|---|" + "---|" * (2 * len(args.busy) - (0 in args.busy)))
    for method in args.methods:
        for config in args.configs:
            medians = {b: statistics.median(times[(method, config, b)]) for b in args.busy}
            idle = medians.get(0)
            ratios = [f"{medians[b] / idle:.2f}" if idle else "–" for b in args.busy if b]
            print(f"| {method} | {config} | " + " | ".join(f"{medians[b]:.1f}" for b in args.busy) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
