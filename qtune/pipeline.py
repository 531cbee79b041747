"""The stages of a run (train, merge, eval) and the one command that chains them.

Each stage writes its output atomically and is skipped when that output already exists, so an
interrupted ``qtune run`` picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from qtune import data as qdata
from qtune import merge, models, rundir
from qtune.errors import QtuneError
from qtune.evaluate import divergence, exact_match, perplexity
from qtune.paths import atomic_dir, write_text_atomic
from qtune.recipe import LoadedRecipe
from qtune.w4a16_models import is_w4a16_checkpoint, load_w4a16_model

log = logging.getLogger(__name__)

ARTIFACTS = ("base", "adapter", "merged")


def _context(run_dir: Path):
    loaded = rundir.load_run_recipe(run_dir)
    recipe = loaded.recipe
    checkpoint = models.resolve_base(recipe.model)
    tokenizer = models.load_tokenizer(checkpoint, recipe.model.trust_remote_code)
    prepared = qdata.prepare_data(recipe.data, tokenizer, loaded.base_dir, recipe.training.seed)
    return loaded, checkpoint, tokenizer, prepared


def _held_out_rows(prepared: qdata.PreparedData) -> list[dict]:
    if prepared.validation:
        return prepared.validation
    log.warning("the recipe has no validation split; measuring on the first 64 training rows instead")
    return [row for row in prepared.train[:64] if "attention_mask" not in row and "position_ids" not in row]


def merge_run(run_dir: Path) -> Path:
    """Merge the run's adapter into a standard HF checkpoint in run_dir/merged."""
    run_dir = run_dir.resolve()
    adapter_dir = run_dir / rundir.ADAPTER_DIR
    rundir.load_run_recipe(run_dir)  # a clear error when run_dir is not a run directory at all
    if not adapter_dir.is_dir():
        raise QtuneError(f"{run_dir} has no trained adapter yet; run qtune train first")
    loaded, checkpoint, tokenizer, prepared = _context(run_dir)
    recipe = loaded.recipe
    rows = _held_out_rows(prepared)
    if not rows:
        raise QtuneError("merging needs held-out rows to compare the merge bases; give the recipe a validation split")

    adapter_model = models.load_adapter_model(checkpoint, adapter_dir, recipe.model, recipe.quantization)
    full_model = models.load_full_precision(checkpoint, recipe.model, torch.float32).eval()
    original = {k: v.detach().clone() for k, v in full_model.state_dict().items()}
    deltas = merge.lora_deltas(adapter_model)
    dequantized = merge.dequantized_weights(adapter_model)
    models.for_inference(adapter_model)
    if not deltas:
        raise QtuneError(f"the adapter in {adapter_dir} has no LoRA layers to merge")
    dtype = merge.choose_dtype(recipe.output.merge_dtype, getattr(full_model.config, "dtype", None), original)
    bases = merge.MERGE_BASES if recipe.output.merge_base == "auto" else (recipe.output.merge_base,)
    if not any(isinstance(m, _linear4bit()) for m in adapter_model.modules()):
        bases = ("original",)  # an unquantized base has no dequantized variant
    scores = merge.measure_bases(adapter_model, full_model, original, dequantized, deltas, rows, tokenizer.pad_token_id, dtype, bases)
    chosen = min(scores, key=lambda name: scores[name].mean_kl)
    report = merge.MergeReport(
        chosen=chosen,
        dtype=str(dtype).removeprefix("torch."),
        kl={k: v.mean_kl for k, v in scores.items()},
        top1={k: v.top1_agreement for k, v in scores.items()},
        tokens=scores[chosen].tokens,
    )
    del adapter_model
    final = merge.rounded(merge.candidate_state(chosen, original, dequantized, deltas), dtype)
    full_model.load_state_dict(final, strict=False)
    full_model.to(dtype)
    full_model.config.dtype = dtype
    with atomic_dir(run_dir / rundir.MERGED_DIR, overwrite=True) as staging:
        full_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    write_text_atomic(run_dir / "merge_report.json", json.dumps(report.as_dict(), indent=2))
    if not report.passes:
        log.warning("the merged model differs from the adapter model by %.3g nats/token (gate %.0e)", report.kl[chosen], report.gate)
    log.info("merged into the %s base (%s)", chosen, report.dtype)
    return run_dir / rundir.MERGED_DIR


def _linear4bit():
    from bitsandbytes.nn import Linear4bit

    return Linear4bit


def load_artifact(name: str, run_dir: Path, loaded: LoadedRecipe, checkpoint: Path):
    recipe = loaded.recipe
    if name == "base":
        return models.for_inference(models.load_base(checkpoint, recipe.model, recipe.quantization))
    if name == "adapter":
        return models.for_inference(models.load_adapter_model(checkpoint, run_dir / rundir.ADAPTER_DIR, recipe.model, recipe.quantization))
    if name == "merged":
        return models.load_full_precision(run_dir / rundir.MERGED_DIR, recipe.model, torch.float32)
    export_dir = run_dir / "exports" / name
    if is_w4a16_checkpoint(export_dir):
        return load_w4a16_model(export_dir)
    raise QtuneError(f"unknown artifact '{name}'; this run has: {', '.join(available_artifacts(run_dir))}")


def available_artifacts(run_dir: Path) -> list[str]:
    present = ["base"]
    if (run_dir / rundir.ADAPTER_DIR).is_dir():
        present.append("adapter")
    if (run_dir / rundir.MERGED_DIR).is_dir():
        present.append("merged")
    exports = run_dir / "exports"
    if exports.is_dir():
        present += sorted(p.name for p in exports.iterdir() if p.is_dir() and is_w4a16_checkpoint(p))
    return present


def evaluate_run(run_dir: Path, artifacts: list[str] | None = None) -> dict[str, dict]:
    """Score artifacts of a run on its held-out data; results land in run_dir/eval/<artifact>.json."""
    run_dir = run_dir.resolve()
    loaded, checkpoint, tokenizer, prepared = _context(run_dir)
    present = available_artifacts(run_dir)
    wanted = artifacts or present
    missing = [a for a in wanted if a not in present]
    if missing:
        raise QtuneError(f"{run_dir} has no {', '.join(missing)} yet (it has: {', '.join(present)})")
    if not prepared.eval_prompts:
        raise QtuneError("evaluation needs held-out prompts with reference answers: give the recipe a validation split of alpaca, chat or prompt/completion data")
    cfg = loaded.recipe.evaluation
    prompts = prepared.eval_prompts[: cfg.max_samples] if cfg.max_samples else prepared.eval_prompts
    results = {}
    reference = None
    if "merged" in present and any(name != "merged" for name in wanted) and prepared.validation:
        reference = load_artifact("merged", run_dir, loaded, checkpoint)
    for name in wanted:
        model = load_artifact(name, run_dir, loaded, checkpoint)
        em = exact_match(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
        versus_merged = divergence(reference, model, prepared.validation, tokenizer.pad_token_id) if reference is not None and name != "merged" else None
        result = {
            "artifact": name,
            "exact_match": em.accuracy,
            "correct": em.correct,
            "total": em.total,
            "perplexity": perplexity(model, prepared.validation, tokenizer.pad_token_id) if prepared.validation else None,
            "kl_vs_merged": versus_merged.mean_kl if versus_merged else None,
            "top1_vs_merged": versus_merged.top1_agreement if versus_merged else None,
            "by_category": em.by_category,
            "by_length": em.by_length,
            "generation_tokens_per_second": em.tokens_per_second,
            "samples": em.samples,
        }
        write_text_atomic(run_dir / "eval" / f"{name}.json", json.dumps(result, indent=2))
        log.info("%-8s exact match %5.1f%% (%d/%d), perplexity %s", name, 100 * em.accuracy, em.correct, em.total,
                 f"{result['perplexity']:.3f}" if result["perplexity"] else "n/a")
        results[name] = result
        del model
    return results


def run(loaded: LoadedRecipe, overwrite: bool = False) -> int:
    """train → eval (base, adapter) → merge → eval (merged); each stage skipped when its output exists."""
    from qtune.train import train

    run_dir = loaded.output_dir
    resume = not overwrite and rundir.read_run_file(run_dir) is not None
    train(loaded, resume=resume, overwrite=overwrite)
    done = {p.stem for p in (run_dir / "eval").glob("*.json")}
    pending = [a for a in ("base", "adapter") if a not in done]
    if pending:
        evaluate_run(run_dir, pending)
    if not (run_dir / rundir.MERGED_DIR).is_dir():
        merge_run(run_dir)
    if "merged" not in done:
        evaluate_run(run_dir, ["merged"])
    from qtune.exports import export

    for target in loaded.recipe.export:
        output = run_dir / "exports" / target.default_name()
        if not output.exists():
            export(run_dir, target, output)
    summary = {a: json.loads((run_dir / "eval" / f"{a}.json").read_text()) for a in ARTIFACTS}
    print(format_summary(summary, json.loads((run_dir / "merge_report.json").read_text())))
    return 0


def format_summary(results: dict[str, dict], merge_report: dict) -> str:
    lines = ["", "| artifact | exact match | perplexity |", "|---|---|---|"]
    for name, r in results.items():
        ppl = f"{r['perplexity']:.3f}" if r.get("perplexity") else "n/a"
        lines.append(f"| {name} | {100 * r['exact_match']:.1f}% ({r['correct']}/{r['total']}) | {ppl} |")
    kl = ", ".join(f"{k} {v:.2e}" for k, v in merge_report["kl"].items())
    lines.append(f"\nmerge base: {merge_report['chosen']} ({merge_report['dtype']}); KL to the adapter model, nats/token: {kl}")
    return "\n".join(lines)
