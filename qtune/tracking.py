"""Weights & Biases tracking. Offline unless an API key is present, so no run ever needs the network."""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from pathlib import Path

from qtune import rundir
from qtune.recipe import Recipe, TrackingSection
from qtune.secrets import redact_data

log = logging.getLogger(__name__)


def resolve_mode(tracking: TrackingSection) -> str:
    if tracking.backend == "none":
        return "disabled"
    if tracking.mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return tracking.mode


def start_run(recipe: Recipe, run_dir: Path, job_type: str = "train"):
    """Start (or rejoin) this run directory's W&B run; returns None when tracking is disabled."""
    mode = resolve_mode(recipe.tracking)
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    config = _redacted_config(recipe)
    # After a crash the dead process's W&B service can hold the run id for a few seconds.
    for _attempt in range(20):
        try:
            run = _init(wandb, recipe, run_dir, run_id, mode, job_type, config)
            break
        except Exception as exc:  # wandb reports this as a generic server-response error
            if "in use" not in str(exc):
                raise
            time.sleep(1.5)
    else:
        run_id = uuid.uuid4().hex[:8]
        log.warning("the previous W&B run is still held by a dead process; logging to a new run %s", run_id)
        id_file.write_text(run_id)
        run = _init(wandb, recipe, run_dir, run_id, mode, job_type, config)
    log.info("W&B run %s (%s) in %s", run.id, mode, run_dir / "wandb")
    return run


def _init(wandb, recipe: Recipe, run_dir: Path, run_id: str, mode: str, job_type: str, config: dict):
    return wandb.init(
        project=recipe.tracking.project,
        entity=recipe.tracking.entity,
        name=recipe.tracking.run_name or run_dir.name,
        tags=recipe.tracking.tags or None,
        mode=mode,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        job_type=job_type,
        config=config,
        settings=wandb.Settings(console="off", x_disable_stats=True, save_code=False),
    )


def _redacted_config(recipe: Recipe) -> dict:
    return redact_data(recipe.model_dump(mode="json"))


def finish_run(run) -> None:
    if run is not None:
        run.finish()


def log_report(report) -> None:
    """The report's table as a W&B Table, its plots as images, its numbers in the run summary, and every
    deliverable as a W&B Artifact (a reference to the local files unless ``tracking.upload_artifacts``)."""
    run = start_run(report.recipe, report.run_dir, job_type="report")
    if run is None:
        return
    import wandb

    try:
        columns, body = report.table()
        images = {f"report/{name.removesuffix('.png')}": wandb.Image(str(report.run_dir / "report" / name)) for name in rundir.REPORT_PLOTS}
        tail_columns, tail_body = report.tail_table()
        tables = {"report/artifacts": wandb.Table(columns=columns, data=body), "report/tail": wandb.Table(columns=tail_columns, data=tail_body)}
        run.log({**tables, **images}, step=report.last_step + 1)
        for row in report.rows:
            prefix = f"report/{row.artifact}"
            run.summary[f"{prefix}/gate"] = row.verdict
            for key in (
                "task_metric",
                "perplexity",
                "kl_vs_merged",
                "top1_vs_merged",
                "size_bytes",
                "bits_per_weight",
                "generation_tokens_per_second",
            ):
                if row.get(key) is not None:
                    run.summary[f"{prefix}/{key}"] = row.get(key)
            for tokens, tail in (row.get("tail_vs_merged") or {}).items():
                for key, value in tail.items():
                    run.summary[f"{prefix}/tail/{tokens}/{key}"] = value
        run.summary["report/passed"] = report.passed
        upload = report.recipe.tracking.upload_artifacts
        for row in report.rows:
            path = _artifact_path(report.run_dir, row.artifact)
            if path is None or not row.ok:
                continue
            artifact = wandb.Artifact(
                _artifact_name(run.name or report.run_dir.name, row.artifact),
                type="model",
                metadata={k: row.get(k) for k in ("task_metric", "perplexity", "kl_vs_merged", "size_bytes", "runtime")},
            )
            if upload:
                artifact.add_dir(str(path)) if path.is_dir() else artifact.add_file(str(path))
            else:
                artifact.add_reference(path.resolve().as_uri(), checksum=True)
            run.log_artifact(artifact, aliases=["latest", row.verdict.lower()])
    finally:
        finish_run(run)


def _artifact_path(run_dir: Path, name: str) -> Path | None:
    if name == "base":
        return None
    path = run_dir / (rundir.ADAPTER_DIR if name == "adapter" else rundir.MERGED_DIR if name == "merged" else f"exports/{name}")
    return path if path.exists() else None


def _artifact_name(run_name: str, artifact: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{run_name}-{artifact}")
