"""Shared fixtures for the qtune test suite."""

from __future__ import annotations

import os
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from oracles import oracle_skip_failure
from support import full_run_recipe, qtune_cli, write_recipe

# Fixtures that run an oracle: every test that uses one is marked `oracle` (tests/oracles.py). full_run
# scores its GGUF files in llama.cpp when it is installed and in transformers otherwise, so without the mark
# a test on it would pass in the quick lane having checked the fallback only.
ORACLE_FIXTURES = {"full_run", "ggml", "oracle_results"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if ORACLE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.oracle)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A skip for a missing oracle fails the test when the test is not marked `oracle` (it would be skipped
    in CI's quick lane without anyone noticing), or when QTUNE_REQUIRE_ORACLES=1 (CI, after building them)."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return
    why = oracle_skip_failure(str(report.longrepr[2]), item.get_closest_marker("oracle") is not None, os.environ.get("QTUNE_REQUIRE_ORACLES") == "1")
    if why is None:
        return
    report.outcome = "failed"
    report.longrepr = f"{why}: {report.longrepr[2]}"


@pytest.fixture(scope="session")
def full_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted ``qtune run`` of a tiny model with every export (see support.full_run_recipe)."""
    work = tmp_path_factory.mktemp("report")
    recipe = full_run_recipe(work, work / "run")
    result = qtune_cli("run", str(write_recipe(work / "recipe.yaml", recipe)), timeout=1500)
    return work / "run", result


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The built-in SmolLM2-135M-Instruct tokenizer (converted once from its GGUF, then cached under ~/.cache/qtune)."""
    from qtune.models import builtin_checkpoint, load_tokenizer

    return load_tokenizer(builtin_checkpoint("smollm2-135m-instruct"))


@pytest.fixture
def tmp_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Write a YAML string (dedented) to a file under tmp_path and return its path.

    ``tmp_recipe(text)`` writes ``recipe.yaml``; ``tmp_recipe(text, name="other.yaml")`` picks the name
    (sub-folders are created as needed).
    """

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write
