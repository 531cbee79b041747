"""Where each file qtune writes runs (qtune.runtimes), and the refusal of a setting a required runtime refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtune.errors import QtuneError
from qtune.recipe import ExportTarget, load_recipe
from qtune.runtimes import MERGED, RUNTIMES, refusals, runtime_support
from support import tiny_model_dir, tiny_recipe, write_recipe
from test_fuzz_inputs import assert_refused, run_cli


def _loads(fmt: str, **settings: object) -> dict[str, bool]:
    return {row.runtime: row.loads for row in runtime_support(fmt, **settings)}  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", [MERGED, "gguf", "gguf-lora", "gptq", "awq", "compressed-tensors"])
def test_every_file_has_a_row_per_runtime_and_every_refusal_a_reason(fmt):
    rows = runtime_support(fmt)
    assert tuple(row.runtime for row in rows) == RUNTIMES
    assert all(row.note for row in rows if not row.loads)
    assert any(row.loads for row in rows)


def test_what_each_format_runs_in():
    assert _loads("gguf") == {"transformers": True, "GPTQModel": False, "vLLM": False, "llama.cpp": True, "Ollama": True}
    assert _loads("awq") == {"transformers": True, "GPTQModel": True, "vLLM": True, "llama.cpp": False, "Ollama": False}
    assert _loads(MERGED)["vLLM"] and not _loads(MERGED)["llama.cpp"]
    assert _loads("gptq", bits=4, sym=True)["vLLM"] and _loads("gptq", bits=8, sym=True)["vLLM"]
    for scheme in ("W4A16", "W8A8", "FP8"):
        assert _loads("compressed-tensors", scheme=scheme) == {"transformers": True, "GPTQModel": False, "vLLM": True, "llama.cpp": False, "Ollama": False}
    vllm = {scheme: next(r for r in runtime_support("compressed-tensors", scheme=scheme) if r.runtime == "vLLM") for scheme in ("W4A16", "W8A8", "FP8")}
    assert vllm["W4A16"].note == "" and "int8" in vllm["W8A8"].note and "sm89" in vllm["FP8"].note


@pytest.mark.parametrize("bits,sym", [(4, False), (8, False), (3, True), (2, True)])
def test_vllm_refuses_asymmetric_and_odd_width_gptq(bits, sym):
    (vllm,) = refusals("gptq", ["vllm"], bits=bits, sym=sym)
    assert vllm.runtime == "vLLM" and not vllm.loads
    assert ("AWQ" in vllm.note and "sym: true" in vllm.note) if not sym else f"not {bits}-bit" in vllm.note
    assert _loads("gptq", bits=bits, sym=sym)["GPTQModel"], "GPTQModel reads every width and both grids"


def test_a_required_runtime_that_refuses_the_settings_is_a_recipe_problem(tmp_path: Path):
    assert ExportTarget(format="gptq", sym=False).problems() == []  # no runtime required: written, and its report says where it runs
    assert ExportTarget(format="gptq", sym=True, runtimes=["vllm", "transformers"]).problems() == []
    problems = ExportTarget(format="gptq", sym=False, runtimes=["vLLM"]).problems()
    assert [key for key, _ in problems] == ["runtimes"] and "vLLM would refuse" in problems[0][1] and "AWQ" in problems[0][1]
    assert ExportTarget(format="gguf", runtimes=["ollama"]).runtimes == ["Ollama"]  # names are matched in any case

    recipe = tiny_recipe(tiny_model_dir(tmp_path / "base"), tmp_path / "run")
    recipe["export"] = [{"format": "gptq", "sym": False, "runtimes": ["vllm"]}]
    with pytest.raises(QtuneError, match=r"export\.0\.runtimes \(line \d+\): vLLM would refuse"):
        load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe))
    recipe["export"] = [{"format": "awq", "runtimes": ["tgi"]}]
    with pytest.raises(QtuneError, match="unknown runtime 'tgi'"):
        load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe))


def test_the_cli_refuses_an_export_its_required_runtime_would_refuse(tmp_path: Path):
    code, output = run_cli("export", str(tmp_path), "--format", "gptq", "--asym", "--runtime", "vllm")
    assert_refused(code, output, "vLLM would refuse")
    assert "AWQ" in output
    code, output = run_cli("export", str(tmp_path), "--format", "gguf", "--runtime", "tgi")
    assert_refused(code, output, "unknown runtime 'tgi'")
