"""The whole input surface, fuzzed: recipes, --set overrides, data files and the CLI's arguments.

Every generated input is wrong on purpose. Each must end with exit code 2 and one message that names
the key, file, line or value at fault: never a traceback (exit 70), and never a silent acceptance.
The CLI runs in-process (``qtune.cli.main``), so hundreds of cases take seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import string
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from qtune import cli
from qtune.recipe import ExportTarget, Recipe
from support import REPO

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
BASE_RECIPE = yaml.safe_load(QUICKSTART.read_text())
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Fields whose every string is meaningful (names, prompts, folders to create) or that name data
# sources (fuzzed below with files): any value of the right type is a valid recipe.
FREE_TEXT = {
    ("model", "base"),
    ("model", "revision"),
    ("data", "train"),
    ("data", "validation"),
    ("data", "system_prompt"),
    ("tracking", "project"),
    ("tracking", "entity"),
    ("tracking", "run_name"),
    ("output", "dir"),
    ("export", 0, "output"),
    ("export", 0, "calibration"),
    ("evaluation", "scorer"),
}


def run_cli(*argv: str) -> tuple[int, str]:
    """``qtune ARGV`` in this process: its exit code and everything it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code
    return code, out.getvalue() + err.getvalue()


def assert_refused(code: int, output: str, *names: str) -> None:
    assert "Traceback" not in output and "failed unexpectedly" not in output, output
    assert code == 2, f"exit {code}, expected a refusal (2):\n{output}"
    assert any(name in output for name in names), f"the message names none of {names}:\n{output}"


def write_recipe(folder: Path, raw: Any, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False) if not isinstance(raw, str) else raw, encoding="utf-8")
    return path


def with_value(path: tuple, value: Any) -> dict:
    raw = json.loads(json.dumps(BASE_RECIPE))
    # the recipe's data paths are relative to recipes/; the fuzzed copy lives elsewhere
    raw["data"] = {**raw["data"], "train": str(REPO / "recipes" / raw["data"]["train"]), "validation": str(REPO / "recipes" / raw["data"]["validation"])}
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value
    return raw


def test_the_unchanged_quickstart_is_valid(tmp_path: Path):
    code, output = run_cli("validate", str(write_recipe(tmp_path, with_value(("lora", "r"), 16))))
    assert code == 0, output


# ---------------------------------------------------------------- every field, every wrong kind of value


def _fields(model: type[BaseModel], prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """(key path, annotation) of every leaf field of the recipe schema; export entries as export.0."""
    found = []
    for name, info in model.model_fields.items():
        path, annotation = (*prefix, name), info.annotation
        inner = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if path == ("export",):
            found += _fields(ExportTarget, ("export", 0))
        elif inner and typing.get_origin(annotation) is not list:
            found += _fields(inner[0], path)
        else:
            found.append((path, info))
    return found


def _bounds(info) -> dict[str, float]:
    return {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if getattr(m, k, None) is not None}


def _invalid_values(info) -> st.SearchStrategy:
    """Values pydantic plus qtune's own rules must refuse for this field."""
    annotation = info.annotation
    args = typing.get_args(annotation)
    kinds = {a for a in (annotation, *args) if a in (bool, int, float, str)}
    literals = [v for a in (annotation, *args) if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
    wrong: list[st.SearchStrategy] = [
        st.lists(st.integers(), min_size=1, max_size=3),
        st.dictionaries(st.sampled_from("abc"), st.integers(), min_size=1, max_size=2),
    ]
    words = st.text(string.ascii_letters, min_size=1, max_size=12)
    if kinds == {bool}:
        wrong += [st.integers(), st.floats(allow_nan=False), words.filter(lambda w: w.lower() not in ("true", "false"))]
    elif kinds & {int, float}:
        wrong += [st.booleans(), words.filter(lambda w: w.lower() not in ("inf", "infinity", "nan"))]
        if float not in kinds:
            wrong.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)))
        bounds = _bounds(info)
        if "ge" in bounds:
            wrong.append(st.integers(max_value=int(bounds["ge"]) - 1))
        if "gt" in bounds:
            wrong.append(st.just(bounds["gt"]))
        if "le" in bounds:
            wrong.append(st.just(bounds["le"] * 2 + 1))
        if "lt" in bounds:
            wrong.append(st.just(bounds["lt"]))
    if literals:
        choices = {str(v).lower() for v in literals}
        wrong.append(words.filter(lambda w: w.lower() not in choices and w.upper() not in choices))
        if str not in kinds:
            wrong.append(st.integers())
    elif kinds == {str}:
        wrong += [st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans()]
    return st.one_of(wrong)


FIELDS = [
    (path, info)
    for path, info in _fields(Recipe)
    if path not in FREE_TEXT and path != ("data", "fields", "category") and typing.get_origin(info.annotation) is not list
]


@settings(FUZZ, max_examples=160)
@given(data=st.data())
def test_every_field_refuses_wrong_values(tmp_path_factory, data):
    path, info = data.draw(st.sampled_from(FIELDS), label="field")
    if path[:2] in (("data", "fields"),):  # any column name is valid; a non-string is not
        value = data.draw(st.one_of(st.integers(), st.lists(st.integers(), min_size=1)), label="value")
    else:
        value = data.draw(_invalid_values(info), label="value")
    folder = tmp_path_factory.mktemp("field")
    code, output = run_cli("validate", str(write_recipe(folder, with_value(path, value))))
    assert_refused(code, output, ".".join(map(str, path)))


SECTIONS = [
    (),
    ("model",),
    ("quantization",),
    ("lora",),
    ("data",),
    ("data", "fields"),
    ("training",),
    ("tracking",),
    ("output",),
    ("export", 0),
    ("evaluation",),
    ("evaluation", "gates"),
]


@FUZZ
@given(section=st.sampled_from(SECTIONS), key=st.text(string.ascii_lowercase + "_", min_size=1, max_size=14))
def test_unknown_keys_are_named_in_every_section(tmp_path_factory, section, key):
    raw = with_value(("lora", "r"), 16)
    node = raw
    for part in section:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    if key in node or key in _valid_keys(section):
        return
    node[key] = 1
    code, output = run_cli("validate", str(write_recipe(tmp_path_factory.mktemp("key"), raw)))
    assert_refused(code, output, f"unknown key '{key}'")


def _valid_keys(section: tuple) -> set[str]:
    model: Any = Recipe
    for part in section:
        if isinstance(part, int):
            model = ExportTarget
            continue
        annotation = model.model_fields[part].annotation
        model = next((a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)), ExportTarget)
    return set(model.model_fields)


# ---------------------------------------------------------------- malformed documents


def _alias_bomb(levels: int = 9) -> str:
    text = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    for i in range(1, levels + 1):
        text += f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]\n"
    return text


MALFORMED = {
    "unclosed flow": ("lora: {r: 16\n", "invalid YAML"),
    "bad indentation": ("lora:\n  r: 16\n alpha: 3\n", "invalid YAML"),
    "tab indentation": ("lora:\n\tr: 16\n", "invalid YAML"),
    "duplicate key": ("lora:\n  r: 16\n  r: 8\n", "duplicate key"),
    "python tag": ("lora: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
    "custom tag": ("lora: !secret {r: 1}\n", "invalid YAML"),
    "a list": ("- model\n- lora\n", "mapping of sections"),
    "a scalar": ("just words\n", "mapping of sections"),
    "a number": ("42\n", "mapping of sections"),
    "two documents": ("lora: {r: 8}\n---\nlora: {r: 4}\n", "invalid YAML"),
    "alias bomb": (_alias_bomb(), "aliases"),
    "deep nesting": ("a: " + "[" * 50_000 + "]" * 50_000 + "\n", "nests deeper"),
    "deep mapping": ("".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v: 1\n", "nests deeper"),
    "recursive alias": ("a: &a [*a]\n", "recursive"),
    "merge of a scalar": ("lora:\n  <<: 5\n", "invalid YAML"),
    "section is a list": ("lora: [1, 2]\n", "lora"),
    "section is null": ("training:\n", "training"),
    "export is a mapping": ("export: {format: gguf}\n", "export"),
    "export entry is a string": ("export: [gguf]\n", "export.0"),
    "empty file": ("", "data.train"),
    "only a comment": ("# nothing here\n", "data.train"),
    "huge file": ("# " + "x" * 1_100_000 + "\n", "a recipe is a few kB"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_recipes_are_refused(tmp_path: Path, case: str):
    text, named = MALFORMED[case]
    code, output = run_cli("validate", str(write_recipe(tmp_path, text)))
    assert_refused(code, output, named)


@pytest.mark.parametrize("blob", [b"lora:\n  r: \xff\xfe\n", b"\x00\x01\x02binary\x00", b"model:\n  base: caf\xc3"])
def test_invalid_utf8_recipes_name_the_line(tmp_path: Path, blob: bytes):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(blob)
    code, output = run_cli("validate", str(path))
    assert_refused(code, output, "UTF-8", "invalid YAML", "line")


def test_an_alias_bomb_is_refused_fast_in_bounded_memory(tmp_path: Path):
    """Expanded, 12 levels of 9 aliases are 9**12 values; refused, the bomb costs no more memory than
    validating the quickstart (the process peak is mostly torch's import)."""
    probe = (
        "import resource, sys, time\nfrom qtune.cli import main\nt = time.perf_counter()\ncode = main(['validate', sys.argv[1]])\n"
        "print(code, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )

    def validate(path: Path) -> tuple[int, float, int, str]:
        result = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120)
        code, seconds, peak_mb = result.stdout.split()[-3:]
        return int(code), float(seconds), int(peak_mb), result.stderr

    code, seconds, peak_mb, stderr = validate(write_recipe(tmp_path, _alias_bomb(12)))
    assert code == 2 and "aliases" in stderr, stderr
    baseline_code, _, baseline_mb, baseline_stderr = validate(QUICKSTART)
    assert baseline_code == 0, baseline_stderr
    assert seconds < 5 and peak_mb < baseline_mb + 200, (seconds, peak_mb, baseline_mb)


# ---------------------------------------------------------------- --set


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_overrides_refuse_nonsense(tmp_path_factory, data):
    kind = data.draw(st.sampled_from(["no equals", "empty key", "unknown path", "bad value", "bad yaml", "into a scalar", "list index"]))
    word = data.draw(st.text(string.ascii_lowercase, min_size=2, max_size=10))
    if kind == "no equals":
        text, named = f"lora.{word}", "expected KEY=VALUE"
    elif kind == "empty key":
        text, named = f"={word}", "expected KEY=VALUE"
    elif kind == "unknown path":
        section = data.draw(st.sampled_from(["lora", "training", "data", "evaluation.gates", "export.0"]))
        if word in _valid_keys(tuple(int(p) if p.isdigit() else p for p in section.split("."))):
            return
        text, named = f"{section}.{word}=1", f"unknown key '{word}'"
    elif kind == "bad value":
        path, info = data.draw(st.sampled_from(FIELDS))
        if path[:2] == ("data", "fields"):
            return
        value = data.draw(_invalid_values(info))
        text, named = (
            f"{'.'.join(map(str, path))}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}",
            ".".join(map(str, path)),
        )
    elif kind == "bad yaml":
        text, named = f"lora.r=[{word}", "not valid YAML"
    elif kind == "into a scalar":
        text, named = f"lora.r.{word}=1", "lora.r is not a section"
    else:
        text, named = f"export.{data.draw(st.integers(min_value=5, max_value=99))}.bits=4", "address an entry by its position"
    recipe = write_recipe(tmp_path_factory.mktemp("set"), with_value(("lora", "r"), 16))
    code, output = run_cli("validate", str(recipe), "--set", text)
    assert_refused(code, output, named)


@pytest.mark.parametrize("word", ["list", "dict", "str", "none"])
def test_an_unknown_key_named_like_a_type_is_named(tmp_path: Path, word: str):
    """Found by the property test above: pydantic's union tags ('list', 'str') were dropped from error
    locations, and with them an unknown key that the user happened to name so."""
    recipe = write_recipe(tmp_path, with_value(("lora", "r"), 16))
    code, output = run_cli("validate", str(recipe), "--set", f"lora.{word}=1")
    assert_refused(code, output, f"unknown key '{word}'")
    assert f"lora.{word}:" in output


def test_overrides_reach_into_the_export_list(tmp_path: Path):
    recipe = write_recipe(tmp_path, with_value(("lora", "r"), 16))
    code, output = run_cli("validate", str(recipe), "--set", "export.2.group_size=64", "--set", "export.4.format=gguf", "--print")
    assert code == 0, output
    resolved = yaml.safe_load(output[: output.index("qtune:")])
    assert resolved["export"][2]["group_size"] == 64 and resolved["export"][4]["format"] == "gguf" and len(resolved["export"]) == 5


# ---------------------------------------------------------------- data files

ALPACA = {"instruction": "Extract the person as JSON.", "input": "Ana Lima is 30 and lives in Porto.", "output": '{"name": "Ana Lima"}'}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
NOT_TEXT = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(st.sampled_from("xy"), st.integers(), min_size=1, max_size=2),
)


def _validate_with_data(folder: Path, train: Path, fmt: str = "alpaca") -> tuple[int, str]:
    recipe = write_recipe(folder, with_value(("data", "format"), fmt))
    return run_cli("validate", str(recipe), "--set", f"data.train={train}")


def _write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:  # a saved dataset folder
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@settings(FUZZ, max_examples=40)
@given(
    container=st.sampled_from([".jsonl", ".json", ".parquet", ""]),
    field=st.sampled_from(["instruction", "input", "output"]),
    value=NOT_TEXT,
    row=st.integers(min_value=0, max_value=4),
)
def test_alpaca_fields_that_are_not_text_are_refused_in_every_container(tmp_path_factory, container, field, value, row):
    folder = tmp_path_factory.mktemp("data")
    rows = [dict(ALPACA) for _ in range(5)]
    rows[row][field] = value
    if container in (".parquet", "") and (not isinstance(value, (int, float, bool)) or isinstance(value, int) and not -(2**63) <= value < 2**63):
        return  # arrow needs one type per column (mixed rows are covered by jsonl/json) and 64-bit integers
    if container in (".parquet", ""):
        rows = [{**r, field: value} for r in rows]  # the whole column has the wrong type
    path = _write_rows(folder / f"train{container or '_saved'}", rows)
    code, output = _validate_with_data(folder, path)
    assert_refused(code, output, f"'{field}' must be text", "record")
    assert path.name in output


@settings(FUZZ, max_examples=30)
@given(
    problem=st.sampled_from(["role", "content", "no assistant", "not a list", "no role", "empty"]),
    value=NOT_TEXT,
    word=st.text(string.ascii_lowercase, min_size=1, max_size=8),
)
def test_chat_rows_with_bad_roles_or_no_assistant_turn_are_refused(tmp_path_factory, problem, value, word):
    folder = tmp_path_factory.mktemp("chat")
    messages: Any = [dict(m) for m in CHAT["messages"]]
    if problem == "role":
        if word in ("system", "user", "assistant", "tool"):
            return
        messages[0]["role"] = word
        named = f"role '{word}'"
    elif problem == "content":
        messages[1]["content"] = value
        named = "content must be text"
    elif problem == "no assistant":
        messages = [messages[0]]
        named = "no assistant message"
    elif problem == "not a list":
        messages = value if not isinstance(value, list) else word
        named = "must be a list of {role, content}"
    elif problem == "no role":
        del messages[0]["role"]
        named = "must be a list of {role, content}"
    else:
        messages = []
        named = "no assistant message"
    path = _write_rows(folder / "chat.jsonl", [CHAT, {"messages": messages}])
    code, output = _validate_with_data(folder, path, "chat")
    assert_refused(code, output, named)
    assert "chat.jsonl line 2" in output


def _truncated(path: Path, keep: float = 0.55) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


DAMAGED = {
    "jsonl cut mid-line": (lambda f: _truncated(_write_rows(f / "t.jsonl", [ALPACA] * 5)), "malformed JSON"),
    "jsonl binary": (lambda f: _bytes(f / "t.jsonl", os.urandom(2048)), "t.jsonl"),
    "jsonl not objects": (lambda f: _text(f / "t.jsonl", '{"instruction": "a", "output": "b"}\n[1, 2]\n'), "line 2"),
    "jsonl missing fields": (lambda f: _text(f / "t.jsonl", '{"instruction": "a"}\n'), "lacks 'output'"),
    "jsonl empty": (lambda f: _text(f / "t.jsonl", "\n\n"), "empty"),
    "jsonl invalid utf-8": (lambda f: _bytes(f / "t.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n'), "t.jsonl"),
    "json cut": (lambda f: _truncated(_write_rows(f / "t.json", [ALPACA] * 5)), "malformed JSON"),
    "json not a list": (lambda f: _text(f / "t.json", '{"rows": 3}'), "JSON list of objects"),
    "json list of numbers": (lambda f: _text(f / "t.json", "[1, 2, 3]"), "JSON list of objects"),
    "csv missing column": (lambda f: _text(f / "t.csv", "instruction,input\na,b\n"), "lacks 'output'"),
    "csv extra cells": (lambda f: _text(f / "t.csv", "instruction,output\na,b\nc,d,e,f\n"), "line 3"),
    "csv binary": (lambda f: _bytes(f / "t.csv", b"\x00\xff\xfe" * 200), "t.csv"),
    "csv empty": (lambda f: _text(f / "t.csv", ""), "empty"),
    "parquet cut": (lambda f: _truncated(_write_rows(f / "t.parquet", [ALPACA] * 50)), "parquet"),
    "parquet binary": (lambda f: _bytes(f / "t.parquet", os.urandom(4096)), "parquet"),
    "parquet missing column": (lambda f: _write_rows(f / "t.parquet", [{"instruction": "a"}] * 3), "lacks 'output'"),
    "saved dataset without files": (lambda f: _mkdir(f / "saved"), "not a dataset saved with datasets.save_to_disk"),
    "saved dataset cut": (lambda f: _cut_arrow(_write_rows(f / "saved", [ALPACA] * 200)), "saved"),
    "saved dataset wrong split": (lambda f: _dict_dataset(f / "saved"), "no split"),
    "a folder named .jsonl": (lambda f: _mkdir(f / "t.jsonl"), "t.jsonl"),
    "unsupported suffix": (lambda f: _text(f / "t.tsv", "a\tb\n"), "t.tsv"),
}


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bytes(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _cut_arrow(folder: Path) -> Path:
    for arrow in folder.glob("*.arrow"):
        _truncated(arrow, 0.5)
    return folder


def _dict_dataset(folder: Path) -> Path:
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list([ALPACA])}).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_data_files_are_refused_by_name(tmp_path: Path, case: str):
    make, named = DAMAGED[case]
    path = make(tmp_path)
    code, output = _validate_with_data(tmp_path, path)
    assert_refused(code, output, named)
    assert path.name in output or named in output


@pytest.mark.parametrize("spec", ["data/quickstart_train.txt", "/", "''", "data/quickstart_trian.jsonl", "./missing.jsonl"])
def test_data_sources_that_do_not_exist_are_refused_at_validation(tmp_path: Path, spec: str):
    recipe = REPO / "recipes" / "quickstart.yaml"
    code, output = run_cli("validate", str(recipe), "--set", f"data.train={spec}")
    assert_refused(code, output, "data.train.0")


def test_a_calibration_file_that_does_not_exist_is_refused_at_validation():
    code, output = run_cli("validate", str(QUICKSTART), "--set", "export.3.calibration=/no/such/calib.txt")
    assert_refused(code, output, "export.3.calibration", "/no/such/calib.txt")


# ---------------------------------------------------------------- CLI arguments


def _paths(folder: Path) -> dict[str, Path]:
    """Things a user may pass where a recipe or a run directory belongs. 'half run' is a run directory
    whose run.json is damaged, and 'half run recipe' a recipe whose output.dir is that directory."""
    (folder / "a_file.yaml").write_text("just: text\n")
    (folder / "binary.bin").write_bytes(os.urandom(512))
    (folder / "empty_folder").mkdir()
    bad_run = folder / "bad_run"
    bad_run.mkdir()
    (bad_run / "recipe.resolved.yaml").write_text("lora: [\n")
    half_run = folder / "half_run"
    shutil.copytree(bad_run, half_run)
    (half_run / "recipe.resolved.yaml").write_text(QUICKSTART.read_text().replace("data/", str(REPO / "recipes" / "data") + "/"))
    (half_run / "run.json").write_text("{not json")
    half_run_recipe = write_recipe(folder, with_value(("output", "dir"), str(half_run)), "half_run_recipe.yaml")
    return {
        "missing": folder / "nope",
        "file": folder / "a_file.yaml",
        "binary": folder / "binary.bin",
        "folder": folder / "empty_folder",
        "bad run": bad_run,
        "half run": half_run,
        "half run recipe": half_run_recipe,
    }


COMMANDS = {
    "validate": [],
    "train": [],
    "run": [],
    "merge": [],
    "eval": [],
    "report": ["--no-tracking"],
    "export": ["--format", "gguf"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", ["missing", "file", "binary", "folder", "bad run", "half run"])
def test_every_command_refuses_paths_that_are_not_what_it_takes(tmp_path: Path, command: str, kind: str):
    paths = _paths(tmp_path)
    path = paths[kind]
    if kind == "half run" and command in ("validate", "eval"):
        return  # its recipe is valid, and scoring the base model of a run that has only a recipe is legitimate
    if kind == "half run" and command in ("train", "run"):
        path = paths["half run recipe"]  # a valid recipe whose output directory holds a damaged run
    code, output = run_cli(command, str(path), *COMMANDS[command])
    assert_refused(code, output, str(path), path.name, "line", "run.json", "recipe")


EXPORT_ARGUMENTS = [
    (["--format", "gptq", "--bits", "5"], "GPTQ checkpoints hold 2, 3, 4 or 8 bits"),
    (["--format", "awq", "--bits", "3"], "AWQ's GEMM layout holds 4 bits only"),
    (["--format", "gptq", "--group-size", "7"], "group_size"),
    (["--format", "gptq", "--samples", "0"], "--samples"),
    (["--format", "gptq", "--seq-len", "4"], "--seq-len"),
    (["--format", "gptq", "--damp", "2"], "--damp"),
    (["--format", "gguf", "--quant", "Q9_K"], "unknown GGUF type"),
    (["--format", "gguf-lora", "--quant", "Q4_K_M"], "F32, F16 or BF16"),
    (["--format", "awq", "--act-order"], "act-order is a GPTQ option"),
    (["--format", "zip"], "invalid choice"),
    (["--format", "gptq", "--bits", "four"], "invalid int value"),
    ([], "--format"),
]


@pytest.mark.parametrize(("arguments", "named"), EXPORT_ARGUMENTS, ids=[" ".join(a) or "no format" for a, _ in EXPORT_ARGUMENTS])
def test_export_refuses_bad_arguments(tmp_path: Path, arguments: list[str], named: str):
    code, output = run_cli("export", str(tmp_path), *arguments)
    assert_refused(code, output, named)


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["eval"], ["run"], ["train", "--resume"], ["--set", "a=1"]], ids=lambda a: " ".join(a) or "nothing")
def test_malformed_command_lines_get_usage_not_a_traceback(argv: list[str]):
    code, output = run_cli(*argv)
    assert_refused(code, output, "usage:")


def test_an_unreadable_recipe_is_named():
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="qtune-unreadable-"))  # world-traversable, unlike pytest's tmp_path
    try:
        folder.chmod(0o755)
        recipe = write_recipe(folder, with_value(("lora", "r"), 16))
        recipe.chmod(0)
        command = [sys.executable, "-m", "qtune", "validate", str(recipe)]
        if os.geteuid() == 0:  # root reads anything: ask as nobody
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv, so no user lacks read access")
            command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(folder)})
        assert_refused(result.returncode, result.stdout + result.stderr, "Permission denied")
        assert str(recipe) in result.stderr
    finally:
        shutil.rmtree(folder, ignore_errors=True)
