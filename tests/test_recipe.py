"""The recipe: strict schema, YAML line numbers, overrides, cross-field rules, resolved dump, and `qtune validate`."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qtune.cli import main
from qtune.errors import QtuneError
from qtune.recipe import (
    DataSection,
    Recipe,
    RecipeError,
    apply_overrides,
    dump_recipe,
    load_recipe,
    parse_override,
    parse_recipe,
)
from support import REPO

QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def line_of(text: str, needle: str) -> int:
    """1-based line of the only line of ``text`` containing ``needle`` (so tests never hard-code line numbers)."""
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def problems_of(excinfo) -> dict[str, object]:
    """The problems of a RecipeError keyed by their dotted path."""
    return {".".join(str(p) for p in problem.path): problem for problem in excinfo.value.problems}


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    """A small valid alpaca JSONL next to where tmp_recipe writes recipes."""
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"instruction": "say hi", "output": "hi"}\n', encoding="utf-8")
    return path


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def restore_qtune_logger():
    """qtune.cli.main reconfigures the 'qtune' logger (handler on the captured stderr, no propagation); undo it."""
    logger = logging.getLogger("qtune")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


MINIMAL = """\
data:
  train: data/train.jsonl
training:
  optimizer: adamw_torch
quantization:
  load_in_4bit: false
tracking:
  mode: offline
"""


# ---------------------------------------------------------------- the quickstart recipe


def test_quickstart_recipe_validates(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    loaded = load_recipe(QUICKSTART)
    recipe = loaded.recipe
    raw = yaml.safe_load(QUICKSTART.read_text())
    assert recipe.training.learning_rate == pytest.approx(raw["training"]["learning_rate"])
    assert recipe.training.max_steps == raw["training"]["max_steps"]
    assert recipe.data.max_length == raw["data"]["max_length"]
    assert [s.path for s in recipe.data.train] == [raw["data"]["train"]]
    assert [s.path for s in recipe.data.validation] == [raw["data"]["validation"]]
    assert loaded.base_dir == QUICKSTART.parent
    assert loaded.output_dir == (QUICKSTART.parent / raw["output"]["dir"]).resolve()
    for source in [*recipe.data.train, *recipe.data.validation]:
        assert loaded.path(source.path).is_file()


def test_defaults_are_used_for_missing_sections(tmp_recipe, data_file):
    recipe = load_recipe(tmp_recipe(MINIMAL)).recipe
    assert recipe.lora == Recipe().lora
    assert recipe.data.format == "alpaca" and recipe.data.max_length == DataSection().max_length


# ---------------------------------------------------------------- unknown keys, types, ranges


def test_unknown_key_names_nearest_valid_key_and_line(tmp_recipe, data_file):
    text = MINIMAL.replace("training:\n", "training:\n  max_steps: 3\n  learning_rat: 1.0e-4\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problems = problems_of(excinfo)
    assert list(problems) == ["training.learning_rat"]
    problem = problems["training.learning_rat"]
    assert problem.line == line_of(text, "learning_rat")
    assert "did you mean 'learning_rate'" in problem.message
    message = str(excinfo.value)
    assert f"training.learning_rat (line {problem.line})" in message
    assert "1 problem(s)" in message


def test_unknown_section_names_nearest_section(tmp_recipe, data_file):
    text = MINIMAL + "trainin:\n  epochs: 2\n"
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problem = problems_of(excinfo)["trainin"]
    assert problem.line == line_of(text, "trainin:")
    assert "did you mean 'training'" in problem.message


def test_unknown_key_without_close_match_lists_valid_keys(tmp_recipe, data_file):
    text = MINIMAL.replace("tracking:\n", "tracking:\n  zzzzzz: 1\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problem = problems_of(excinfo)["tracking.zzzzzz"]
    assert "did you mean" not in problem.message
    for key in ("backend", "project", "mode"):
        assert key in problem.message
    assert problem.line == line_of(text, "zzzzzz")


def test_unknown_key_inside_a_data_source_item(tmp_recipe, data_file):
    text = MINIMAL.replace("  train: data/train.jsonl\n", "  train:\n    - pathh: data/train.jsonl\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problem = problems_of(excinfo)["data.train.0.pathh"]
    assert "did you mean 'path'" in problem.message
    assert problem.line == line_of(text, "pathh")


def test_unknown_key_inside_nested_fields_section(tmp_recipe, data_file):
    text = MINIMAL.replace("data:\n", "data:\n  fields:\n    instructoin: question\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problem = problems_of(excinfo)["data.fields.instructoin"]
    assert "did you mean 'instruction'" in problem.message
    assert problem.line == line_of(text, "instructoin")


def test_wrong_type_reports_key_path_line_and_value(tmp_recipe, data_file):
    text = MINIMAL.replace("training:\n", "training:\n  learning_rate: fast\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problem = problems_of(excinfo)["training.learning_rate"]
    assert problem.line == line_of(text, "learning_rate")
    assert "valid number" in problem.message and "'fast'" in problem.message


@pytest.mark.parametrize(
    ("section", "key", "value", "words"),
    [
        ("lora", "r", "0", "greater than or equal to 1"),
        ("training", "learning_rate", "2.0", "less than or equal to 1"),
        ("data", "validation_fraction", "1.0", "less than 1"),
        ("data", "max_length", "4", "greater than or equal to 8"),
        ("lora", "dropout", "-0.1", "greater than or equal to 0"),
    ],
)
def test_out_of_range_value_reports_path_and_line(tmp_recipe, data_file, section, key, value, words):
    if f"{section}:\n" in MINIMAL:
        text = MINIMAL.replace(f"{section}:\n", f"{section}:\n  {key}: {value}\n")
    else:
        text = MINIMAL + f"{section}:\n  {key}: {value}\n"
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problem = problems_of(excinfo)[f"{section}.{key}"]
    assert words in problem.message
    assert problem.line == line_of(text, f"  {key}: {value}")


def test_bad_literal_choice_is_reported(tmp_recipe, data_file):
    text = MINIMAL.replace("training:\n", "training:\n  scheduler: cosinus\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problem = problems_of(excinfo)["training.scheduler"]
    assert "'cosine'" in problem.message and "'cosinus'" in problem.message
    assert problem.line == line_of(text, "cosinus")


def test_wrong_type_for_union_field_reports_the_key_path(tmp_recipe, data_file):
    text = MINIMAL + "lora:\n  target_modules: 5\n"
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    assert {p.path for p in excinfo.value.problems} == {("lora", "target_modules")}
    assert all(p.line == line_of(text, "target_modules") for p in excinfo.value.problems)


def test_empty_target_modules_list_rejected(tmp_recipe, data_file):
    text = MINIMAL + "lora:\n  target_modules: []\n"
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problem = problems_of(excinfo)["lora.target_modules"]
    assert "at least one module" in problem.message
    assert problem.line == line_of(text, "target_modules")


def test_every_schema_problem_is_reported_at_once(tmp_recipe, data_file):
    text = MINIMAL.replace("training:\n", "training:\n  epochs: 0\n  learning_rat: 1\n") + "lora:\n  r: many\n"
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problems = problems_of(excinfo)
    assert set(problems) == {"training.epochs", "training.learning_rat", "lora.r"}
    assert "3 problem(s)" in str(excinfo.value)
    assert [problems[k].line for k in ("training.epochs", "training.learning_rat", "lora.r")] == [
        line_of(text, "epochs"),
        line_of(text, "learning_rat"),
        line_of(text, "r: many"),
    ]


# ---------------------------------------------------------------- YAML problems


def test_duplicate_key_rejected_with_both_lines(tmp_recipe, data_file):
    text = MINIMAL.replace("training:\n", "training:\n  max_steps: 5\n  warmup_steps: 1\n  max_steps: 7\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    message = str(excinfo.value)
    lines = [i for i, line in enumerate(text.splitlines(), start=1) if "max_steps" in line]
    assert "duplicate key 'max_steps'" in message
    assert f"(line {lines[1]})" in message
    assert f"first at line {lines[0]}" in message


def test_duplicate_top_level_section_rejected(tmp_recipe, data_file):
    text = MINIMAL + "training:\n  max_steps: 3\n"
    with pytest.raises(RecipeError, match=r"duplicate key 'training' \(first at line 3\)"):
        load_recipe(tmp_recipe(text))


def test_invalid_yaml_reports_its_line(tmp_recipe):
    text = "model:\n  base: smollm2-135m-instruct\ntraining:\n\tepochs: 1\n"
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    message = str(excinfo.value)
    assert "invalid YAML" in message
    assert f"(line {line_of(text, 'epochs')})" in message


def test_unclosed_flow_sequence_is_invalid_yaml(tmp_recipe):
    with pytest.raises(RecipeError, match="invalid YAML \\(line \\d+\\)"):
        load_recipe(tmp_recipe("lora:\n  target_modules: [q_proj, v_proj\n"))


def test_yaml_anchors_and_aliases_are_allowed(tmp_recipe, data_file):
    text = MINIMAL.replace("  train: data/train.jsonl\n", "  train: &src data/train.jsonl\n  validation: *src\n")
    recipe = load_recipe(tmp_recipe(text)).recipe
    assert recipe.data.validation[0].path == recipe.data.train[0].path == "data/train.jsonl"


def test_yaml_merge_keys_work_like_safe_load(tmp_recipe, data_file):
    text = MINIMAL.replace(
        "  train: data/train.jsonl\n",
        "  train:\n    - &src {path: data/train.jsonl, split: train}\n  validation:\n    - <<: *src\n      split: test\n",
    )
    assert yaml.safe_load(text)["data"]["validation"] == [{"path": "data/train.jsonl", "split": "test"}]
    recipe = load_recipe(tmp_recipe(text)).recipe
    assert (recipe.data.validation[0].path, recipe.data.validation[0].split) == ("data/train.jsonl", "test")


def test_recipe_must_be_a_mapping(tmp_recipe):
    with pytest.raises(RecipeError, match="a recipe is a mapping of sections, got list"):
        load_recipe(tmp_recipe("- model\n- data\n"))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(QtuneError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- overrides


def test_override_scalar_value_is_typed_by_schema(tmp_recipe, data_file):
    text = MINIMAL.replace("training:\n", "training:\n  learning_rate: 5.0e-4\n")
    path = tmp_recipe(text)
    assert load_recipe(path).recipe.training.learning_rate == pytest.approx(5e-4)
    recipe = load_recipe(path, ["training.learning_rate=1e-4"]).recipe
    assert isinstance(recipe.training.learning_rate, float)
    assert recipe.training.learning_rate == pytest.approx(1e-4)


def test_overrides_create_missing_sections_and_nested_keys(tmp_recipe, data_file):
    recipe = load_recipe(
        tmp_recipe(MINIMAL),
        ["data.fields.output=answer", "lora.target_modules=[q_proj, v_proj]", "evaluation.max_samples=3", "training.max_steps=9", "training.max_steps=11"],
    ).recipe
    assert recipe.data.fields.output == "answer"
    assert recipe.data.fields.instruction == "instruction"  # siblings keep their defaults
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.evaluation.max_samples == 3
    assert recipe.training.max_steps == 11  # the last override wins
    assert recipe.training.optimizer == "adamw_torch"  # the file's other values survive


def test_override_with_empty_value_means_null(tmp_recipe, data_file):
    path = tmp_recipe(MINIMAL.replace("training:\n", "training:\n  max_steps: 4\n"))
    assert load_recipe(path, ["training.max_steps="]).recipe.training.max_steps is None


def test_override_of_unknown_key_is_validated_like_the_file(tmp_recipe, data_file):
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(MINIMAL), ["training.learning_rat=1e-4"])
    assert "did you mean 'learning_rate'" in problems_of(excinfo)["training.learning_rat"].message


def test_override_out_of_range_is_rejected(tmp_recipe, data_file):
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(MINIMAL), ["lora.r=0"])
    assert "greater than or equal to 1" in problems_of(excinfo)["lora.r"].message


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("training.learning_rate", "expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
        ("  =3", "expected KEY=VALUE"),
        ("lora.target_modules=[q_proj", "not valid YAML"),
        ("training.max_steps.inner=3", "training.max_steps is not a section"),
    ],
)
def test_bad_override_syntax(tmp_recipe, data_file, override, words):
    path = tmp_recipe(MINIMAL.replace("training:\n", "training:\n  max_steps: 4\n"))
    with pytest.raises(QtuneError, match=words) as excinfo:
        load_recipe(path, [override])
    assert not isinstance(excinfo.value, RecipeError)  # raised before validation, as a plain usage error
    assert repr(override) in str(excinfo.value)


def test_parse_and_apply_override_units():
    keys, value = parse_override(" data.fields.output = answer text ")
    assert keys == ["data", "fields", "output"] and value == "answer text"
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=x=y") == (["a"], "x=y")  # only the first '=' splits
    raw = {"training": None}
    assert apply_overrides(raw, ["training.seed=3", "new.deep.key=true"]) == {"training": {"seed": 3}, "new": {"deep": {"key": True}}}


# ---------------------------------------------------------------- cross-field rules


def test_validation_sources_and_fraction_both_given(tmp_recipe, data_file):
    text = MINIMAL.replace("data:\n", "data:\n  validation: data/train.jsonl\n  validation_fraction: 0.1\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problem = problems_of(excinfo)["data.validation_fraction"]
    assert "not both" in problem.message
    assert problem.line == line_of(text, "validation_fraction")
    # each of them alone is fine
    load_recipe(tmp_recipe(text.replace("  validation_fraction: 0.1\n", "")))
    load_recipe(tmp_recipe(text.replace("  validation: data/train.jsonl\n", "")))


def test_float16_compute_needs_cuda(tmp_recipe, data_file, monkeypatch):
    import torch

    text = MINIMAL.replace("quantization:\n", "quantization:\n  compute_dtype: float16\n")
    path = tmp_recipe(text)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    problem = problems_of(excinfo)["quantization.compute_dtype"]
    assert "CUDA" in problem.message
    assert problem.line == line_of(text, "compute_dtype")
    load_recipe(path, ["quantization.compute_dtype=bfloat16"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_recipe(path).recipe.quantization.compute_dtype == "float16"


def test_online_tracking_needs_wandb_key(tmp_recipe, data_file, monkeypatch):
    text = MINIMAL.replace("mode: offline", "mode: online")
    path = tmp_recipe(text)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    problem = problems_of(excinfo)["tracking.mode"]
    assert "WANDB_API_KEY" in problem.message
    assert problem.line == line_of(text, "mode: online")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert load_recipe(path).recipe.tracking.mode == "online"


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"])
def test_bitsandbytes_optimizers_need_bitsandbytes(tmp_recipe, data_file, no_bitsandbytes, optimizer):
    text = MINIMAL.replace("optimizer: adamw_torch", f"optimizer: {optimizer}")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problems = problems_of(excinfo)
    assert set(problems) == {"training.optimizer"}
    assert "bitsandbytes" in problems["training.optimizer"].message
    assert "adamw_torch" in problems["training.optimizer"].message
    assert problems["training.optimizer"].line == line_of(text, "optimizer:")


def test_4bit_loading_needs_bitsandbytes(tmp_recipe, data_file, no_bitsandbytes):
    text = MINIMAL.replace("load_in_4bit: false", "load_in_4bit: true")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problem = problems_of(excinfo)["quantization.load_in_4bit"]
    assert "bitsandbytes" in problem.message and problem.line == line_of(text, "load_in_4bit")


def test_plain_optimizer_without_bitsandbytes_is_fine(tmp_recipe, data_file, no_bitsandbytes):
    assert load_recipe(tmp_recipe(MINIMAL)).recipe.training.optimizer == "adamw_torch"


def test_paged_optimizer_accepted_when_bitsandbytes_is_found(tmp_recipe, data_file, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object())
    text = MINIMAL.replace("optimizer: adamw_torch", "optimizer: paged_adamw_8bit")
    assert load_recipe(tmp_recipe(text)).recipe.training.optimizer == "paged_adamw_8bit"


def test_missing_dataset_file_reports_resolved_path(tmp_recipe, tmp_path):
    text = MINIMAL.replace("data/train.jsonl", "data/../data/missing.jsonl")
    path = tmp_recipe(text, name="recipes/r.yaml")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    problem = problems_of(excinfo)["data.train.0.path"]
    expected = (tmp_path / "recipes" / "data" / "missing.jsonl").resolve()
    assert f"dataset file not found: {expected}" in problem.message
    assert problem.line == line_of(text, "train:")


def test_missing_dataset_file_in_mapping_source_reports_its_line(tmp_recipe, tmp_path, data_file):
    text = MINIMAL.replace("  train: data/train.jsonl\n", "  train:\n    - path: data/train.jsonl\n    - path: ~/../nowhere/x.jsonl\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    problems = problems_of(excinfo)
    assert set(problems) == {"data.train.1.path"}
    assert problems["data.train.1.path"].line == line_of(text, "nowhere")
    assert str(Path(os.path.expanduser("~/../nowhere/x.jsonl"))) in problems["data.train.1.path"].message


def test_unsupported_file_suffix(tmp_recipe, tmp_path):
    (tmp_path / "train.txt").write_text("hello\n")
    for spelled in ("  train:\n    - path: train.txt\n", "  train: ./train.txt\n"):
        text = MINIMAL.replace("  train: data/train.jsonl\n", spelled)
        with pytest.raises(RecipeError) as excinfo:
            load_recipe(tmp_recipe(text))
        message = problems_of(excinfo)["data.train.0.path"].message
        assert "unsupported file type '.txt'" in message
        assert ".jsonl" in message and ".parquet" in message


def test_data_source_needs_exactly_one_of_path_and_hub(tmp_recipe, data_file):
    for spelled in ("  train:\n    - path: data/train.jsonl\n      hub: org/name\n", "  train:\n    - split: train\n"):
        text = MINIMAL.replace("  train: data/train.jsonl\n", spelled)
        with pytest.raises(RecipeError) as excinfo:
            load_recipe(tmp_recipe(text))
        assert "exactly one of 'path' or 'hub'" in problems_of(excinfo)["data.train.0"].message


def test_no_training_data(tmp_recipe):
    text = MINIMAL.replace("  train: data/train.jsonl\n", "  max_length: 64\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    assert "no training data" in problems_of(excinfo)["data.train"].message


def test_rule_problems_are_all_reported_together(tmp_recipe, monkeypatch, no_cuda):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    text = MINIMAL.replace("data/train.jsonl", "data/missing.jsonl").replace("mode: offline", "mode: online")
    text = text.replace("quantization:\n", "quantization:\n  compute_dtype: float16\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tmp_recipe(text))
    assert set(problems_of(excinfo)) == {"data.train.0.path", "tracking.mode", "quantization.compute_dtype"}


# ---------------------------------------------------------------- data source shorthand


def test_shorthand_sources(tmp_recipe, tmp_path, data_file, monkeypatch):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")  # what datasets.save_to_disk leaves in a dataset folder
    text = MINIMAL.replace(
        "  train: data/train.jsonl\n",
        "  train:\n    - data/train.jsonl\n    - HuggingFaceH4/no_robots\n    - ./saved\n"
        "    - {hub: tatsu-lab/alpaca, split: 'train[:10]'}\n  validation: org/eval-set\n",
    )
    sources = load_recipe(tmp_recipe(text)).recipe.data
    train = [(s.path, s.hub, s.split) for s in sources.train]
    assert train == [
        ("data/train.jsonl", None, "train"),
        (None, "HuggingFaceH4/no_robots", "train"),
        ("./saved", None, "train"),
        (None, "tatsu-lab/alpaca", "train[:10]"),
    ]
    assert [(s.path, s.hub) for s in sources.validation] == [(None, "org/eval-set")]
    assert sources.train[1].describe() == "HuggingFaceH4/no_robots[train]"
    assert sources.train[0].describe() == "data/train.jsonl"


@pytest.mark.parametrize("item", ["x.csv", "x.parquet", "x.json", "/abs/x", "~/x", "../x"])
def test_shorthand_path_spellings(item):
    section = DataSection(train=item)
    assert section.train[0].path == item and section.train[0].hub is None


def test_null_sources_mean_none():
    assert DataSection(train=None, validation=None).train == []


def test_shorthand_folder_relative_to_recipe_is_a_path_whatever_the_cwd(tmp_recipe, tmp_path, monkeypatch):
    (tmp_path / "datasets" / "mine").mkdir(parents=True)
    (tmp_path / "datasets" / "mine" / "dataset_dict.json").write_text("{}")  # a saved DatasetDict
    text = MINIMAL.replace("  train: data/train.jsonl\n", "  train: datasets/mine\n")
    path = tmp_recipe(text)
    monkeypatch.chdir(tmp_path)
    assert load_recipe(path).recipe.data.train[0].path == "datasets/mine"  # works from the recipe's folder
    monkeypatch.chdir(tmp_path.parent)
    assert load_recipe(path).recipe.data.train[0].path == "datasets/mine"  # ...and should from anywhere


# ---------------------------------------------------------------- resolved recipe


def test_with_absolute_paths(tmp_recipe, tmp_path, data_file):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "models" / "mine" / "config.json").write_text('{"model_type": "llama"}')
    text = (
        MINIMAL.replace(
            "  train: data/train.jsonl\n",
            "  train: [data/train.jsonl, org/name]\n  validation: ./data/train.jsonl\n",
        )
        + "output:\n  dir: ../runs/x\nmodel:\n  base: models/mine\n"
    )
    loaded = load_recipe(tmp_recipe(text, name="sub/../recipe.yaml"))
    resolved = loaded.with_absolute_paths()
    assert resolved.data.train[0].path == str(data_file.resolve())
    assert resolved.data.train[1].hub == "org/name" and resolved.data.train[1].path is None
    assert resolved.data.validation[0].path == str(data_file.resolve())
    assert resolved.output.dir == str((tmp_path.parent / "runs" / "x").resolve())
    assert resolved.model.base == str((tmp_path / "models" / "mine").resolve())
    # the loaded recipe itself is untouched
    assert loaded.recipe.data.train[0].path == "data/train.jsonl"
    assert loaded.recipe.output.dir == "../runs/x" and loaded.recipe.model.base == "models/mine"


def test_with_absolute_paths_keeps_builtin_and_hub_model_names(tmp_recipe, data_file):
    for base in ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M"):
        loaded = load_recipe(tmp_recipe(MINIMAL + f"model:\n  base: {base}\n"))
        assert loaded.with_absolute_paths().model.base == base


@pytest.fixture
def no_secrets(monkeypatch):
    from qtune.secrets import SECRET_ENV_VARS

    for name in SECRET_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def test_dump_round_trips_through_parse(no_secrets):
    loaded = load_recipe(QUICKSTART, ["training.learning_rate=1e-5", "lora.target_modules=[q_proj, o_proj]"])
    text = dump_recipe(loaded.recipe)
    assert parse_recipe(text, "dumped.yaml", loaded.base_dir).recipe == loaded.recipe
    # every field is spelled out: the dump needs no defaults to mean the same
    assert set(yaml.safe_load(text)) == set(Recipe.model_fields)


def test_dump_of_absolute_recipe_means_the_same_from_elsewhere(no_secrets, tmp_path):
    absolute = load_recipe(QUICKSTART).with_absolute_paths()
    again = parse_recipe(dump_recipe(absolute), "run/recipe.yaml", tmp_path).recipe
    assert again == absolute
    assert Path(again.data.train[0].path).is_file()


def test_dump_redacts_secrets_from_the_environment(tmp_recipe, data_file, monkeypatch):
    wandb_key, hf_token = "wandb0123456789abcdef", "hf_ABCDEFGHIJKLMNOP"
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    monkeypatch.setenv("HF_TOKEN", hf_token)
    text = MINIMAL.replace("mode: offline", f"mode: online\n  run_name: run-{wandb_key}\n  project: p-{hf_token}-x")
    loaded = load_recipe(tmp_recipe(text))
    assert loaded.recipe.tracking.run_name == f"run-{wandb_key}"  # the recipe itself holds the values
    dumped = dump_recipe(loaded.recipe)
    assert wandb_key not in dumped and hf_token not in dumped
    tracking = yaml.safe_load(dumped)["tracking"]
    assert tracking["run_name"] == "run-***"
    assert tracking["project"] == "p-***-x"


def test_dump_with_a_whole_value_redacted_is_still_valid_yaml(tmp_recipe, data_file, monkeypatch):
    hf_token = "hf_ABCDEFGHIJKLMNOP"
    monkeypatch.setenv("HF_TOKEN", hf_token)
    loaded = load_recipe(tmp_recipe(MINIMAL.replace("mode: offline", f"mode: offline\n  tags: [{hf_token}, keep]")))
    dumped = dump_recipe(loaded.recipe)
    assert hf_token not in dumped
    assert yaml.safe_load(dumped)["tracking"]["tags"] == ["***", "keep"]
    parse_recipe(dumped, "run/recipe.yaml", loaded.base_dir)


def test_short_env_values_are_not_treated_as_secrets(tmp_recipe, data_file, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "keep")  # shorter than a real token: masking it would mangle ordinary words
    text = MINIMAL.replace("mode: offline", "mode: offline\n  tags: [keep]")
    assert yaml.safe_load(dump_recipe(load_recipe(tmp_recipe(text)).recipe))["tracking"]["tags"] == ["keep"]


# ---------------------------------------------------------------- qtune validate


def test_cli_validate_bad_recipe_exits_2_with_clear_error(tmp_recipe, data_file, capsys, restore_qtune_logger):
    text = MINIMAL.replace("training:\n", "training:\n  learning_rat: 1.0e-4\n")
    path = tmp_recipe(text)
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("qtune: error: ")
    assert f"recipe {path} has 1 problem(s)" in err
    assert f"training.learning_rat (line {line_of(text, 'learning_rat')})" in err and "did you mean 'learning_rate'" in err
    assert "Traceback" not in err
    assert "is valid" not in out


def test_cli_validate_good_recipe_exits_0(tmp_recipe, data_file, capsys, restore_qtune_logger):
    path = tmp_recipe(MINIMAL)
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == f"qtune: {path} is valid"
    assert "qtune: memory plan" in out and "does not fit" not in out
    assert "error" not in err
    assert main(["validate", str(path), "--no-memory-plan"]) == 0
    assert capsys.readouterr().out.strip() == f"qtune: {path} is valid"


def test_cli_validate_print_and_set(tmp_recipe, data_file, capsys, restore_qtune_logger):
    path = tmp_recipe(MINIMAL.replace("training:\n", "training:\n  learning_rate: 7\n"))
    assert main(["validate", str(path)]) == 2
    assert "training.learning_rate" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "training.learning_rate=3e-4", "--set", "lora.r=4", "--print"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out.rsplit("qtune:", 1)[0])
    assert printed["training"]["learning_rate"] == pytest.approx(3e-4)
    assert printed["lora"]["r"] == 4
    assert out.rstrip().endswith("is valid")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "training.learning_rate"], "expected KEY=VALUE"),
        (["--set", "training.optimizer.x=1"], "not a section"),
    ],
)
def test_cli_validate_bad_override(tmp_recipe, data_file, capsys, restore_qtune_logger, args, words):
    assert main(["validate", str(tmp_recipe(MINIMAL)), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qtune: error: --set ") and words in err


def test_cli_validate_missing_recipe(tmp_path, capsys, restore_qtune_logger):
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"qtune: error: recipe not found: {tmp_path / 'absent.yaml'}")


def test_console_script_reports_without_traceback(tmp_recipe, data_file):
    script = Path(sys.executable).parent / "qtune"
    if not script.exists():
        pytest.skip("the qtune console script is not installed next to this interpreter")
    text = MINIMAL.replace("data:\n", "data:\n  max_lenght: 64\n")
    path = tmp_recipe(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(script), "validate", str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "qtune: error:" in result.stderr
    assert f"data.max_lenght (line {line_of(text, 'max_lenght')})" in result.stderr and "did you mean 'max_length'" in result.stderr
