"""Task scorers and how a recipe names them."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtune.recipe import RecipeError, load_recipe
from qtune.scorers import contains, exact_match, json_equal, normalized_match, resolve_scorer
from support import tiny_recipe, write_recipe


def test_builtin_scorers():
    assert exact_match(' {"a": 1}\n', '{"a": 1}') and not exact_match('{"a":1}', '{"a": 1}')
    assert json_equal('{"b": 2, "a": 1}', '{"a":1,"b":2}') and not json_equal('{"a": 1', '{"a": 1}')
    assert normalized_match("  Paris\tFrance ", "paris france") and not normalized_match("Paris", "Lyon")
    assert contains("The answer is 42.", "42") and not contains("4 2", "42")


def test_a_recipe_names_a_scorer_of_its_own(tmp_path: Path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text("def first_word(answer, reference):\n    return answer.split()[:1] == reference.split()[:1]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scorer = resolve_scorer("my_scorers:first_word")
    assert scorer("Paris is big", "Paris") and not scorer("Lyon", "Paris")
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_scorer("my_scorers:missing")


def test_an_unknown_scorer_is_refused_at_validation(tmp_path: Path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text('{"model_type": "llama"}')  # a base checkpoint folder, as validation requires
    recipe = tiny_recipe(tmp_path / "base", tmp_path / "run")
    recipe["evaluation"]["scorer"] = "exact"
    with pytest.raises(RecipeError, match="unknown scorer 'exact'.*exact_match, normalized_match, json_equal, contains"):
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    recipe["evaluation"]["scorer"] = "json_equal"
    recipe["evaluation"]["gates"] = {"max_kl_vs_merged": None, "min_task_ratio": 0.9}
    assert load_recipe(write_recipe(tmp_path / "r.yaml", recipe)).recipe.evaluation.gates.max_kl_vs_merged is None
