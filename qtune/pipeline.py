"""The stages of a run (train, merge, eval, export, report) and the one command that chains them.

Each stage writes its output atomically and is skipped when that output already exists, so an
interrupted ``qtune run`` picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qtune import data as qdata
from qtune import memory_plan, merge, models, rundir
from qtune.blockwise import StreamedModel
from qtune.errors import QtuneError, stage
from qtune.evaluate import divergence_from, perplexity, streamed_outputs, streamed_reference, task_accuracy
from qtune.gguf_model import gguf_tensor_bytes, load_gguf_model
from qtune.paths import atomic_dir, write_text_atomic
from qtune.recipe import LoadedRecipe, parse_size
from qtune.scorers import resolve_scorer
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
    with stage("merge", run_dir):
        rundir.remove_staging(run_dir)
        return _merge_run(run_dir)


def _merge_run(run_dir: Path) -> Path:
    adapter_dir = run_dir / rundir.ADAPTER_DIR
    rundir.load_run_recipe(run_dir)  # a clear error when run_dir is not a run directory at all
    if not adapter_dir.is_dir():
        raise QtuneError(f"{run_dir} has no trained adapter yet; run qtune train first")
    loaded, checkpoint, tokenizer, prepared = _context(run_dir)
    memory_plan.log_stage(loaded, "merge")
    recipe = loaded.recipe
    rows = merge.measurement_rows(_held_out_rows(prepared))
    if not rows:
        raise QtuneError("merging needs held-out rows to compare the merge bases; give the recipe a validation split")

    device = models.device()
    specs = merge.planned_nf4_specs(checkpoint, recipe.model, recipe.quantization, device)
    try:
        adapter = merge.streamed_adapter(checkpoint, adapter_dir, device, recipe.model)
    except ValueError as exc:
        raise QtuneError(str(exc)) from None
    if not adapter.deltas:
        raise QtuneError(f"the adapter in {adapter_dir} has no LoRA layers to merge")
    reference = streamed_outputs(adapter.streamed, rows, tokenizer.pad_token_id, adapter.source(specs))
    deltas = adapter.deltas
    del adapter

    streamed = StreamedModel(checkpoint, device, torch.float32, recipe.model.trust_remote_code, recipe.model.attn_implementation)
    dtype = merge.choose_dtype(recipe.output.merge_dtype, merge.config_dtype(checkpoint), lambda: merge.checkpoint_absmax(streamed.reader))
    bases = merge.MERGE_BASES if recipe.output.merge_base == "auto" else (recipe.output.merge_base,)
    if not specs:
        bases = ("original",)  # an unquantized base has no dequantized variant
    sources = {name: merge.candidate_source(name, streamed.reader, specs, deltas, dtype) for name in bases}
    scores = merge.measure_candidates(streamed, sources, reference)
    del reference
    chosen = min(scores, key=lambda name: scores[name].mean_kl)
    report = merge.MergeReport(
        chosen=chosen,
        dtype=str(dtype).removeprefix("torch."),
        kl={k: v.mean_kl for k, v in scores.items()},
        top1={k: v.top1_agreement for k, v in scores.items()},
        tokens=scores[chosen].tokens,
    )
    with atomic_dir(run_dir / rundir.MERGED_DIR, overwrite=True) as staging:
        merge.write_merged(streamed, sources[chosen], dtype, staging, parse_size(recipe.output.max_shard_size))
        merge.write_merged_config(checkpoint, dtype, staging, recipe.model.trust_remote_code)
        tokenizer.save_pretrained(staging)
    write_text_atomic(run_dir / rundir.MERGE_REPORT, json.dumps(report.as_dict(), indent=2))
    if not report.passes:
        log.warning("the merged model differs from the adapter model by %.3g nats/token (gate %.0e)", report.kl[chosen], report.gate)
    log.info("merged into the %s base (%s)", chosen, report.dtype)
    return run_dir / rundir.MERGED_DIR


@dataclass
class Artifact:
    """An artifact ready to score: the model, what it takes on disk (or in memory, for NF4), what runs it."""

    model: object
    size_bytes: int
    runtime: str
    weight_bytes: int | None = None  # the tensors alone, when the file also holds a sizeable tokenizer (GGUF)


def _files_size(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def _nf4_bytes(model) -> int:
    return int(model.get_memory_footprint())


def load_artifact(name: str, run_dir: Path, loaded: LoadedRecipe, checkpoint: Path, n_ctx: int = 2048,
                  offload: memory_plan.Offload | None = None) -> Artifact:
    """An artifact of the run, loaded to score. With ``offload`` (the memory plan's, when the merged
    model's weights do not fit) accelerate places the merged model's weights, the rest in OFFLOAD_DIR."""
    recipe = loaded.recipe
    if name == "base":
        model = models.load_base(checkpoint, recipe.model, recipe.quantization)
        size = _nf4_bytes(model)
        return Artifact(models.for_inference(model), size, "transformers + bitsandbytes")
    if name == "adapter":
        adapter_dir = run_dir / rundir.ADAPTER_DIR
        model = models.load_adapter_model(checkpoint, adapter_dir, recipe.model, recipe.quantization)
        size = _nf4_bytes(model.get_base_model()) + _files_size(adapter_dir)
        return Artifact(models.for_inference(model), size, "transformers + bitsandbytes + peft")
    if name == "merged":
        merged = run_dir / rundir.MERGED_DIR
        if offload is None:
            return Artifact(models.load_for_eval(merged, recipe.model), _files_size(merged), "transformers")
        log.info("the merged model does not fit on its device; accelerate offloads %.1f GiB of its weights to host "
                 "memory and %.1f GiB to disk", offload.host_bytes / 2**30, offload.disk_bytes / 2**30)
        model = models.load_for_eval(merged, recipe.model, offload, run_dir / OFFLOAD_DIR)
        return Artifact(model, _files_size(merged), "transformers + accelerate offload")
    path = run_dir / "exports" / name
    if path.suffix == ".gguf" and path.is_file():
        model = load_gguf_model(path, n_ctx)
        return Artifact(model, path.stat().st_size, model.runtime, gguf_tensor_bytes(path))
    if is_w4a16_checkpoint(path):
        runtime = "qtune W4A16 kernels" if torch.cuda.is_available() else "qtune, dequantized to fp16 (CPU)"
        return Artifact(load_w4a16_model(path), _files_size(path), runtime)
    raise QtuneError(f"unknown artifact '{name}'; this run has: {', '.join(available_artifacts(run_dir))}")


def _is_adapter(path: Path) -> bool:
    from qtune.formats.gguf import read_gguf_header

    try:
        return read_gguf_header(path)[0].get("general.type") == "adapter"
    except QtuneError:
        return False


def available_artifacts(run_dir: Path) -> list[str]:
    present = ["base"]
    if (run_dir / rundir.ADAPTER_DIR).is_dir():
        present.append("adapter")
    if (run_dir / rundir.MERGED_DIR).is_dir():
        present.append("merged")
    exports = run_dir / "exports"
    if exports.is_dir():
        present += sorted(p.name for p in exports.iterdir()
                          if (p.is_dir() and is_w4a16_checkpoint(p)) or (p.is_file() and p.suffix == ".gguf" and not _is_adapter(p)))
    return present


def _context_length(prepared: qdata.PreparedData, prompts: list[dict], tokenizer, max_new_tokens: int) -> int:
    longest_row = max((len(r["input_ids"]) for r in prepared.validation), default=0)
    longest_prompt = max((len(tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]) for p in prompts), default=0)
    needed = max(longest_row, longest_prompt + max_new_tokens, 64)
    return -(-needed // 256) * 256


def evaluate_run(run_dir: Path, artifacts: list[str] | None = None) -> dict[str, dict]:
    """Score artifacts of a run on its held-out data; results land in run_dir/eval/<artifact>.json.

    An artifact that fails to load or to score gets a result with ``status: failed`` and the reason, and
    the others are still scored.
    """
    run_dir = run_dir.resolve()
    with stage("eval", run_dir):
        rundir.remove_staging(run_dir)
        return _evaluate_run(run_dir, artifacts)


OFFLOAD_DIR = ".eval-offload"  # accelerate's offloaded weights while an artifact is scored; removed after


def _evaluate_run(run_dir: Path, artifacts: list[str] | None) -> dict[str, dict]:
    shutil.rmtree(run_dir / OFFLOAD_DIR, ignore_errors=True)  # a killed evaluation's leftovers
    try:
        return _evaluate_artifacts(run_dir, artifacts)
    finally:
        shutil.rmtree(run_dir / OFFLOAD_DIR, ignore_errors=True)


def _evaluate_artifacts(run_dir: Path, artifacts: list[str] | None) -> dict[str, dict]:
    loaded, checkpoint, tokenizer, prepared = _context(run_dir)
    plan = memory_plan.log_stage(loaded, "eval")
    offload = plan.eval_offload() if plan else None
    present = available_artifacts(run_dir)
    wanted = artifacts or present
    missing = [a for a in wanted if a not in present]
    if missing:
        raise QtuneError(f"{run_dir} has no {', '.join(missing)} yet (it has: {', '.join(present)})")
    if not prepared.eval_prompts:
        raise QtuneError("evaluation needs held-out prompts with reference answers: give the recipe a validation split of alpaca, chat or prompt/completion data")
    cfg = loaded.recipe.evaluation
    try:
        scorer = resolve_scorer(cfg.scorer)
    except ValueError as exc:
        raise QtuneError(str(exc)) from None
    prompts = prepared.eval_prompts[: cfg.max_samples] if cfg.max_samples else prepared.eval_prompts
    n_ctx = _context_length(prepared, prompts, tokenizer, cfg.max_new_tokens)
    n_params = models.parameter_count(checkpoint)
    results = {}
    reference = None
    if "merged" in present and any(name != "merged" for name in wanted) and prepared.validation:
        try:  # float32, one block at a time: its head's inputs are what is kept (evaluate.ReferenceOutputs)
            reference = streamed_reference(run_dir / rundir.MERGED_DIR, prepared.validation, tokenizer.pad_token_id, models.device())
        except Exception as exc:  # the merged row reports the failure; the rest is scored without KL
            log.error("the merged model failed to load (%s); scoring without KL against it", exc)
    for name in wanted:
        step, started = "load", time.perf_counter()
        try:
            with stage(f"eval {name}", run_dir):
                artifact = load_artifact(name, run_dir, loaded, checkpoint, n_ctx, offload)
                step = "score"
                result = _score(name, artifact, reference, tokenizer, prepared, prompts, cfg, scorer)
        except Exception as exc:  # reported in the artifact's row; the other artifacts are still scored
            log.error("%s failed to %s: %s", name, step, exc)
            log.debug("traceback", exc_info=True)
            result = failed_result(name, step, exc)
        else:
            result.update(size_bytes=artifact.size_bytes, bits_per_weight=round(8 * (artifact.weight_bytes or artifact.size_bytes) / n_params, 3),
                          runtime=artifact.runtime, eval_seconds=round(time.perf_counter() - started, 1))
            log.info("%-24s %s %5.1f%% (%d/%d), perplexity %s, KL vs merged %s (%.0f s)", name, cfg.scorer, 100 * result["task_metric"],
                     result["correct"], result["total"], _fmt(result["perplexity"], ".3f"), _fmt(result["kl_vs_merged"], ".4f"), result["eval_seconds"])
            del artifact
        write_text_atomic(run_dir / "eval" / f"{name}.json", json.dumps(result, indent=2))
        results[name] = result
    return results


def failed_result(name: str, stage: str, exc: BaseException) -> dict:
    return {"artifact": name, "status": "failed", "stage": stage, "error": f"{type(exc).__name__}: {exc}"}


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _score(name: str, artifact: Artifact, reference, tokenizer, prepared: qdata.PreparedData, prompts: list[dict], cfg, scorer) -> dict:
    model = artifact.model
    task = task_accuracy(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, scorer)
    versus_merged = divergence_from(reference, model) if reference is not None and name != "merged" else None
    return {
        "artifact": name,
        "status": "ok",
        "metric": cfg.scorer,
        "task_metric": task.accuracy,
        "correct": task.correct,
        "total": task.total,
        "perplexity": (versus_merged.perplexity if versus_merged else perplexity(model, prepared.validation, tokenizer.pad_token_id))
        if prepared.validation else None,
        "kl_vs_merged": versus_merged.mean_kl if versus_merged else None,
        "top1_vs_merged": versus_merged.top1_agreement if versus_merged else None,
        "by_category": task.by_category,
        "by_length": task.by_length,
        "generation_tokens_per_second": task.tokens_per_second,
        "samples": task.samples,
    }


def _scored(run_dir: Path) -> set[str]:
    """Artifacts with a successful evaluation on record (failed ones are tried again)."""
    done = set()
    for path in (run_dir / "eval").glob("*.json"):
        try:
            if json.loads(path.read_text()).get("status", "ok") == "ok":
                done.add(path.name.removesuffix(".json"))
        except (OSError, json.JSONDecodeError):
            pass
    return done


def run(loaded: LoadedRecipe, overwrite: bool = False) -> int:
    """train → merge → eval (base, adapter, merged) → exports → eval (exports) → report.

    Each stage is skipped when its output is already complete, so an interrupted run picks up where it
    stopped. Returns 0 when every artifact passes the recipe's gates, 1 otherwise.
    """
    from qtune.exports import export, report_path
    from qtune.report import write_report
    from qtune.train import train

    run_dir = loaded.output_dir
    resume = not overwrite and rundir.read_run_file(run_dir) is not None
    train(loaded, resume=resume, overwrite=overwrite)
    if not rundir.is_merged(run_dir):
        merge_run(run_dir)
    pending = [a for a in ARTIFACTS if a not in _scored(run_dir)]
    if pending:
        evaluate_run(run_dir, pending)
    export_names = []
    for target in loaded.recipe.export:
        name = target.default_name()
        if target.format != "gguf-lora":  # an adapter alone is not a model to score
            export_names.append(name)
        output = run_dir / rundir.EXPORTS_DIR / name
        if output.exists() and report_path(output).is_file():
            continue
        try:
            export(run_dir, target, output, overwrite=output.exists())
        except Exception as exc:  # the report shows the failed export; the other exports still run
            log.error("export %s failed: %s", name, exc)
            log.debug("traceback", exc_info=True)
            write_text_atomic(run_dir / "eval" / f"{name}.json", json.dumps(failed_result(name, "export", exc), indent=2))
    pending = [n for n in export_names if n not in _scored(run_dir) and (run_dir / "exports" / n).exists()]
    if pending:
        evaluate_run(run_dir, pending)
    report = write_report(run_dir)
    print(report.summary())
    failing = [row.artifact for row in report.rows if row.passed is False]
    if failing:
        log.error("%d artifact(s) failed their gates: %s (see %s)", len(failing), ", ".join(failing), run_dir / "report.md")
        return 1
    return 0
