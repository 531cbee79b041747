"""The eval stage: load each artifact of a run (the NF4 base, the adapter model, the merged model and
every export), score it on the held-out data (qtune.metrics) and write one EvalResult per artifact to
run_dir/eval/<artifact>.json."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from qtune import data as qdata
from qtune import memory_plan, models, rundir
from qtune.context import load_context
from qtune.errors import QtuneError, stage
from qtune.formats.gguf.reader import read_gguf_header
from qtune.gguf_model import gguf_tensor_bytes, load_gguf_model
from qtune.metrics import divergence_from, perplexity, streamed_reference, task_accuracy
from qtune.paths import write_text_atomic
from qtune.quant.ggml_types import kv_cache_pair
from qtune.quantized_models import is_quantized_checkpoint, load_quantized_model, runtime_name
from qtune.recipe import GateSection, LoadedRecipe
from qtune.scorers import resolve_scorer

log = logging.getLogger(__name__)

OFFLOAD_DIR = ".eval-offload"  # accelerate's offloaded weights while an artifact is scored; removed after
_FAILURE_FIELDS = ("stage", "error")


@dataclass
class EvalResult:
    """One artifact's scores (``status: ok``), or why it has none (``status: failed``, with the stage
    that failed and the error)."""

    artifact: str
    status: str = "ok"
    metric: str | None = None
    task_metric: float | None = None
    correct: int | None = None
    total: int | None = None
    perplexity: float | None = None
    kl_vs_merged: float | None = None
    top1_vs_merged: float | None = None
    tail_vs_merged: dict[str, dict] = field(default_factory=dict)  # metrics.TOKEN_SETS entry -> metrics.TokenTail
    kl_by_category_vs_merged: dict[str, float] = field(default_factory=dict)  # mean over each row's answer tokens
    worst_prompt_vs_merged: dict | None = None  # the held-out row with the highest mean KL over its answer tokens
    by_category: dict[str, float] = field(default_factory=dict)
    by_length: dict[str, float] = field(default_factory=dict)
    generation_tokens_per_second: float | None = None
    samples: list[dict] = field(default_factory=list)
    size_bytes: int | None = None
    bits_per_weight: float | None = None
    runtime: str | None = None
    eval_seconds: float | None = None
    stage: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def vs_merged(self, key: str, tokens: str = "all") -> float | None:
        """A per-token statistic against the merged model (a ``metrics.TokenTail`` field) over a
        ``metrics.TOKEN_SETS`` entry; the mean over all tokens is ``kl_vs_merged``."""
        if key == "mean_kl" and tokens == "all":
            return self.kl_vs_merged
        return self.tail_vs_merged.get(tokens, {}).get(key)

    @property
    def worst_category_vs_merged(self) -> tuple[str, float] | None:
        if len(self.kl_by_category_vs_merged) < 2:
            return None
        return max(self.kl_by_category_vs_merged.items(), key=lambda item: item[1])

    @classmethod
    def failed(cls, name: str, stage: str, exc: BaseException) -> EvalResult:
        return cls(name, status="failed", stage=stage, error=f"{type(exc).__name__}: {exc}")

    def as_dict(self) -> dict:
        if not self.ok:
            return {"artifact": self.artifact, "status": self.status, "stage": self.stage, "error": self.error}
        return {k: v for k, v in asdict(self).items() if k not in _FAILURE_FIELDS}

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, run_dir: Path) -> None:
        write_text_atomic(result_path(run_dir, self.artifact), json.dumps(self.as_dict(), indent=2))


def gate_failures(result: EvalResult, gates: GateSection, metric: str, merged_metric: float | None, merge_report: dict | None) -> list[str] | None:
    """Why ``result`` fails the recipe's gates (empty when it passes); None for the base model, which is
    the starting point, not a deliverable, and for a KV-cache row, a runtime setting scored for
    information. The merged model is gated by its merge's KL to the adapter model, every other artifact
    by its KL (mean, p99), |Δp| p99 and task metric against the merged model."""
    if result.artifact == "base" or split_kv_cache_artifact(result.artifact)[1]:
        return None
    if not result.ok:
        return [f"failed to {result.stage}"]
    reasons = []
    if result.artifact == "merged":
        if merge_report and not merge_report.get("passes", True):
            chosen = merge_report["chosen"]
            reasons.append(f"merge KL to the adapter model {merge_report['kl'][chosen]:.3g} > {merge_report.get('gate')}")
        return reasons
    task = result.task_metric
    over = "" if gates.tokens == "all" else f" over {gates.tokens}"
    for limit, key, what in (
        (gates.max_kl_vs_merged, "mean_kl", "KL"),
        (gates.max_kl_p99_vs_merged, "p99_kl", "KL p99"),
        (gates.max_delta_p_p99, "p99_abs_delta_p", "|Δp| p99"),
    ):
        value = result.vs_merged(key, gates.tokens)
        if limit is None:
            continue
        if value is None:
            reasons.append(f"no {what}{over} against the merged model")
        elif value > limit:
            reasons.append(f"{what}{over} {value:.4g} > {limit}")
    if gates.min_task_ratio is not None or gates.max_task_drop_points is not None:
        if merged_metric is None:
            reasons.append("no merged score to compare with")
        else:
            if gates.min_task_ratio is not None and task < gates.min_task_ratio * merged_metric - 1e-12:
                reasons.append(f"{metric} {100 * task:.1f}% < {gates.min_task_ratio:.0%} of merged ({100 * merged_metric:.1f}%)")
            drop = 100 * (merged_metric - task)
            if gates.max_task_drop_points is not None and drop > gates.max_task_drop_points + 1e-9:
                reasons.append(f"{metric} {drop:.1f} points below merged (> {gates.max_task_drop_points})")
    return reasons


KV_CACHE_MARK = "@kv-"  # "model-Q4_K_M.gguf@kv-q8_0": that GGUF export run by llama.cpp with a q8_0 KV cache


def kv_cache_artifact(gguf_name: str, kv_cache: str) -> str:
    """The artifact name of a GGUF export scored with a llama.cpp KV cache (``"q8_0"`` or K/V ``"q8_0/q4_0"``)."""
    return f"{gguf_name}{KV_CACHE_MARK}{kv_cache.replace('/', '-')}"


def split_kv_cache_artifact(name: str) -> tuple[str, str | None]:
    """(the export's name, its KV cache types or None) of an artifact name."""
    if KV_CACHE_MARK not in name:
        return name, None
    file, spec = name.split(KV_CACHE_MARK, 1)
    try:
        return file, "/".join(dict.fromkeys(kv_cache_pair(spec.replace("-", "/"))))
    except ValueError as exc:
        raise QtuneError(f"artifact '{name}': {exc}") from None


def result_path(run_dir: Path, name: str) -> Path:
    return run_dir / rundir.EVAL_DIR / f"{name}.json"


def read_results(run_dir: Path) -> dict[str, EvalResult]:
    """Every evaluation on record in run_dir/eval (unreadable files are skipped)."""
    results = {}
    for path in sorted((run_dir / rundir.EVAL_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            results[path.name.removesuffix(".json")] = EvalResult.from_dict({"artifact": path.name.removesuffix(".json"), **data})
    return results


def scored(run_dir: Path) -> set[str]:
    """Artifacts with a successful evaluation on record (failed ones are tried again)."""
    return {name for name, result in read_results(run_dir).items() if result.ok}


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


def load_artifact(name: str, run_dir: Path, loaded: LoadedRecipe, checkpoint: Path, n_ctx: int = 2048, offload: memory_plan.Offload | None = None) -> Artifact:
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
        log.info(
            "the merged model does not fit on its device; accelerate offloads %.1f GiB of its weights to host memory and %.1f GiB to disk",
            offload.host_bytes / 2**30,
            offload.disk_bytes / 2**30,
        )
        model = models.load_for_eval(merged, recipe.model, offload, run_dir / OFFLOAD_DIR)
        return Artifact(model, _files_size(merged), "transformers + accelerate offload")
    file, kv_cache = split_kv_cache_artifact(name)
    path = run_dir / "exports" / file
    if path.suffix == ".gguf" and path.is_file():
        model = load_gguf_model(path, n_ctx, kv_cache=kv_cache)
        return Artifact(model, path.stat().st_size, model.runtime, gguf_tensor_bytes(path))
    if kv_cache is not None:
        raise QtuneError(f"artifact '{name}': a KV cache type applies to a GGUF export, and this run has no exports/{file}")
    if is_quantized_checkpoint(path):
        model = load_quantized_model(path)
        return Artifact(model, _files_size(path), runtime_name(model))
    raise QtuneError(f"unknown artifact '{name}'; this run has: {', '.join(available_artifacts(run_dir))}")


def _is_adapter(path: Path) -> bool:
    try:
        return read_gguf_header(path)[0].get("general.type") == "adapter"
    except QtuneError:
        return False


def available_artifacts(run_dir: Path, kv_cache_types: Sequence[str] = ()) -> list[str]:
    """The artifacts of a run on disk, and each GGUF export with each of ``kv_cache_types``."""
    present = ["base"]
    if (run_dir / rundir.ADAPTER_DIR).is_dir():
        present.append("adapter")
    if (run_dir / rundir.MERGED_DIR).is_dir():
        present.append("merged")
    exports = run_dir / "exports"
    if exports.is_dir():
        present += sorted(
            p.name for p in exports.iterdir() if (p.is_dir() and is_quantized_checkpoint(p)) or (p.is_file() and p.suffix == ".gguf" and not _is_adapter(p))
        )
    return present + [kv_cache_artifact(name, kv) for name in present if name.endswith(".gguf") for kv in kv_cache_types]


def _context_length(prepared: qdata.PreparedData, prompts: list[dict], tokenizer, max_new_tokens: int) -> int:
    longest_row = max((len(r["input_ids"]) for r in prepared.validation), default=0)
    longest_prompt = max((len(tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]) for p in prompts), default=0)
    needed = max(longest_row, longest_prompt + max_new_tokens, 64)
    return -(-needed // 256) * 256


def evaluate_run(run_dir: Path, artifacts: list[str] | None = None) -> dict[str, EvalResult]:
    """Score artifacts of a run on its held-out data; results land in run_dir/eval/<artifact>.json.

    An artifact that fails to load or to score gets a result with ``status: failed`` and the reason, and
    the others are still scored.
    """
    run_dir = run_dir.resolve()
    with stage("eval", run_dir):
        rundir.remove_staging(run_dir)
        return _evaluate_run(run_dir, artifacts)


def _evaluate_run(run_dir: Path, artifacts: list[str] | None) -> dict[str, EvalResult]:
    shutil.rmtree(run_dir / OFFLOAD_DIR, ignore_errors=True)  # a killed evaluation's leftovers
    try:
        return _evaluate_artifacts(run_dir, artifacts)
    finally:
        shutil.rmtree(run_dir / OFFLOAD_DIR, ignore_errors=True)


def _evaluate_artifacts(run_dir: Path, artifacts: list[str] | None) -> dict[str, EvalResult]:
    context = load_context(run_dir)
    loaded, checkpoint, tokenizer, prepared = context.loaded, context.checkpoint, context.tokenizer, context.prepared
    plan = memory_plan.log_stage(loaded, "eval")
    offload = plan.eval_offload() if plan else None
    cfg = loaded.recipe.evaluation
    present = available_artifacts(run_dir, cfg.kv_cache_types)
    wanted = artifacts or present
    missing = [a for a in wanted if a not in present and split_kv_cache_artifact(a)[0] not in present]
    if missing:
        raise QtuneError(f"{run_dir} has no {', '.join(missing)} yet (it has: {', '.join(present)})")
    if not prepared.eval_prompts:
        raise QtuneError(
            "evaluation needs held-out prompts with reference answers: give the recipe a validation split of alpaca, chat or prompt/completion data"
        )
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
        try:  # float32, one block at a time: its head's inputs are what is kept (metrics.ReferenceOutputs)
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
            result = EvalResult.failed(name, step, exc)
        else:
            result.size_bytes = artifact.size_bytes
            result.bits_per_weight = round(8 * (artifact.weight_bytes or artifact.size_bytes) / n_params, 3)
            result.runtime = artifact.runtime
            result.eval_seconds = round(time.perf_counter() - started, 1)
            log.info(
                "%-24s %s %5.1f%% (%d/%d), perplexity %s, KL vs merged %s (p99 %s, answers %s), |Δp| p99 %s (%.0f s)",
                name,
                cfg.scorer,
                100 * result.task_metric,
                result.correct,
                result.total,
                _fmt(result.perplexity, ".3f"),
                _fmt(result.kl_vs_merged, ".4f"),
                _fmt(result.vs_merged("p99_kl"), ".4f"),
                _fmt(result.vs_merged("mean_kl", "answers"), ".4f"),
                _fmt(result.vs_merged("p99_abs_delta_p"), ".4f"),
                result.eval_seconds,
            )
            del artifact
        result.write(run_dir)
        results[name] = result
    return results


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _score(name: str, artifact: Artifact, reference, tokenizer, prepared: qdata.PreparedData, prompts: list[dict], cfg, scorer) -> EvalResult:
    model = artifact.model
    task = task_accuracy(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, scorer)
    versus_merged = divergence_from(reference, model) if reference is not None and name != "merged" else None
    worst = versus_merged.worst_row() if versus_merged else None
    return EvalResult(
        artifact=name,
        metric=cfg.scorer,
        task_metric=task.accuracy,
        correct=task.correct,
        total=task.total,
        perplexity=(versus_merged.perplexity if versus_merged else perplexity(model, prepared.validation, tokenizer.pad_token_id))
        if prepared.validation
        else None,
        kl_vs_merged=versus_merged.mean_kl if versus_merged else None,
        top1_vs_merged=versus_merged.top1_agreement if versus_merged else None,
        tail_vs_merged={k: v.as_dict() for k, v in versus_merged.tails.items()} if versus_merged else {},
        kl_by_category_vs_merged=versus_merged.kl_by_group(prepared.validation_categories) if versus_merged else {},
        worst_prompt_vs_merged=_describe_row(worst, prepared, tokenizer) if worst else None,
        by_category=task.by_category,
        by_length=task.by_length,
        generation_tokens_per_second=task.tokens_per_second,
        samples=task.samples,
    )


def _describe_row(worst: tuple[int, float], prepared: qdata.PreparedData, tokenizer) -> dict:
    """A held-out row named by its text: the end of its prompt and the start of its answer."""
    index, kl = worst
    row = prepared.validation[index]
    ids, labels = row["input_ids"], row["labels"]
    # where the answer starts: the first label after unlabelled prompt tokens (none when the prompt is trained on too)
    first = next((i for i in range(1, len(ids)) if labels[i] != qdata.IGNORE_INDEX and labels[i - 1] == qdata.IGNORE_INDEX), 0)
    return {
        "row": index,
        "mean_kl": kl,
        "category": prepared.validation_categories[index] if index < len(prepared.validation_categories) else None,
        "prompt": tokenizer.decode(ids[:first], skip_special_tokens=True)[-200:],
        "answer": tokenizer.decode(ids[first:], skip_special_tokens=True)[:200],
    }
