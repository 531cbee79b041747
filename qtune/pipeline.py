"""``qtune run``: the stages chained (train, merge, eval, export, report).

Each stage writes its output atomically and is skipped when that output already exists, so an
interrupted ``qtune run`` picks up where it stopped.
"""

from __future__ import annotations

import logging

from qtune import rundir
from qtune.evaluate import EvalResult, evaluate_run, scored
from qtune.exports import export, report_path
from qtune.merge import merge_run
from qtune.recipe import LoadedRecipe
from qtune.report import Report, write_report
from qtune.training import train

log = logging.getLogger(__name__)

ARTIFACTS = ("base", "adapter", "merged")


def run(loaded: LoadedRecipe, overwrite: bool = False) -> Report:
    """train → merge → eval (base, adapter, merged) → exports → eval (exports) → report.

    Each stage is skipped when its output is already complete, so an interrupted run picks up where it
    stopped. The report says which artifacts pass the recipe's gates.
    """
    run_dir = loaded.output_dir
    resume = not overwrite and rundir.read_run_file(run_dir) is not None
    train(loaded, resume=resume, overwrite=overwrite)
    if not rundir.is_merged(run_dir):
        merge_run(run_dir)
    pending = [a for a in ARTIFACTS if a not in scored(run_dir)]
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
            EvalResult.failed(name, "export", exc).write(run_dir)
    pending = [n for n in export_names if n not in scored(run_dir) and (run_dir / rundir.EXPORTS_DIR / n).exists()]
    if pending:
        evaluate_run(run_dir, pending)
    return write_report(run_dir)
