"""The quickstart end to end, as a user runs it: one command from the recipe to scored artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import REPO, qtune_cli


@pytest.mark.slow
def test_quickstart_meets_its_accuracy_targets(tmp_path: Path):
    run_dir = tmp_path / "quickstart"
    result = qtune_cli("run", str(REPO / "recipes" / "quickstart.yaml"), "--set", f"output.dir={run_dir}", timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    scores = {name: json.loads((run_dir / "eval" / f"{name}.json").read_text()) for name in ("base", "adapter", "merged")}
    assert scores["base"]["exact_match"] <= 0.20
    assert scores["adapter"]["exact_match"] >= 0.80
    assert scores["merged"]["exact_match"] >= 0.80
    merge_report = json.loads((run_dir / "merge_report.json").read_text())
    assert merge_report["kl"][merge_report["chosen"]] <= 1e-3
    assert "| merged |" in result.stdout


def test_stage_commands_explain_a_missing_run(tmp_path: Path):
    for command in ("merge", "eval"):
        result = qtune_cli(command, str(tmp_path))
        assert result.returncode == 2
        assert "not a qtune run directory" in result.stderr and "Traceback" not in result.stderr
