"""Shared fixtures for the qtune test suite."""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from support import full_run_recipe, qtune_cli, write_recipe


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
