"""Peak host memory of each stage of a run, and how it grows with depth (issue 12).

Builds random-initialised Llama checkpoints that share a width and differ only in depth, runs every
stage of a run on each in its own process (train for two steps, merge, each export, eval of the merged
model), and prints each stage's peak memory and its growth per extra decoder layer, as a fraction of
one layer's float32 size. Weight values do not change memory, so random weights stand in for a real
model of the same shape.

Two peaks are reported per stage:
  anon  the process's anonymous resident memory (RssAnon), sampled every 5 ms: memory the kernel can
        only free by killing the process;
  hwm   the resident high-water mark (VmHWM), which also counts file pages the process has memory-
        mapped, such as safetensors being read. Those are clean pages the kernel drops under pressure,
        so they make a process look bigger but never make it fail.

    .venv/bin/python scripts/bench_memory.py --layers 2 8 --hidden 1024 --intermediate 4096
    .venv/bin/python scripts/bench_memory.py --layers 2 8 --stages train merge export:gptq eval
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data"
EXPORTS = {
    "gguf-q8": {"format": "gguf", "quant": "Q8_0"},
    "gguf-q4km": {"format": "gguf", "quant": "Q4_K_M", "samples": 8, "seq_len": 128},
    "gptq": {"format": "gptq", "group_size": 64, "samples": 8, "seq_len": 128},
    "awq": {"format": "awq", "group_size": 64, "samples": 8, "seq_len": 128, "rounding": "gptq"},
}
STAGES = ("train", "merge", *(f"export:{name}" for name in EXPORTS), "eval")


@dataclass
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int | None = None  # None: the built-in tokenizer's
    tied: bool = True

    @property
    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakSampler:
    """Samples this process's anonymous resident memory on a thread; ``peak_anon_mb`` is the largest seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak_kb, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))

    @property
    def peak_anon_mb(self) -> float:
        return self.peak_kb / 1024


def build_base(folder: Path, shape: Shape, layers: int, dtype: str) -> Path:
    """A random Llama of ``shape`` and depth ``layers`` with the built-in model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtune.models import builtin_checkpoint, load_tokenizer

    if (folder / "config.json").is_file():
        return folder
    tokenizer = load_tokenizer(builtin_checkpoint("smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape.vocab or len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=shape.tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class Workload:
    """How much data each stage sees. Memory growth with depth does not depend on it (the held-out rows'
    and the calibration tokens' hidden states are carried one block at a time); time does."""

    validation_rows: int | None = None  # None: the quickstart's 60
    calibration_samples: int = 8
    calibration_seq_len: int = 128


def write_recipe(work: Path, base: Path, exports: list[str], workload: Workload = Workload()) -> Path:
    import yaml

    validation = DATA / "quickstart_validation.jsonl"
    if workload.validation_rows is not None:
        rows = validation.read_text().splitlines()[: workload.validation_rows]
        validation = work / "validation.jsonl"
        validation.write_text("\n".join(rows) + "\n")
    calibration = {"samples": workload.calibration_samples, "seq_len": workload.calibration_seq_len}
    recipe = {
        "model": {"base": str(base)},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {
            "train": str(DATA / "quickstart_train.jsonl"),
            "validation": str(validation),
            "max_length": 128,
            "max_train_samples": 32,
        },
        "training": {"max_steps": 2, "micro_batch_size": 2, "save_steps": 2, "logging_steps": 1, "gradient_checkpointing": True},
        "tracking": {"backend": "none"},
        "output": {"dir": str(work / "run")},
        "evaluation": {"max_samples": 4, "max_new_tokens": 8},
        "export": [{**EXPORTS[name], **(calibration if "samples" in EXPORTS[name] else {})} for name in exports],
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


PLAN_MACHINES = {"8b": (24 * 2**30, 32 * 2**30), "70b": (80 * 2**30, 64 * 2**30)}  # (GPU, host) each model is planned for


def plan_config(which: str) -> dict:
    """The real model's config (tests/support.py holds it)."""
    sys.path.insert(0, str(REPO / "tests"))
    from support import LLAMA31_8B, LLAMA31_70B

    return {"8b": LLAMA31_8B, "70b": LLAMA31_70B}[which]


def planned(recipe: Path, config: dict, gpu_bytes: int | None, host_bytes: int) -> dict[str, tuple[float, float]]:
    """Stage name (as measured here) -> (planned GPU GB, planned host GB) from qtune.memory_plan."""
    from qtune import memory_plan
    from qtune.recipe import load_recipe

    result = memory_plan.recipe_plan(load_recipe(recipe), config, gpu_bytes, host_bytes)
    names = {"train": "train", "merge": "merge", "eval merged / exports": "eval"}
    out = {}
    for entry in result.stages:
        name = names.get(entry.stage) or next((f"export:{k}" for k, v in EXPORTS.items() if entry.stage == f"export {_target_name(v)}"), entry.stage)
        out[name] = (entry.device_bytes / 2**30, entry.host_bytes / 2**30)
    return out


def _target_name(settings: dict) -> str:
    from qtune.recipe import ExportTarget

    return ExportTarget(**settings).default_name()


def run_stage(stage: str, recipe: Path) -> dict:
    """One stage, in this process, under the sampler (called in a child process)."""
    sys.path.insert(0, str(REPO))
    from qtune.cpu import configure_threads

    configure_threads()
    from qtune.evaluate import evaluate_run
    from qtune.merge import merge_run
    from qtune.recipe import load_recipe

    loaded = load_recipe(recipe)
    run_dir = loaded.output_dir
    started = time.perf_counter()
    with PeakSampler() as sampler:
        if stage == "train":
            from qtune.training import train

            train(loaded)
        elif stage == "merge":
            merge_run(run_dir)
        elif stage.startswith("export:"):
            from qtune.exports import export
            from qtune.recipe import ExportTarget

            wanted = ExportTarget(**EXPORTS[stage.removeprefix("export:")])
            target = next(t for t in loaded.recipe.export if (t.format, t.quant) == (wanted.format, wanted.quant))  # with the recipe's calibration
            export(run_dir, target, run_dir / "exports" / target.default_name(), overwrite=True)
        elif stage == "eval":
            evaluate_run(run_dir, ["merged"])
        else:
            raise ValueError(f"unknown stage {stage}")
    return {
        "stage": stage,
        "peak_anon_mb": round(sampler.peak_anon_mb, 1),
        "hwm_mb": round(_status_kb("VmHWM") / 1024, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def measure(
    work: Path, shape: Shape, depths: list[int], stages: list[str], dtype: str = "bfloat16", resume: bool = False, workload: Workload = Workload()
) -> dict[int, dict[str, dict]]:
    """depth -> stage -> {peak_anon_mb, hwm_mb, seconds}, each stage in a fresh process.

    Each stage's result is saved as it finishes (``layers-N/results.json``); with ``resume`` the stages
    found there are not run again, so a long run at a large width survives an interruption.
    """
    exports = [s.removeprefix("export:") for s in stages if s.startswith("export:")]
    results: dict[int, dict[str, dict]] = {}
    for depth in depths:
        folder = work / f"layers-{depth}"
        folder.mkdir(parents=True, exist_ok=True)
        base = build_base(folder / "base", shape, depth, dtype)
        recipe = write_recipe(folder, base, exports, workload)
        saved = folder / "results.json"
        results[depth] = json.loads(saved.read_text()) if resume and saved.is_file() else {}
        trained = (folder / "run" / "adapter").is_dir()
        for stage in ("train", *[s for s in stages if s != "train"]):
            if stage == "train" and trained and "train" not in stages:
                continue
            if stage in results[depth]:
                continue
            env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
            done = subprocess.run([sys.executable, __file__, "--stage", stage, str(recipe)], capture_output=True, text=True, env=env, timeout=3600)
            if done.returncode != 0:
                raise RuntimeError(f"{stage} at depth {depth} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if stage in stages:
                results[depth][stage] = result
                partial = saved.with_suffix(".json.partial")
                partial.write_text(json.dumps(results[depth], indent=1))
                partial.replace(saved)
        results[depth] = {stage: results[depth][stage] for stage in stages}
    return results


def growth_table(results: dict[int, dict[str, dict]], shape: Shape) -> list[dict]:
    """Per stage: peak at each depth and growth per extra layer as a fraction of one fp32 layer."""
    depths = sorted(results)
    low, high = depths[0], depths[-1]
    fp32_layer_mb = 4 * shape.layer_params / 2**20
    rows = []
    for stage in results[low]:
        a, b = results[low][stage], results[high][stage]
        per_layer = (b["peak_anon_mb"] - a["peak_anon_mb"]) / (high - low)
        rows.append(
            {
                "stage": stage,
                **{f"anon_mb_{d}": results[d][stage]["peak_anon_mb"] for d in depths},
                **{f"hwm_mb_{d}": results[d][stage]["hwm_mb"] for d in depths},
                "growth_per_layer_mb": round(per_layer, 1),
                "growth_vs_fp32_layer": round(per_layer / fp32_layer_mb, 3),
                **{f"seconds_{d}": results[d][stage]["seconds"] for d in depths},
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs=2, type=int, default=[2, 8])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--stages", nargs="+", default=list(STAGES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/qtune-bench-memory"))
    parser.add_argument("--vocab", type=int, default=None, help="config vocabulary (default: the built-in tokenizer's)")
    parser.add_argument("--untied", action="store_true", help="a separate output head, as Llama-3.1-8B has")
    parser.add_argument("--plan-for", choices=sorted(PLAN_MACHINES), help="also print the plan for this real model on its target machine")
    parser.add_argument(
        "--extrapolate-to",
        type=int,
        nargs="+",
        default=[],
        metavar="LAYERS",
        help="also extrapolate each stage's host peak per layer to these depths (32: Llama-3.1-8B, 80: 70B)",
    )
    parser.add_argument("--resume", action="store_true", help="keep the stage results a previous run saved under --work")
    parser.add_argument("--stage", nargs=2, metavar=("STAGE", "RECIPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage[0], Path(args.stage[1]))))
        return
    shape = Shape(args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab, not args.untied)
    results = measure(args.work, shape, args.layers, args.stages, args.dtype, args.resume)
    low, high = sorted(args.layers)
    recipe = args.work / f"layers-{high}" / "recipe.yaml"
    config = json.loads((args.work / f"layers-{high}" / "base" / "config.json").read_text())
    plan = planned(recipe, config, None, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    print(
        f"shape: hidden {shape.hidden}, intermediate {shape.intermediate}, heads {shape.heads}/{shape.kv_heads}; "
        f"one decoder layer = {4 * shape.layer_params / 2**20:.1f} MB in fp32; depths {low} and {high}"
    )
    print(f"| stage | anon MB @{low} | anon MB @{high} | hwm MB @{low} | hwm MB @{high} | plan MB @{high} | growth MB/layer | × fp32 layer | s @{high} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in growth_table(results, shape):
        plan_mb = round(plan.get(row["stage"], (0, float("nan")))[1] * 1024)
        print(
            f"| {row['stage']} | {row[f'anon_mb_{low}']} | {row[f'anon_mb_{high}']} | {row[f'hwm_mb_{low}']} | "
            f"{row[f'hwm_mb_{high}']} | {plan_mb} | {row['growth_per_layer_mb']} | {row['growth_vs_fp32_layer']} | {row[f'seconds_{high}']} |"
        )
    if args.extrapolate_to:
        _print_extrapolation(growth_table(results, shape), low, high, args.extrapolate_to)
    if args.plan_for:
        _print_scaled_plan(recipe, args.plan_for)


def _print_extrapolation(rows: list[dict], low: int, high: int, depths: list[int]) -> None:
    """Peak at ``high`` layers plus each further layer's measured growth (anon and hwm apart), in GB."""
    print(f"\nextrapolated per layer from depths {low} and {high} (GB; CPU run, so everything is host memory):")
    print("| stage | " + " | ".join(f"anon @{d} | hwm @{d}" for d in depths) + " |")
    print("|---|" + "---|---|" * len(depths))
    for row in rows:
        cells = []
        for depth in depths:
            for kind in ("anon", "hwm"):
                per_layer = (row[f"{kind}_mb_{high}"] - row[f"{kind}_mb_{low}"]) / (high - low)
                cells.append(f"{(row[f'{kind}_mb_{high}'] + max(per_layer, 0.0) * (depth - high)) / 1024:.1f}")
        print(f"| {row['stage']} | " + " | ".join(cells) + " |")


def _print_scaled_plan(recipe: Path, which: str) -> None:
    config, (gpu, host) = plan_config(which), PLAN_MACHINES[which]
    print(
        f"\nplan for {which} ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}) on a "
        f"{gpu / 2**30:.0f} GB GPU with {host / 2**30:.0f} GB of host memory, this benchmark's recipe:"
    )
    for stage, (device, host_gb) in planned(recipe, config, gpu, host).items():
        print(f"  {stage:<28} GPU {device:6.1f} GB   host {host_gb:6.1f} GB")


if __name__ == "__main__":
    main()
