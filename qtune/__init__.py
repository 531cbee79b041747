"""qtune: QLoRA fine-tuning on quantized bases, exported to GGUF, GPTQ and AWQ.

The stages of a run, each a function that returns a typed result::

    import qtune

    loaded = qtune.load_recipe("recipes/quickstart.yaml")
    trained = qtune.train(loaded)                      # TrainResult
    merged = qtune.merge_run(trained.run_dir)          # MergeResult
    scores = qtune.evaluate_run(trained.run_dir)       # {artifact: EvalResult}
    exported = qtune.export(trained.run_dir, qtune.ExportTarget(format="gguf", quant="Q4_K_M"))
    report = qtune.write_report(trained.run_dir)       # Report
    report = qtune.run(loaded)                         # all of the above, resuming where it stopped

Names are imported on first use, so ``import qtune`` (and the CLI) starts without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_HOMES = {
    "load_recipe": "qtune.recipe",
    "LoadedRecipe": "qtune.recipe",
    "Recipe": "qtune.recipe",
    "ExportTarget": "qtune.recipe",
    "train": "qtune.training",
    "TrainResult": "qtune.training",
    "merge_run": "qtune.merge",
    "MergeResult": "qtune.merge",
    "MergeReport": "qtune.merge",
    "evaluate_run": "qtune.evaluate",
    "EvalResult": "qtune.evaluate",
    "export": "qtune.exports",
    "ExportResult": "qtune.exports",
    "write_report": "qtune.report",
    "Report": "qtune.report",
    "run": "qtune.pipeline",
    "recipe_plan": "qtune.memory_plan",
    "MemoryPlan": "qtune.memory_plan",
    "QtuneError": "qtune.errors",
}

__all__ = [
    "EvalResult",
    "ExportResult",
    "ExportTarget",
    "LoadedRecipe",
    "MemoryPlan",
    "MergeReport",
    "MergeResult",
    "QtuneError",
    "Recipe",
    "Report",
    "TrainResult",
    "evaluate_run",
    "export",
    "load_recipe",
    "merge_run",
    "recipe_plan",
    "run",
    "train",
    "write_report",
]

if TYPE_CHECKING:
    from qtune.errors import QtuneError
    from qtune.evaluate import EvalResult, evaluate_run
    from qtune.exports import ExportResult, export
    from qtune.memory_plan import MemoryPlan, recipe_plan
    from qtune.merge import MergeReport, MergeResult, merge_run
    from qtune.pipeline import run
    from qtune.recipe import ExportTarget, LoadedRecipe, Recipe, load_recipe
    from qtune.report import Report, write_report
    from qtune.training import TrainResult, train


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'qtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
