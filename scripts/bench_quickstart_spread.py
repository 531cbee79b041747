"""The spread of the quickstart's exports over calibration draws and thread counts (issue 18, point 1).

Re-exports every target of a finished run's recipe with each calibration seed (ExportTarget.seed: which
stratified draw of the training data) at each thread count, scores each export with `qtune eval`, and
prints exact match, the drop against the merged model, KL, and the margin left to every gate. An
export whose bytes depend on nothing but the draw and the thread count shows here what a different
machine can do to it: different CPUs round float32 matmuls differently, much as thread counts do.

    .venv/bin/python scripts/bench_quickstart_spread.py runs/quickstart --seeds 0 1 2 3 4 --threads 1 2

Each (threads, seed) runs in its own process with OMP_NUM_THREADS set; one-thread jobs run two at a
time on a 2-core machine. Results are kept in RUN_DIR/../<run>-spread/ (rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINKED = ("recipe.resolved.yaml", "run.json", "merged", "adapter", "train_log.json")


def shadow_run(run_dir: Path, folder: Path) -> Path:
    """A run directory that shares the real run's merged model and recipe but has its own exports."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if (run_dir / name).exists() and not (folder / name).exists():
            (folder / name).symlink_to(run_dir / name)
    (folder / "eval").mkdir(exist_ok=True)
    shutil.copy2(run_dir / "eval" / "merged.json", folder / "eval" / "merged.json")
    return folder


def job(shadow: Path, seed: int, formats: list[str]) -> None:
    """Export and score every (selected) target of the recipe with calibration seed ``seed``."""
    sys.path.insert(0, str(REPO))
    from qtune import rundir
    from qtune.evaluate import evaluate_run
    from qtune.exports import export, report_path

    recipe = rundir.load_run_recipe(shadow).recipe
    names = []
    for target in recipe.export:
        if target.format not in formats or target.format == "gguf-lora":
            continue
        calibrated = target.format != "gguf" or target.uses_imatrix
        if seed and not calibrated:
            continue  # the same file whatever the seed
        output = shadow / "exports" / target.default_name()
        if not report_path(output).is_file():
            export(shadow, target.model_copy(update={"seed": seed}), output, overwrite=output.exists())
        names.append(output.name)
    pending = [n for n in names if not (shadow / "eval" / f"{n}.json").is_file()]
    if pending:
        evaluate_run(shadow, pending)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--formats", nargs="+", default=["gguf", "gptq", "awq"])
    parser.add_argument("--job", nargs=2, metavar=("SHADOW", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job(Path(args.job[0]), int(args.job[1]), args.formats)
        return
    run_dir = args.run_dir.resolve()
    spread = run_dir.parent / f"{run_dir.name}-spread"
    cpus = len(os.sched_getaffinity(0))
    queue = [(t, s) for t in sorted(args.threads, reverse=True) for s in args.seeds]
    running: list[tuple[subprocess.Popen, int, int, float]] = []
    while queue or running:
        busy = sum(t for _, t, _, _ in running)
        while queue and (not running or busy + queue[0][0] <= cpus):
            threads, seed = queue.pop(0)
            shadow = shadow_run(run_dir, spread / f"t{threads}-s{seed}")
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}
            log = open(shadow / "job.log", "a")
            proc = subprocess.Popen(
                [sys.executable, __file__, str(run_dir), "--job", str(shadow), str(seed), "--formats", *args.formats],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            running.append((proc, threads, seed, time.perf_counter()))
            busy += threads
            print(f"started threads={threads} seed={seed}", flush=True)
        time.sleep(5)
        for entry in list(running):
            proc, threads, seed, started = entry
            if proc.poll() is not None:
                running.remove(entry)
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}, see {spread}/t{threads}-s{seed}/job.log)"
                print(f"{status} threads={threads} seed={seed} in {time.perf_counter() - started:.0f} s", flush=True)
    report(run_dir, spread, args.threads, args.seeds)


def report(run_dir: Path, spread: Path, thread_counts: list[int], seeds: list[int]) -> None:
    sys.path.insert(0, str(REPO))
    from qtune import rundir

    gates = rundir.load_run_recipe(run_dir).recipe.evaluation.gates
    merged = json.loads((run_dir / "eval" / "merged.json").read_text())
    rows: dict[str, list[dict]] = {}
    for threads in thread_counts:
        for seed in seeds:
            for path in sorted((spread / f"t{threads}-s{seed}" / "eval").glob("*.json")):
                if path.name == "merged.json":
                    continue
                result = json.loads(path.read_text())
                rows.setdefault(path.name.removesuffix(".json"), []).append({"threads": threads, "seed": seed, **result})
    print(
        f"\nmerged model: {merged['correct']}/{merged['total']}; gates: max_task_drop_points={gates.max_task_drop_points}, "
        f"min_task_ratio={gates.min_task_ratio}, max_kl_vs_merged={gates.max_kl_vs_merged}"
    )
    print("| export | threads | seed | exact match | drop vs merged (points) | KL vs merged | top-1 | task-drop margin (points) | KL margin |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = []
    for name, results in rows.items():
        for r in results:
            if r.get("status") != "ok":
                print(f"| {name} | {r['threads']} | {r['seed']} | {r.get('status')}: {r.get('error', '')[:60]} | | | | | |")
                continue
            drop = 100 * (merged["task_metric"] - r["task_metric"])
            drop_margin = gates.max_task_drop_points - drop if gates.max_task_drop_points is not None else float("nan")
            kl_margin = gates.max_kl_vs_merged - r["kl_vs_merged"] if gates.max_kl_vs_merged is not None else float("nan")
            print(
                f"| {name} | {r['threads']} | {r['seed']} | {r['correct']}/{r['total']} | {drop:+.1f} | {r['kl_vs_merged']:.4f} | "
                f"{r['top1_vs_merged']:.3f} | {drop_margin:.1f} | {kl_margin:.3f} |"
            )
        ok = [r for r in results if r.get("status") == "ok"]
        if ok:
            correct = [r["correct"] for r in ok]
            kls = [r["kl_vs_merged"] for r in ok]
            drops = [100 * (merged["task_metric"] - r["task_metric"]) for r in ok]
            margin = f"{gates.max_task_drop_points - max(drops):.1f}" if gates.max_task_drop_points is not None else "n/a"
            summary.append(
                f"| {name} | {len(ok)} | {min(correct)}–{max(correct)} of {ok[0]['total']} | {max(drops):+.1f} | {min(kls):.4f}–{max(kls):.4f} | {margin} |"
            )
    print("\n| export | runs | exact match range | worst drop (points) | KL range | smallest task-drop margin (points) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
