"""Benchmark qtune's GPTQ and AWQ against GPTQModel and round-to-nearest (issue 4, points 7 and 8).

For each model (the built-in SmolLM2-135M-Instruct base and the merged quickstart model) and with
THE SAME calibration tensor for every tool, it quantizes

  * 4-bit GPTQ, group 128, sym, no act-order: qtune, GPTQModel (oracle venv, its defaults), RTN
  * 4-bit AWQ GEMM, group 64 (asym): qtune, GPTQModel (backend AWQ_TORCH), RTN

then reads every checkpoint back through qtune's dequantize-and-run readers
(``load_dequantized_gptq_model`` / ``load_dequantized_awq_model``; they read GPTQModel's files too)
and measures perplexity, mean per-token KL(unquantized || quantized), top-1 agreement and quickstart
exact match. Quantization runs in fresh subprocesses with the same thread count, alternating the
two tools (qtune first on one model, GPTQModel first on the other) so load drift on a shared
machine hits both.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_gptq_awq.py --merged .cache/bench-merged

Results are cached per step in --work (rerun to resume); --fresh starts over.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from oracles import gptqmodel_python  # noqa: E402 - the tests' oracles

GPTQ_GROUP = 128
AWQ_GROUP = 64  # AWQ needs group | K, and K = 576 on SmolLM2-135M
EM_FRACTION = 0.95
PPL_TOLERANCE = 1.01

ORACLE_WORKER = r"""
import json, sys, time
t_start = time.perf_counter()
import torch
from gptqmodel import AWQConfig, BACKEND, GPTQConfig, GPTQModel
method, src, calib, dst, result, threads, batch_size, damp, dtype = sys.argv[1:10]
torch.set_num_threads(int(threads))
ids = torch.load(calib)
calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
if method == "gptq":
    kwargs = {} if damp == "default" else {"damp_percent": float(damp)}
    qc = GPTQConfig(bits=4, group_size=%(gptq_group)d, desc_act=False, sym=True, device="cpu", **kwargs)
    quantize_kwargs = {}
else:
    qc = AWQConfig(bits=4, group_size=%(awq_group)d, sym=False, device="cpu")
    quantize_kwargs = {"backend": BACKEND.AWQ_TORCH}
model = GPTQModel.load(src, qc, dtype=getattr(torch, dtype))
t0 = time.perf_counter()
model.quantize(calibration, batch_size=int(batch_size), **quantize_kwargs)
seconds = time.perf_counter() - t0
model.save(dst)
import gptqmodel
json.dump({"seconds": seconds, "total_seconds": time.perf_counter() - t_start, "tool": "gptqmodel " + gptqmodel.__version__,
           "damp_percent": getattr(qc, "damp_percent", None), "act_group_aware": getattr(qc, "act_group_aware", None),
           "batch_size": int(batch_size), "dtype": str(getattr(model.model, "dtype", "?")),
           "threads": torch.get_num_threads()}, open(result, "w"))
""" % {"gptq_group": GPTQ_GROUP, "awq_group": AWQ_GROUP}  # noqa: UP031 (a code template: its braces are literal)


# ---------------------------------------------------------------- workers (fresh processes)


def qtune_worker(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.formats.awq import write_awq_checkpoint
    from qtune.formats.gptq import write_gptq_checkpoint
    from qtune.layerwise import quantize_model_awq, quantize_model_gptq

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.load(args.calib)
    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    if args.worker == "gptq":
        result = quantize_model_gptq(
            model,
            ids,
            mask,
            bits=4,
            group_size=GPTQ_GROUP,
            sym=True,
            act_order=False,
            damp=args.damp,
            batch_size=args.batch_size,
            group_aware=bool(args.group_aware),
        )
    else:
        result = quantize_model_awq(model, ids, mask, bits=4, group_size=AWQ_GROUP, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    if args.worker == "gptq":
        write_gptq_checkpoint(model, result.quantized_layers, args.dst, tokenizer, damp_percent=args.damp)
    else:
        write_awq_checkpoint(model, result.quantized_layers, args.dst, tokenizer)
    Path(args.result).write_text(
        json.dumps(
            {
                "seconds": seconds,
                "total_seconds": time.perf_counter() - t_start,
                "tool": "qtune",
                "damp_percent": args.damp if args.worker == "gptq" else None,
                "batch_size": args.batch_size,
                "group_aware": bool(args.group_aware) if args.worker == "gptq" else None,
                "dtype": "torch.float32",
                "threads": torch.get_num_threads(),
            }
        )
    )


# ---------------------------------------------------------------- data


def load_data(model_path: Path, n_samples: int, seq_len: int, seed: int):
    """Calibration ids [n_samples, seq_len], eval rows (answer labels / all-token labels), EM prompts."""
    import torch

    from qtune import data as qdata
    from qtune import models
    from qtune.recipe import load_recipe

    loaded = load_recipe(REPO / "recipes" / "quickstart.yaml")
    cfg = loaded.recipe.data
    tokenizer = models.load_tokenizer(model_path)
    formatter = qdata.Formatter(cfg, tokenizer)
    train_records = qdata.load_records(cfg.train, loaded.base_dir)
    random.Random(seed).shuffle(train_records)
    stream: list[int] = []
    for record in train_records:
        stream.extend(qdata.tokenize_rendered(formatter.render(record), tokenizer).input_ids)
        if len(stream) >= n_samples * seq_len:
            break
    if len(stream) < n_samples * seq_len:
        raise SystemExit(f"only {len(stream)} calibration tokens; need {n_samples * seq_len}")
    calib = torch.tensor(stream[: n_samples * seq_len]).reshape(n_samples, seq_len)
    prepared = qdata.prepare_data(cfg, tokenizer, loaded.base_dir, loaded.recipe.training.seed)
    # Every conversation opens with the same system prompt and template (43 tokens on the quickstart
    # data): scored in every row, those tokens would be half of the "all tokens" perplexity, one short
    # text counted 60 times. The shared prefix is scored in the first row only.
    ids = [r["input_ids"] for r in prepared.validation]
    shared = min(next((i for i, (a, b) in enumerate(zip(ids[0], row)) if a != b), min(len(ids[0]), len(row))) for row in ids[1:])
    all_token_rows = [
        {"input_ids": row, "num_real_tokens": len(row), "labels": list(row) if i == 0 else [qdata.IGNORE_INDEX] * shared + list(row[shared:])}
        for i, row in enumerate(ids)
    ]
    return {
        "tokenizer": tokenizer,
        "calib": calib,
        "answer_rows": prepared.validation,
        "all_rows": all_token_rows,
        "prompts": prepared.eval_prompts,
        "eval_cfg": loaded.recipe.evaluation,
    }


# ---------------------------------------------------------------- steps


def run_quantizer(tool: str, method: str, model_path: Path, calib: Path, dst: Path, args: argparse.Namespace) -> dict:
    result = dst.with_suffix(".quant.json")
    if result.exists() and dst.exists():
        return json.loads(result.read_text())
    if dst.exists():
        shutil.rmtree(dst)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "GPTQMODEL_CPU_WORKERS": "2",
        "TORCHDYNAMO_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if tool == "qtune":
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            method,
            "--model",
            str(model_path),
            "--calib",
            str(calib),
            "--dst",
            str(dst),
            "--result",
            str(result),
            "--threads",
            str(args.threads),
            "--damp",
            str(args.qtune_damp),
            "--batch-size",
            str(args.qtune_batch_size),
            "--group-aware",
            str(int(not args.qtune_no_group_aware)),
        ]
    else:
        script = Path(args.work) / "oracle_quant.py"
        if not (script.exists() and script.read_text() == ORACLE_WORKER):
            script.with_suffix(f".{os.getpid()}.tmp").write_text(ORACLE_WORKER)
            script.with_suffix(f".{os.getpid()}.tmp").replace(script)
        cmd = [
            args.oracle_python,
            str(script),
            method,
            str(model_path),
            str(calib),
            str(dst),
            str(result),
            str(args.threads),
            str(args.oracle_batch_size),
            args.oracle_damp,
            "float32" if method == "gptq" else args.oracle_awq_dtype,
        ]
    log_path = dst.with_suffix(".log")
    print(f"  quantize {method} with {tool} ...", flush=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{tool} {method} failed (rc {proc.returncode}); log {log_path}:\n{tail}")
    info = json.loads(result.read_text())
    info["process_seconds"] = time.perf_counter() - started
    result.write_text(json.dumps(info))
    print(f"    {info['seconds']:.1f}s quantize ({info['process_seconds']:.1f}s process)", flush=True)
    return info


def write_rtn(method: str, model_path: Path, dst: Path) -> dict:
    result = dst.with_suffix(".quant.json")
    if result.exists() and dst.exists():
        return json.loads(result.read_text())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.formats.awq import write_awq_checkpoint
    from qtune.formats.gptq import write_gptq_checkpoint
    from qtune.layerwise import quantizable_layers
    from qtune.quant.rtn import rtn_quantize

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    layers = {}
    arch, blocks = quantizable_layers(model)
    for index, layer in enumerate(blocks):
        for name in arch.linear_names:
            weight = layer.get_submodule(name).weight.data
            if method == "gptq":
                layers[f"model.layers.{index}.{name}"] = rtn_quantize(weight, 4, GPTQ_GROUP, sym=True, convention="gptq")
            else:
                layers[f"model.layers.{index}.{name}"] = rtn_quantize(weight, 4, AWQ_GROUP, sym=False, convention="awq")
    seconds = time.perf_counter() - t0
    if dst.exists():
        shutil.rmtree(dst)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if method == "gptq":
        write_gptq_checkpoint(model, layers, dst, tokenizer)
    else:
        write_awq_checkpoint(model, layers, dst, tokenizer)
    info = {"seconds": seconds, "tool": "rtn"}
    result.write_text(json.dumps(info))
    return info


def evaluate(model, reference, data: dict, skip_em: bool, em_batch_size: int = 0) -> dict:
    from qtune.metrics import divergence, perplexity, task_accuracy

    pad = data["tokenizer"].pad_token_id
    out = {
        "ppl": perplexity(model, data["all_rows"], pad),
        "answer_ppl": perplexity(model, data["answer_rows"], pad),
    }
    if reference is not None:
        d = divergence(reference, model, data["answer_rows"], pad)
        out.update(kl=d.mean_kl, top1=d.top1_agreement, kl_tokens=d.tokens)
    if not skip_em:
        cfg = data["eval_cfg"]
        em = task_accuracy(model, data["tokenizer"], data["prompts"], cfg.max_new_tokens, em_batch_size or cfg.batch_size)
        out.update(em=em.accuracy, em_correct=em.correct, em_total=em.total)
    return out


def bench_model(label: str, model_path: Path, methods: list[str], qtune_first: bool, args: argparse.Namespace) -> dict:
    import torch

    from qtune.formats.awq import load_dequantized_awq_model
    from qtune.formats.gptq import load_dequantized_gptq_model
    from qtune.models import load_full_precision
    from qtune.recipe import ModelSection

    work = Path(args.work) / label
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save(key: str, value: dict) -> None:  # read-merge-write: two processes may share a model (one per method)
        results[key] = value
        current = json.loads(results_path.read_text()) if results_path.exists() else {}
        current[key] = value
        tmp = results_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(current, indent=2))
        tmp.replace(results_path)

    data = load_data(model_path, args.samples, args.seq_len, args.seed)
    calib_path = work / "calib.pt"
    if not (calib_path.exists() and torch.equal(torch.load(calib_path), data["calib"])):
        torch.save(data["calib"], calib_path.with_suffix(f".{os.getpid()}.tmp"))
        calib_path.with_suffix(f".{os.getpid()}.tmp").replace(calib_path)
    print(f"[{label}] {model_path}: calibration {tuple(data['calib'].shape)}, {len(data['all_rows'])} eval rows, {len(data['prompts'])} EM prompts", flush=True)

    tools = ["qtune", "gptqmodel"] if qtune_first else ["gptqmodel", "qtune"]
    tools = [t for t in tools if t in args.tools.split(",")]
    calib_for = {"gptq": calib_path, "awq": calib_path}
    if args.awq_samples and args.awq_samples < args.samples:  # the first rows of the same tensor, for both tools
        calib_for["awq"] = work / f"calib_awq{args.awq_samples}.pt"
        if not calib_for["awq"].exists():
            torch.save(data["calib"][: args.awq_samples].clone(), calib_for["awq"])
    quant_info: dict[str, dict] = {}
    for i, method in enumerate(methods):
        order = tools if i % 2 == 0 else tools[::-1]  # alternate within the model too
        for tool in order:
            quant_info[f"{method}/{tool}"] = run_quantizer(tool, method, model_path, calib_for[method], work / f"{method}-{tool}", args)
        if "qtune" in tools:
            quant_info[f"{method}/rtn"] = write_rtn(method, model_path, work / f"{method}-rtn")
    if args.no_eval:
        return {}

    torch.set_num_threads(args.threads)
    skip_em = args.skip_em or (label == "base" and args.skip_base_em)
    reference = load_full_precision(model_path, ModelSection(base=str(model_path)), torch.float32).eval()
    if results_path.exists():
        results.update(json.loads(results_path.read_text()))
    if "fp32" not in results:
        print(f"  eval {label} fp32", flush=True)
        save("fp32", evaluate(reference, None, data, skip_em, args.em_batch_size))
    for method in methods:
        reader = load_dequantized_gptq_model if method == "gptq" else load_dequantized_awq_model
        for tool in ("qtune", "gptqmodel", "rtn"):
            key = f"{method}/{tool}"
            quant_json = work / f"{method}-{tool}.quant.json"
            if key in results:
                continue
            if not quant_json.exists():
                print(f"  skip {label} {key}: not quantized (yet)", flush=True)
                continue
            print(f"  eval {label} {key}", flush=True)
            model = reader(work / f"{method}-{tool}")
            save(key, {**evaluate(model, reference, data, skip_em, args.em_batch_size), "quant": json.loads(quant_json.read_text())})
            del model
    return json.loads(results_path.read_text())


# ---------------------------------------------------------------- report


def fmt(value, spec: str, missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def report(all_results: dict[str, dict], args: argparse.Namespace, command: str, started: str) -> str:
    names = {
        "fp32": "unquantized (fp32)",
        "gptq/qtune": "GPTQ g128 — qtune",
        "gptq/gptqmodel": "GPTQ g128 — GPTQModel",
        "gptq/rtn": "GPTQ g128 — RTN",
        "awq/qtune": "AWQ g64 — qtune",
        "awq/gptqmodel": "AWQ g64 — GPTQModel",
        "awq/rtn": "AWQ g64 — RTN",
    }
    lines = [
        "| model | method | ppl (all tokens) | ppl (answers) | KL vs fp32 (nats/token) | top-1 agree | exact match | quantize s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, results in all_results.items():
        for key, name in names.items():
            r = results.get(key)
            if r is None:
                continue
            em = f"{100 * r['em']:.1f}% ({r['em_correct']}/{r['em_total']})" if "em" in r else "not run"
            q = r.get("quant", {})
            lines.append(
                f"| {label} | {name} | {fmt(r['ppl'], '.4f')} | {fmt(r['answer_ppl'], '.4f')} | "
                f"{fmt(r.get('kl'), '.4f')} | {fmt(r.get('top1'), '.3f')} | {em} | {fmt(q.get('seconds'), '.1f')}"
                + (f" ({q['threads']} thr)" if q.get("threads") else "")
                + " |"
            )
    verdicts = []

    def verdict(ok: bool, text: str) -> None:
        verdicts.append(f"- **{'met' if ok else 'MISSED'}**: {text}")

    for label, results in all_results.items():
        for method, ref_name in (("gptq", "GPTQModel GPTQ"), ("awq", "GPTQModel AWQ")):
            ours, ref, rtn = (results.get(f"{method}/{t}") for t in ("qtune", "gptqmodel", "rtn"))
            if ours and rtn and not ref:
                verdict(
                    ours["ppl"] < rtn["ppl"] and ours["kl"] < rtn["kl"],
                    f"{label} {method.upper()} qtune below RTN: ppl {ours['ppl']:.4f} vs {rtn['ppl']:.4f}, KL {ours['kl']:.4f} vs {rtn['kl']:.4f}",
                )
                verdicts.append(
                    f"- **not measured**: {label} {method.upper()} qtune vs {ref_name} (ppl and speed): {ref_name} produced no checkpoint in this run"
                )
            if not (ours and ref and rtn):
                continue
            for col, col_name in (("ppl", "ppl (all tokens)"), ("answer_ppl", "ppl (answers)")):
                ratio = ours[col] / ref[col]
                verdict(
                    ratio <= PPL_TOLERANCE,
                    f"{label} {method.upper()} {col_name}: qtune {ours[col]:.4f} vs {ref_name} {ref[col]:.4f} "
                    f"= ×{ratio:.4f} (target ≤ ×{PPL_TOLERANCE})" + ("" if ratio <= PPL_TOLERANCE else f", over by {100 * (ratio - PPL_TOLERANCE):.2f} points"),
                )
            verdict(
                ours["ppl"] < rtn["ppl"] and ref["ppl"] < rtn["ppl"],
                f"{label} {method.upper()} below RTN: qtune {ours['ppl']:.4f}, {ref_name} {ref['ppl']:.4f}, RTN "
                f"{rtn['ppl']:.4f} (KL {ours['kl']:.4f} / {ref['kl']:.4f} / {rtn['kl']:.4f})",
            )
            verdict(
                ours["kl"] <= ref["kl"] * PPL_TOLERANCE,
                f"{label} {method.upper()} KL: qtune {ours['kl']:.4f} vs {ref_name} {ref['kl']:.4f} = ×{ours['kl'] / ref['kl']:.3f} "
                f"(informative; same ×{PPL_TOLERANCE} bar)",
            )
    merged = all_results.get("merged", {})
    if "em" in merged.get("fp32", {}):
        base_em = merged["fp32"]["em"]
        for key in ("gptq/qtune", "gptq/gptqmodel", "gptq/rtn", "awq/qtune", "awq/gptqmodel", "awq/rtn"):
            r = merged.get(key)
            if r and "em" in r:
                need = EM_FRACTION * base_em
                verdict(
                    r["em"] >= need,
                    f"merged {names[key]} exact match {100 * r['em']:.1f}% vs merged fp32 "
                    f"{100 * base_em:.1f}% (target ≥ {100 * need:.1f}%)" + ("" if r["em"] >= need else f", short by {100 * (need - r['em']):.1f} points"),
                )
    for label, results in all_results.items():
        for method in ("gptq", "awq"):
            ours, ref = results.get(f"{method}/qtune"), results.get(f"{method}/gptqmodel")
            if not (ours and ref):
                continue
            a, b = ours["quant"], ref["quant"]
            ratio = a["seconds"] / b["seconds"]
            verdict(
                ratio <= 1.0,
                f"{label} {method.upper()} quantize time: qtune {a['seconds']:.1f}s vs GPTQModel "
                f"{b['seconds']:.1f}s = ×{ratio:.2f} at {a.get('threads')}/{b.get('threads')} threads "
                "(target ≤ ×1.00)" + ("" if ratio <= 1.0 else f", qtune slower by {100 * (ratio - 1):.0f}%"),
            )
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor()
    )
    some = next(iter(all_results.values()))
    meta = {k: some.get(f"gptq/{t}", {}).get("quant", {}) for k, t in (("qtune", "qtune"), ("gptqmodel", "gptqmodel"))}
    text = "\n".join(
        [
            "# GPTQ / AWQ benchmark: qtune vs GPTQModel vs round-to-nearest",
            "",
            f"Date: {started} (UTC). Device: {cpu}, {os.cpu_count()} cores visible; threads per quantizer "
            "(OMP_NUM_THREADS = MKL_NUM_THREADS = torch.set_num_threads) as given in the quantize column; no GPU; "
            f"1-minute load average when the report was written: {os.getloadavg()[0]:.1f} (the benchmark itself keeps 2 cores busy).",
            "",
            f"Command: `{command}`",
            "",
            "## Results",
            "",
            *lines,
            "",
            "## Verdicts",
            "",
            *verdicts,
            "",
            "## How it was made",
            "",
            f"- Calibration (identical tensor for every tool): {args.samples} × {args.seq_len} tokens of "
            "recipes/data/quickstart_train.jsonl rendered through the chat template exactly as qtune training renders it "
            f"(qtune.data.Formatter), records shuffled with seed {args.seed} and concatenated, no padding."
            + (
                f" AWQ (both tools) calibrates on the first {args.awq_samples} rows of that same tensor "
                f"({args.awq_samples} × {args.seq_len} tokens), to fit the time budget: GPTQModel's AWQ on this CPU took about "
                "1.5 min per layer with 64 rows on a loaded machine, 14 s per layer with 16 rows on an idle one."
                if args.awq_samples
                else ""
            ),
            "- Evaluation text (disjoint from calibration): recipes/data/quickstart_validation.jsonl rendered the same way "
            "(qtune.data.prepare_data). *ppl (all tokens)*: every token of the rendered conversations, except that the "
            "system prompt and template every conversation opens with (the shared prefix) is scored once, in the first "
            "conversation; *ppl (answers)*: "
            "the trainable answer tokens only, as `qtune eval` reports; *KL*: mean per-token KL(fp32 ‖ quantized) in nats "
            "over every real token (qtune.metrics.divergence); *exact match*: qtune.metrics.task_accuracy on the "
            "validation prompts, greedy, max_new_tokens from the recipe, as `qtune eval` does.",
            "- Every quantized checkpoint, GPTQModel's included, is evaluated through the same path: qtune's own readers "
            "(`load_dequantized_gptq_model` / `load_dequantized_awq_model`, which dequantize to fp32 and run a plain HF model; "
            "they read GPTQModel files, verified by tests/test_gptq_awq_loaders.py), so the comparison is apples to apples. "
            "RTN checkpoints are written by qtune's writers and read back the same way.",
            f"- GPTQ: 4-bit, group {GPTQ_GROUP} (K=576 gives a partial last group of 64), sym, no act-order, true-sequential. "
            f"qtune: `quantize_model_gptq(damp={args.qtune_damp}, batch_size={args.qtune_batch_size}, "
            f"group_aware={not args.qtune_no_group_aware})`. "
            f"GPTQModel {meta['gptqmodel'].get('tool', '')}: `GPTQConfig(bits=4, group_size={GPTQ_GROUP}, desc_act=False, sym=True)` "
            f"with its defaults otherwise: damp_percent={meta['gptqmodel'].get('damp_percent')}, "
            f"act_group_aware={meta['gptqmodel'].get('act_group_aware')} (GAR: group-aware column ordering, as qtune's "
            f"group_aware), batch_size={args.oracle_batch_size}, loaded with dtype=float32. "
            f"Damp: qtune adds {args.qtune_damp:g} × mean(diag H) (its default is 0.01), GPTQModel "
            f"{meta['gptqmodel'].get('damp_percent')} ×.",
            f"- AWQ: 4-bit GEMM, group {AWQ_GROUP} (group 128 is impossible for AWQ at K=576), asymmetric (zero point). "
            f"qtune: `quantize_model_awq(group_size={AWQ_GROUP}, n_grid=20, duo_scaling=True, apply_clip=True)`. "
            f"GPTQModel: `AWQConfig(bits=4, group_size={AWQ_GROUP}, sym=False)`, `quantize(..., backend=BACKEND.AWQ_TORCH)`, "
            "loaded with dtype=bfloat16 (its CPU default: with float32 its AWQ_TORCH packer fails, "
            "`NotImplementedError: AwqTorchLinear only supports [torch.float16, torch.bfloat16]`), so GPTQModel's AWQ search "
            "runs in bf16 while qtune's runs in fp32.",
            "- RTN: qtune.quant.rtn.rtn_quantize per linear with the same grid conventions (GPTQ sym g128; AWQ asym g64).",
            "- Quantize seconds: the quantize call alone (GPTQModel `model.quantize(...)`, qtune `quantize_model_*`), each tool "
            "in a fresh subprocess with the same threads, model and calibration tensor; the order alternates between tools "
            "(qtune first on one model, GPTQModel first on the other, and swapped between GPTQ and AWQ) and the verdict uses "
            "the sum over models. Loading and saving are excluded; process wall times are in the results JSON.",
            f"- Raw numbers: {args.work}/<model>/results.json.",
            "",
            *([Path(args.notes).read_text()] if args.notes else []),
        ]
    )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merged", type=Path, help="merged quickstart model (HF checkpoint directory)")
    parser.add_argument("--models", default="merged,base", help="which of merged,base to run, in order")
    parser.add_argument("--methods", default="gptq,awq")
    parser.add_argument("--base-methods", default=None, help="methods for the base model (default: --methods)")
    parser.add_argument("--skip-base-em", action="store_true", help="skip exact match on the base model")
    parser.add_argument("--skip-em", action="store_true", help="skip exact match on every model")
    parser.add_argument("--em-batch-size", type=int, default=60, help="prompts per generate call (0: the recipe's)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qtune-damp", type=float, default=0.01)
    parser.add_argument("--qtune-batch-size", type=int, default=8)
    parser.add_argument("--qtune-no-group-aware", action="store_true", help="qtune GPTQ in natural group order")
    parser.add_argument("--oracle-damp", default="default")
    parser.add_argument("--oracle-batch-size", type=int, default=1)
    parser.add_argument("--oracle-awq-dtype", default="bfloat16", help="GPTQModel's AWQ packer (AwqTorchLinear) refuses float32; bfloat16 is its CPU default")
    parser.add_argument("--oracle-python", default=None, help="an interpreter with GPTQModel (default: the tests' oracle venv)")
    parser.add_argument("--work", default=str(REPO / ".cache/bench-gptq-awq"))
    parser.add_argument("--out", type=Path, default=REPO / "docs/bench_gptq_awq.md")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--tools", default="qtune,gptqmodel", help="quantizers to run (the other's cached result is used)")
    parser.add_argument("--no-eval", action="store_true", help="quantize only")
    parser.add_argument("--awq-samples", type=int, default=0, help="AWQ calibrates on the first N rows of the calibration tensor (both tools); 0: all")
    parser.add_argument("--notes", type=Path, help="markdown appended to the report (observations, bugs)")
    # worker mode (internal)
    parser.add_argument("--worker", choices=["gptq", "awq"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--calib", help=argparse.SUPPRESS)
    parser.add_argument("--dst", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--damp", type=float, default=0.01, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--group-aware", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        qtune_worker(args)
        return
    args.oracle_python = args.oracle_python or gptqmodel_python()
    if args.oracle_python is None and "gptqmodel" in args.tools.split(","):
        parser.error("no interpreter with GPTQModel: bash scripts/build_oracles.sh builds .cache/oracle-venv, or pass --oracle-python")

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    command = " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?"), ".venv/bin/python", "scripts/bench_gptq_awq.py", *sys.argv[1:]])
    if args.fresh and Path(args.work).exists():
        shutil.rmtree(args.work)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    from qtune.models import builtin_checkpoint

    paths = {"base": builtin_checkpoint("smollm2-135m-instruct"), "merged": args.merged}
    all_results = {}
    for label in args.models.split(","):
        if paths[label] is None:
            raise SystemExit("--merged PATH is required for the merged model")
        methods = (args.base_methods if label == "base" and args.base_methods else args.methods).split(",")
        all_results[label] = bench_model(label, Path(paths[label]), methods, qtune_first=label == "base", args=args)
        if args.no_eval:
            continue
        text = report(all_results, args, command, started)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if not args.no_eval:
        print(text)


if __name__ == "__main__":
    main()
