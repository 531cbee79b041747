"""The run directory: what it holds, whether it belongs to this recipe, and which checkpoint is the latest."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from qtune.errors import QtuneError
from qtune.paths import remove_stale_staging, write_text_atomic
from qtune.recipe import LoadedRecipe, Recipe, dump_recipe, load_recipe

RUN_FILE = "run.json"
RECIPE_FILE = "recipe.resolved.yaml"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
MERGE_REPORT = "merge_report.json"
EXPORTS_DIR = "exports"
EVAL_DIR = "eval"
REPORT_DIR = "report"
REPORT_PLOTS = ("quality_vs_size.png", "loss.png")  # under REPORT_DIR
LOGS_DIR = "logs"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# The sections that decide what a training run computes; tracking, outputs and evaluation do not.
FINGERPRINT_SECTIONS = ("model", "quantization", "lora", "data", "training")


def fingerprint(recipe: Recipe) -> str:
    payload = {name: getattr(recipe, name).model_dump(mode="json") for name in FINGERPRINT_SECTIONS}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def read_run_file(run_dir: Path) -> dict | None:
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QtuneError(f"{path} is unreadable ({exc}); is this a qtune run directory?") from None


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Checkpoints only appear under this name once fully written."""
    found = []
    for child in run_dir.glob("checkpoint-*"):
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


STAGED_FOLDERS = ("", EXPORTS_DIR, EVAL_DIR, REPORT_DIR, LOGS_DIR)


def remove_staging(run_dir: Path) -> None:
    """Leftovers of writes that never finished (a killed process, a full disk) are never mistaken for
    results: staged files and folders of writers that are no longer running are deleted."""
    for folder in STAGED_FOLDERS:
        remove_stale_staging(run_dir / folder)


def load_run_recipe(run_dir: Path) -> LoadedRecipe:
    """The recipe a run was trained with, as saved in its directory."""
    path = run_dir / RECIPE_FILE
    if not path.is_file():
        raise QtuneError(f"{run_dir} is not a qtune run directory (no {RECIPE_FILE}); run qtune train first")
    return load_recipe(path)


def claim(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Make ``run_dir`` this recipe's, refusing to mix two different runs in one directory."""
    existing = read_run_file(run_dir) if run_dir.exists() else None
    has_content = run_dir.exists() and any(run_dir.iterdir())
    if existing is None and has_content and not overwrite:
        raise QtuneError(f"output directory {run_dir} is not empty and holds no qtune run; choose another output.dir or pass --overwrite")
    if existing is not None and not overwrite:
        if existing.get("fingerprint") != fingerprint(recipe):
            raise QtuneError(
                f"output directory {run_dir} holds a different run (its recipe differs in model, quantization, lora, "
                "data or training); choose another output.dir, or pass --overwrite to replace it"
            )
        if not resume and latest_checkpoint(run_dir) is not None and not (run_dir / ADAPTER_DIR).is_dir():
            raise QtuneError(
                f"output directory {run_dir} holds an interrupted run of this recipe; pass --resume to continue it "
                "from its last complete checkpoint, or --overwrite to start again"
            )
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_staging(run_dir)
    write_text_atomic(run_dir / RECIPE_FILE, dump_recipe(recipe))
    info = existing if existing is not None and not overwrite else {}
    info.update({"fingerprint": fingerprint(recipe), "format": 1})
    write_text_atomic(run_dir / RUN_FILE, json.dumps(info, indent=2))


def is_trained(run_dir: Path) -> bool:
    """Training finished: the adapter is saved and run.json says so (it is written last)."""
    return (run_dir / ADAPTER_DIR).is_dir() and bool((read_run_file(run_dir) or {}).get("trained"))


def is_merged(run_dir: Path) -> bool:
    """The merge finished: the merged checkpoint and, written after it, its report."""
    return (run_dir / MERGED_DIR).is_dir() and (run_dir / MERGE_REPORT).is_file()


def update_run_file(run_dir: Path, **fields) -> None:
    info = read_run_file(run_dir) or {}
    info.update(fields)
    write_text_atomic(run_dir / RUN_FILE, json.dumps(info, indent=2))
