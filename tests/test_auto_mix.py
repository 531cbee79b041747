"""quant: auto (qtune.auto_mix) and per-tensor type overrides (tensor_types): the allocation, the recipe's
checks, an auto export that llama.cpp runs, and overrides byte-identical to llama-quantize's --tensor-type."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from gguf import GGMLQuantizationType as Q

from oracles import llama_quantize, needs_llama_cpp
from qtune.auto_mix import TensorCost, allocate, candidates, predicted_kl
from qtune.formats.gguf.mixes import choose_types, parse_tensor_types
from qtune.recipe import ExportTarget
from support import qtune_cli, tiny_model_dir, tiny_recipe, write_recipe


def _cost(name: str, category: str, errors: dict[Q, float], params: int = 256 * 256) -> TensorCost:
    from qtune.formats.gguf.layout import tensor_nbytes

    return TensorCost(name, category, {t: tensor_nbytes(t, (params // 256, 256)) for t in errors}, errors)


def test_allocation_spends_the_budget_where_the_predicted_loss_falls_most():
    sensitive = _cost("blk.0.ffn_down.weight", "ffn_down", {Q.Q2_K: 100.0, Q.Q4_K: 10.0, Q.Q8_0: 0.1})
    robust = _cost("blk.0.ffn_up.weight", "ffn_up", {Q.Q2_K: 1.0, Q.Q4_K: 0.2, Q.Q8_0: 0.01})
    costs, factors = [sensitive, robust], {"ffn_down": 1.0, "ffn_up": 1.0}
    cheapest = sum(min(c.nbytes.values()) for c in costs)
    assert allocate(costs, factors, cheapest) == {sensitive.name: Q.Q2_K, robust.name: Q.Q2_K}
    # room for one Q4_K: it goes to the tensor whose loss falls most per byte
    step = sensitive.nbytes[Q.Q4_K] - sensitive.nbytes[Q.Q2_K]
    assert allocate(costs, factors, cheapest + step) == {sensitive.name: Q.Q4_K, robust.name: Q.Q2_K}
    big = sum(max(c.nbytes.values()) for c in costs)
    chosen = allocate(costs, factors, big)
    assert chosen == {sensitive.name: Q.Q8_0, robust.name: Q.Q8_0}
    for budget in range(cheapest, big + 1, (big - cheapest) // 17):
        chosen = allocate(costs, factors, budget)
        assert sum(c.nbytes[chosen[c.name]] for c in costs) <= budget
    # a category whose KL does not move with its error is left at the cheapest type
    assert allocate(costs, {"ffn_down": 1.0, "ffn_up": 0.0}, big)[robust.name] == Q.Q2_K
    assert predicted_kl(costs, factors, {sensitive.name: Q.Q4_K, robust.name: Q.Q2_K}) == pytest.approx(11.0)
    with pytest.raises(ValueError, match="smallest mix"):
        allocate(costs, factors, cheapest - 1)


def test_candidates_fit_the_rows():
    assert Q.Q4_K in candidates(4096) and Q.IQ4_XS in candidates(256)
    assert Q.Q4_K not in candidates(576) and Q.IQ4_NL in candidates(576) and candidates(600) == ()


@pytest.mark.parametrize(
    "settings,problem",
    [
        ({"quant": "auto"}, "needs a budget"),
        ({"quant": "auto", "target_bpw": 4.5, "max_size": "1GB"}, "needs a budget"),
        ({"quant": "auto", "target_bpw": 4.5, "imatrix": False}, "needs imatrix: true"),
        ({"quant": "Q4_K_M", "target_bpw": 4.5}, "applies to quant: auto"),
    ],
)
def test_auto_recipe_problems(settings: dict, problem: str):
    target = ExportTarget(format="gguf", **settings)
    assert any(problem in message for _, message in target.problems()), target.problems()


def test_auto_names_and_budget():
    assert ExportTarget(format="gguf", quant="auto", target_bpw=4.5).default_name() == "model-auto-4.5bpw.gguf"
    assert ExportTarget(format="gguf", quant="AUTO", max_size="4.2GB").budget_bytes(10) == 4_200_000_000
    assert ExportTarget(format="gguf", quant="auto", target_bpw=4.0).budget_bytes(1000) == 500


def test_tensor_types_are_checked():
    from pydantic import ValidationError

    assert ExportTarget(format="gguf", tensor_types={"ffn_down": "q6_k"}).tensor_types == {"ffn_down": "Q6_K"}
    with pytest.raises(ValidationError, match="not a regular expression"):
        ExportTarget(format="gguf", tensor_types={"blk.(0": "Q8_0"})
    with pytest.raises(ValidationError, match="unknown type 'Q7_K'"):
        ExportTarget(format="gguf", tensor_types={"ffn_down": "Q7_K"})
    assert ExportTarget(format="gptq", tensor_types={"ffn_down": "Q8_0"}).problems() == [("tensor_types", "tensor_types applies to GGUF exports")]


def test_tensor_types_override_the_mix_as_llama_quantize_does():
    names = [("token_embd.weight", (32, 256))] + [(f"blk.{i}.{p}.weight", (256, 256)) for i in range(8) for p in ("attn_v", "ffn_down", "attn_q")]
    overrides = parse_tensor_types({r"blk\.0\.": "Q8_0", "ffn_down": "Q2_K"})
    types = choose_types("Q4_K_M", names, 8, tensor_types=overrides).types
    assert types["blk.0.attn_q.weight"] == Q.Q8_0 and types["blk.0.ffn_down.weight"] == Q.Q8_0  # first match wins
    assert all(types[f"blk.{i}.ffn_down.weight"] == Q.Q2_K for i in range(1, 8))
    # the overridden attn_v of layer 0 does not advance the attn_v counter: layer 1 is now the rule's first
    plain = choose_types("Q4_K_M", names, 8).types
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(1, 8)] == [plain[f"blk.{i}.attn_v.weight"] for i in range(7)]


def test_cli_refuses_a_bad_override_or_budget(tmp_path: Path):
    model = tiny_model_dir(tmp_path / "m", hidden=256)
    bad = qtune_cli("export", str(model), "--format", "gguf", "--tensor-type", "ffn_down")
    assert bad.returncode == 2 and "PATTERN=TYPE" in bad.stderr and "Traceback" not in bad.stderr
    bad = qtune_cli("export", str(model), "--format", "gguf", "--quant", "auto")
    assert bad.returncode == 2 and "needs a budget" in bad.stderr
    bad = qtune_cli("export", str(model), "--format", "gguf", "--quant", "auto", "--target-bpw", "5")
    assert bad.returncode == 2 and "calibration data" in bad.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from qtune.recipe import load_recipe
    from qtune.training import train

    work = tmp_path_factory.mktemp("auto")
    base = tiny_model_dir(work / "llama", hidden=256, layers=4)
    recipe = write_recipe(work / "recipe.yaml", tiny_recipe(base, work / "run", training={"max_steps": 2}))
    return train(load_recipe(recipe)).run_dir


def test_auto_export_fits_its_budget_and_reports_its_choice(run_dir: Path):
    result = qtune_cli(
        "export",
        str(run_dir),
        "--format",
        "gguf",
        "--quant",
        "auto",
        "--target-bpw",
        "5.5",
        "--samples",
        "8",
        "--seq-len",
        "64",
        "--tensor-type",
        "attn_k=Q8_0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    path = run_dir / "exports" / "model-auto-5.5bpw.gguf"
    report = json.loads((run_dir / "exports" / "model-auto-5.5bpw.gguf.report.json").read_text())
    auto = report["auto"]
    assert auto["bits_per_weight"] <= 5.5 and report["bits_per_weight"] == pytest.approx(auto["bits_per_weight"], abs=1e-4)
    assert auto["predicted_kl"] > 0 and auto["measured_kl_on_calibration"] > 0
    assert set(auto["kl_per_error_by_category"]) >= {"attn_q", "ffn_down", "token_embd"}
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {n: t for n, t in types.items() if n in auto["types"]} == auto["types"]
    assert all(types[f"blk.{i}.attn_k.weight"] == "Q8_0" for i in range(4)) and len(auto["fixed_by_tensor_types"]) == 4
    assert len({t for n, t in types.items() if n.endswith("weight") and "norm" not in n}) > 1, "one type for every tensor is not a mix"
    small = qtune_cli("export", str(run_dir), "--format", "gguf", "--quant", "auto", "--target-bpw", "1.6", "--samples", "8", "--seq-len", "64")
    assert small.returncode == 2 and "smallest mix" in small.stderr


@needs_llama_cpp
def test_auto_export_runs_in_llama_cpp(run_dir: Path):
    import llama_cpp

    path = run_dir / "exports" / "model-auto-5.5bpw.gguf"
    if not path.is_file():
        assert (
            qtune_cli("export", str(run_dir), "--format", "gguf", "--quant", "auto", "--target-bpw", "5.5", "--samples", "8", "--seq-len", "64").returncode == 0
        )
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    llm.eval([1, 2, 3, 4])
    assert llm.n_tokens == 4


@needs_llama_cpp
def test_tensor_types_equal_llama_quantize_tt_overrides(tmp_path: Path):
    """Our Q4_K_M with overrides is llama_model_quantize's file with the same tt_overrides."""
    from qtune.formats.gguf.convert import export_gguf

    model = tiny_model_dir(tmp_path / "m", hidden=256, layers=8)
    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    export_gguf(model, f32, "F32")
    overrides = {r"blk\.[0-2]\.attn_v": "Q8_0", "ffn_down": "Q3_K", "attn_q": "IQ4_XS"}
    export_gguf(model, ours, "Q4_K_M", tensor_types=parse_tensor_types(overrides))
    llama_quantize(f32, theirs, "Q4_K_M", tensor_types=overrides)
    assert ours.read_bytes() == theirs.read_bytes()
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(ours).tensors}
    assert types["blk.1.attn_v.weight"] == Q.Q8_0 and types["blk.5.ffn_down.weight"] == Q.Q3_K and types["blk.3.attn_q.weight"] == Q.IQ4_XS


@pytest.mark.parametrize("tied", [False, True])
def test_calibration_kl_sees_the_head(tmp_path: Path, tied: bool):
    """The probe of the output head (or, tied, of the embedding that is also the head) moves the logits: the
    reference must not share the candidate's head module."""
    from qtune.auto_mix import calibration_kl
    from qtune.formats.gguf.convert import gguf_tensors

    model = tiny_model_dir(tmp_path / "m", hidden=256, tied=tied)
    plan = gguf_tensors(model)
    rows = [{"input_ids": list(range(5, 69)), "labels": list(range(5, 69)), "num_real_tokens": 64}]
    measure = calibration_kl(plan, model, {}, rows, 0, "cpu")
    head = "token_embd.weight" if tied else "output.weight"
    assert measure({head: Q.Q2_K}) > 1e-4
    assert measure({}) == pytest.approx(0.0, abs=1e-9)
    assert measure({"blk.0.ffn_down.weight": Q.Q2_K}) > 1e-5
