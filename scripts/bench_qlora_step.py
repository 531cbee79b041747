#!/usr/bin/env python3
"""QLoRA training steps of one variant on a random Llama-3-8B-shaped model, in this process; or the table of several.

    python scripts/bench_qlora_step.py --variant qtune-fused --json OUT/step-qtune-fused.json [--layers 32]
    python scripts/bench_qlora_step.py --table OUT        # every OUT/step-*.json -> a table; OUT/gpu_verify.json
    python scripts/bench_qlora_step.py --variant qtune-fused --json x.json --smoke-cpu   # tiny, on CPU

Variants: plain (transformers + peft + bitsandbytes: prepare_model_for_kbit_training, get_peft_model), and
qtune's stack with its fused QLoRA kernels and liger-kernel off or on (qtune, qtune-fused, qtune-liger,
qtune-fused-liger). A qtune variant asks for its kernels as `on` would: a failed self-check is an error
in the table, not a silent fallback. Run each variant in its own process (scripts/gpu_verify.sh does),
so that peak memory is the variant's own. Every variant starts from the same weights, LoRA factors and
batch; step 0 (no update) gives the loss and a fingerprint of the LoRA gradients (their norm and their
projection on a fixed random vector), compared in the table with plain's. Then warm-up and timed steps
with bitsandbytes' paged 8-bit AdamW (the recipe default), bf16 autocast, gradient checkpointing. Peak
memory counts the paged optimizer states (CUDA managed memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

VARIANTS = ("plain", "qtune", "qtune-fused", "qtune-liger", "qtune-fused-liger")
# step-0 agreement with plain allowed in bf16: the self-checks' bf16 tolerances (loss, gradients)
AGREE = (1e-2, 5e-2)


def run_variant(variant: str, layers: int, seq: int, steps: int, smoke_cpu: bool) -> dict:
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import LlamaConfig

    from bench_kernels import attach_random_lora, build_nf4_llama
    from qtune.training import fuse, peak_memory_gb

    device = "cpu" if smoke_cpu else "cuda"
    if smoke_cpu:
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        seq, steps = 32, 1
    else:  # Llama-3-8B
        config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                             rope_theta=500000.0)  # fmt: skip
    autocast = None if smoke_cpu else torch.bfloat16
    started = time.perf_counter()
    model = build_nf4_llama(config, device, torch.bfloat16)
    kernels = {}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if variant == "plain":
        model = attach_random_lora(model)
    else:
        from qtune import liger

        if "liger" in variant:
            kernels["liger"] = liger.enable(model, required=True, autocast=autocast).applied
        model = attach_random_lora(model)
        if "fused" in variant:
            fused = fuse(model, required=True, autocast=autocast)
            kernels["fused_layers"] = f"{fused.patched}/{fused.layers}"
    build_seconds = time.perf_counter() - started
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(2)).to(device)

    def forward_backward() -> float:
        with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item()

    loss0 = forward_backward()
    grads = torch.cat([p.grad.float().flatten() for p in params])
    direction = torch.randn(grads.numel(), generator=torch.Generator().manual_seed(3)).to(grads.device)
    fingerprint = {"loss": loss0, "grad_norm": grads.norm().item(), "grad_projection": (grads @ direction).item() / grads.numel() ** 0.5}
    del grads, direction
    if smoke_cpu:
        optimizer = torch.optim.AdamW(params, lr=1e-5)
    else:
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-5)
    times = []
    for step in range(2 + steps):
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        forward_backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    return {
        "variant": variant, "layers": config.num_hidden_layers, "seq": seq, "steps": steps, "build_seconds": round(build_seconds, 1),
        "tokens_per_second": seq / seconds, "step_ms": seconds * 1e3, "peak_memory_gb": peak_memory_gb(), "kernels": kernels,
        **fingerprint,
    }  # fmt: skip


def table(folder: Path) -> str:
    results = {}
    for file in sorted(folder.glob("step-*.json")):
        result = json.loads(file.read_text())
        results[result["variant"]] = result
    plain = results.get("plain")
    lines = ["| variant | tokens/s | vs plain | peak GiB | vs plain | step-0 loss Δ | grad norm Δ | grad projection Δ | kernels |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for variant in VARIANTS:
        r = results.get(variant)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {variant} | failed: {r['error']} | | | | | | | |")
            continue
        if plain and "error" not in plain:
            rel = {k: abs(r[k] - plain[k]) / max(abs(plain[k]), 1e-30) for k in ("loss", "grad_norm", "grad_projection")}
            speed, memory = f"{r['tokens_per_second'] / plain['tokens_per_second']:.2f}×", f"{r['peak_memory_gb'] / plain['peak_memory_gb']:.2f}×"
            agree = [f"{rel['loss']:.1e}" + ("" if rel["loss"] <= AGREE[0] else " (!)")]
            agree += [f"{rel[k]:.1e}" + ("" if rel[k] <= AGREE[1] else " (!)") for k in ("grad_norm", "grad_projection")]
        else:
            speed = memory = "–"
            agree = ["–"] * 3
        cells = [variant, f"{r['tokens_per_second']:.0f}", speed, f"{r['peak_memory_gb']:.2f}", memory, *agree, str(r["kernels"] or "–")]
        lines.append("| " + " | ".join(cells) + " |")
    _write_report(folder, results)
    return "\n".join(lines)


def _write_report(folder: Path, steps: dict) -> None:
    """gpu_verify.json: everything scripts/gpu_verify.sh measured, in one file."""

    def read(name: str) -> str:
        file = folder / name
        return file.read_text(errors="replace") if file.is_file() else ""

    kernels = read("kernels.log")
    report = {
        "versions": read("versions.txt").strip(),
        "tests": (read("tests.log").strip().splitlines() or ["not run"])[-1],
        "kernels_summary": [line[2:] for line in kernels[kernels.find("## summary") :].splitlines() if line.startswith("- ")],
        "steps": steps,
    }
    (folder / "gpu_verify.json").write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--json", type=Path, help="where the variant's result goes")
    parser.add_argument("--table", type=Path, help="a folder of step-*.json files to tabulate")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--smoke-cpu", action="store_true", help="a tiny model on CPU: checks this script, times nothing real")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if not args.variant or not args.json:
        parser.error("--variant and --json, or --table")
    try:
        result = run_variant(args.variant, args.layers, args.seq, args.steps, args.smoke_cpu)
    except Exception as exc:  # recorded in the table: one variant failing must not hide the others
        result = {"variant": args.variant, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
