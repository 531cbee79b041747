"""Training throughput and peak memory: qtune against a plain transformers + peft + bitsandbytes script.

Both train the same LoRA (all linear layers) on the same NF4 base, with the same rows, batch size,
optimizer and steps. Each measurement runs in a fresh process (so peak memory is its own), and the
two variants alternate so that machine noise hits both. Prints a table and the qtune/plain ratio.

    python scripts/bench_train.py                      # CPU: the built-in model, quickstart data
    python scripts/bench_train.py --model llama3-8b    # GPU: a randomly initialised Llama-3-8B-shaped model
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
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)


def build_rows(model: str, seq_len: int, count: int):
    from qtune.data import Formatter, as_rows, tokenize_records
    from qtune.models import builtin_checkpoint, load_tokenizer
    from qtune.recipe import DataSection

    tokenizer = load_tokenizer(builtin_checkpoint("smollm2-135m-instruct"))
    if model != "builtin":
        import torch

        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 32000, (count, seq_len), generator=generator).tolist()
        return [{"input_ids": r, "labels": r, "num_real_tokens": seq_len} for r in ids], tokenizer
    cfg = DataSection(train=[{"path": str(REPO / "recipes/data/quickstart_train.jsonl")}], max_length=seq_len)
    records = [json.loads(line) for line in (REPO / "recipes/data/quickstart_train.jsonl").read_text().splitlines()][:count]
    examples, _, _ = tokenize_records(records, Formatter(cfg, tokenizer), cfg, "bench")
    return as_rows(examples), tokenizer


def load_model(model: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qtune.models import bnb_config, builtin_checkpoint
    from qtune.recipe import QuantizationSection

    quant = bnb_config(QuantizationSection())
    if model == "builtin":
        return AutoModelForCausalLM.from_pretrained(
            builtin_checkpoint("smollm2-135m-instruct"),
            quantization_config=quant,
            dtype=quant.bnb_4bit_compute_dtype,
            device_map={"": 0 if torch.cuda.is_available() else "cpu"},
        )
    # Weight values don't change speed or memory: quantize a random model built straight on the GPU.
    config = LlamaConfig(**LLAMA3_8B)
    from transformers.quantizers import AutoHfQuantizer

    with torch.device("cuda"):
        net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    quantizer = AutoHfQuantizer.from_config(quant)
    quantizer.preprocess_model(net, device_map={"": 0})
    return net


def run_variant(variant: str, model: str, seq_len: int, batch: int, steps: int, warmup: int) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from qtune.data import Collator
    from qtune.models import attach_lora
    from qtune.recipe import LoraSection

    rows, tokenizer = build_rows(model, seq_len, batch * (steps + warmup))
    net = load_model(model)
    lora = LoraSection(r=16, alpha=32, dropout=0.0)
    if variant == "qtune":
        from qtune.recipe import Recipe
        from qtune.training import _trainer_class, use_fused_kernels

        net = attach_lora(net, lora, gradient_checkpointing=True)
        fused = use_fused_kernels(net, Recipe())
        print(f"fused kernels on {fused.patched} of {fused.layers} 4-bit LoRA layers {fused.off_because}".rstrip(), file=sys.stderr)
        trainer_cls = _trainer_class()
        collator = Collator(tokenizer.pad_token_id)
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import DataCollatorForSeq2Seq

        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=True)
        net = get_peft_model(net, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
        trainer_cls = Trainer
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True)

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    on_cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=f"/tmp/qtune-bench-{variant}",
        per_device_train_batch_size=batch,
        max_steps=steps + warmup,
        learning_rate=1e-4,
        optim="paged_adamw_8bit" if on_cuda else "adamw_bnb_8bit",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no",
        report_to=[],
        logging_steps=10**6,
        remove_unused_columns=False,
        use_cpu=not on_cuda,
        bf16=on_cuda,
        disable_tqdm=True,
        seed=0,
    )
    trainer = trainer_cls(model=net, args=args, train_dataset=rows, data_collator=collator, callbacks=[Clock()])
    if variant == "qtune":
        trainer.qtune_keep = 1
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = times[warmup + 1 :] if len(times) > warmup + 1 else times
    seconds = timed[-1] - times[warmup]
    tokens = sum(len(r["input_ids"]) for r in rows[batch * warmup : batch * (steps + warmup)])
    from qtune.training import peak_memory_gb

    return {"variant": variant, "tokens_per_second": tokens / seconds, "peak_memory_gb": peak_memory_gb(), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["builtin", "llama3-8b"], default="builtin")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=["qtune", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    seq_len = args.seq_len or (2048 if args.model == "llama3-8b" else 128)
    batch = args.batch or (1 if args.model == "llama3-8b" else 8)
    if args.worker:
        print("RESULT " + json.dumps(run_variant(args.worker, args.model, seq_len, batch, args.steps, args.warmup)))
        return
    results = {"qtune": [], "plain": []}
    for _ in range(args.rounds):
        for variant in ("qtune", "plain"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                variant,
                "--model",
                args.model,
                "--seq-len",
                str(seq_len),
                "--batch",
                str(batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
            results[variant].append(json.loads(line[7:]))
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"\nmodel {args.model}, seq {seq_len}, batch {batch}, {args.steps} timed steps x {args.rounds} rounds, {device}\n")
    for variant, runs in results.items():
        print(f"{variant} runs: " + ", ".join(f"{r['tokens_per_second']:.1f} tok/s {r['peak_memory_gb']:.2f} GB" for r in runs))
    print()
    print("| variant | tokens/s (median) | peak memory GB (max) |")
    print("|---|---|---|")
    summary = {}
    for variant, runs in results.items():
        summary[variant] = (statistics.median(r["tokens_per_second"] for r in runs), max(r["peak_memory_gb"] for r in runs))
        print(f"| {variant} | {summary[variant][0]:.1f} | {summary[variant][1]:.2f} |")
    print(f"\nqtune/plain: speed {summary['qtune'][0] / summary['plain'][0]:.2f}x, peak memory {summary['qtune'][1] / summary['plain'][1]:.2f}x")


if __name__ == "__main__":
    main()
