"""Weights & Biases tracking. Offline unless an API key is present, so no run ever needs the network."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from qtune.recipe import Recipe, TrackingSection
from qtune.secrets import redact

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
    run = wandb.init(
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
    log.info("W&B run %s (%s) in %s", run.id, mode, run_dir / "wandb")
    return run


def _redacted_config(recipe: Recipe) -> dict:
    import json

    return json.loads(redact(json.dumps(recipe.model_dump(mode="json"))))


def finish_run(run) -> None:
    if run is not None:
        run.finish()
