"""Tail metrics against the merged model: per-token KL and Δp statistics over all tokens and over the
answers, the worst row and category, their gates and the report's tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qtune.evaluate import EvalResult, gate_failures
from qtune.metrics import divergence, quantile, token_tail
from qtune.recipe import GateSection, Recipe
from qtune.report import Report, Row, _markdown, apply_gates
from support import tiny_model_dir

ROWS = [  # prompt tokens unlabelled, answers labelled
    {"input_ids": [5, 17, 300, 41, 9, 77], "labels": [-100, -100, -100, 41, 9, 77]},
    {"input_ids": [8, 1200, 6, 90, 33, 4, 501, 2], "labels": [-100, -100, -100, -100, 33, 4, 501, 2]},
    {"input_ids": [60, 61, 62, 63], "labels": [-100, -100, 62, 63]},
]
ROWS = [{**row, "num_real_tokens": len(row["input_ids"])} for row in ROWS]


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_quantile_matches_numpy(n: int):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n)).exp()
    for q in (0.0, 0.01, 0.5, 0.99, 0.999, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values.double().numpy(), q)), rel=1e-12, abs=1e-15)
    assert math.isnan(quantile(torch.empty(0), 0.5))


def _expected(reference, candidate) -> dict[str, list]:
    """Per-token KL, Δp, top-1 agreement, answer flags and row numbers, one row at a time, in float64."""
    out = {"kl": [], "dp": [], "agree": [], "answer": [], "row": []}
    with torch.no_grad():
        for r, row in enumerate(ROWS):
            ids = torch.tensor([row["input_ids"]])
            p = reference(input_ids=ids).logits[0].double().softmax(-1)
            q = candidate(input_ids=ids).logits[0].double().softmax(-1)
            for t in range(ids.shape[1]):
                out["kl"].append(float((p[t] * (p[t].log() - q[t].log())).sum()))
                nxt = row["input_ids"][t + 1] if t + 1 < ids.shape[1] else None
                out["dp"].append(float("nan") if nxt is None else float(q[t, nxt] - p[t, nxt]))
                out["agree"].append(bool(p[t].argmax() == q[t].argmax()))
                out["answer"].append(nxt is not None and row["labels"][t + 1] != -100)
                out["row"].append(r)
    return out


def test_tails_are_per_token_statistics_over_the_same_tokens(tmp_path: Path):
    """Batched, padded and chunked, the tails equal per-token KL and Δp taken row by row in float64."""
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path / "a", hidden=64, seed=1), dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path / "b", hidden=64, seed=2), dtype=torch.float32)
    got = divergence(a, b, ROWS, pad_token_id=0, batch_size=2)
    want = _expected(a, b)
    kl, dp = np.array(want["kl"]), np.array(want["dp"])
    agree, answer, rows = np.array(want["agree"]), np.array(want["answer"]), np.array(want["row"])
    assert set(got.tails) == {"all", "answers"}
    for name, keep in (("all", np.ones_like(answer)), ("answers", answer)):
        tail, k, d = got.tails[name], kl[keep], dp[keep]
        d = d[~np.isnan(d)]
        assert tail.tokens == keep.sum()
        assert tail.mean_kl == pytest.approx(k.mean(), rel=1e-4)
        assert tail.median_kl == pytest.approx(np.quantile(k, 0.5), rel=1e-4)
        assert tail.p99_kl == pytest.approx(np.quantile(k, 0.99), rel=1e-4)
        assert tail.p999_kl == pytest.approx(np.quantile(k, 0.999), rel=1e-4)
        assert tail.max_kl == pytest.approx(k.max(), rel=1e-4)
        assert tail.rms_delta_p == pytest.approx(np.sqrt((d**2).mean()), rel=1e-4)
        assert tail.p99_abs_delta_p == pytest.approx(np.quantile(np.abs(d), 0.99), rel=1e-4, abs=1e-7)
        assert tail.p01_delta_p == pytest.approx(np.quantile(d, 0.01), rel=1e-4, abs=1e-7)
        assert tail.p99_delta_p == pytest.approx(np.quantile(d, 0.99), rel=1e-4, abs=1e-7)
        assert tail.top1_agreement == pytest.approx(agree[keep].mean())
    # the last token of each row has no next token: no Δp there, so all tokens carry 3 fewer Δp than KL
    assert np.isnan(dp).sum() == len(ROWS)
    assert got.tails["all"].mean_kl == got.mean_kl and got.tails["all"].tokens == got.tokens
    assert got.tails["answers"].p99_kl < got.tails["all"].max_kl + 1e-9
    row_kl = [kl[(rows == r) & answer].mean() for r in range(len(ROWS))]
    assert got.row_kl == pytest.approx(row_kl, rel=1e-4)
    assert got.worst_row() == (int(np.argmax(row_kl)), pytest.approx(max(row_kl), rel=1e-4))
    by_group = got.kl_by_group(["x", "y", "x"])
    assert by_group == pytest.approx({"x": (row_kl[0] + row_kl[2]) / 2, "y": row_kl[1]}, rel=1e-4)


def test_a_tail_with_no_next_tokens_has_no_delta_p():
    tail = token_tail(torch.tensor([0.1, 0.2]), torch.tensor([float("nan"), float("nan")]), torch.tensor([True, False]))
    assert tail.tokens == 2 and tail.top1_agreement == 0.5 and math.isnan(tail.rms_delta_p) and math.isnan(tail.p99_abs_delta_p)


def _result(name: str, mean: float, p99: float, dp99: float, **extra) -> EvalResult:
    tail = {"mean_kl": mean, "p99_kl": p99, "p99_abs_delta_p": dp99}
    return EvalResult(
        name,
        task_metric=1.0,
        correct=4,
        total=4,
        kl_vs_merged=mean,
        tail_vs_merged={"all": tail, "answers": {"mean_kl": mean / 10, "p99_kl": p99 / 10, "p99_abs_delta_p": dp99 / 10}},
        **extra,
    )


def test_tail_gates_read_all_tokens_and_say_why_they_fail():
    gates = GateSection(max_kl_vs_merged=0.1, max_kl_p99_vs_merged=0.5, max_delta_p_p99=0.2, min_task_ratio=None)
    assert gate_failures(_result("q", 0.05, 0.4, 0.1), gates, "exact_match", 1.0, None) == []
    assert gate_failures(_result("q", 0.05, 0.6, 0.1), gates, "exact_match", 1.0, None) == ["KL p99 0.6 > 0.5"]
    assert gate_failures(_result("q", 0.05, 0.4, 0.25), gates, "exact_match", 1.0, None) == ["|Δp| p99 0.25 > 0.2"]
    assert gate_failures(EvalResult("q", task_metric=1.0), gates, "exact_match", 1.0, None) == [
        "no KL against the merged model",
        "no KL p99 against the merged model",
        "no |Δp| p99 against the merged model",
    ]
    answers = GateSection(max_kl_vs_merged=0.001, max_kl_p99_vs_merged=0.05, max_delta_p_p99=0.2, min_task_ratio=None, tokens="answers")
    assert gate_failures(_result("q", 0.05, 0.6, 0.1), answers, "exact_match", 1.0, None) == [
        "KL over answers 0.005 > 0.001",
        "KL p99 over answers 0.06 > 0.05",
    ]
    off = GateSection(max_kl_vs_merged=None, min_task_ratio=None)
    assert off.max_kl_p99_vs_merged is None and off.max_delta_p_p99 is None
    assert gate_failures(EvalResult("q", task_metric=1.0), off, "exact_match", 1.0, None) == []


@pytest.mark.parametrize("field,value", [("max_kl_p99_vs_merged", -0.1), ("max_delta_p_p99", 1.5)])
def test_tail_gates_refuse_impossible_limits(field: str, value: float):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        GateSection(**{field: value})


def test_the_report_shows_the_tail_and_where_it_sits(tmp_path: Path):
    merged = EvalResult("merged", task_metric=1.0, correct=4, total=4, by_category={"code": 1.0, "math": 1.0})
    worst = {"row": 3, "mean_kl": 0.91, "category": "math", "prompt": "What is 17 * 23?", "answer": "391"}
    q4 = _result(
        "q4", 0.05, 0.6, 0.1, by_category={"code": 1.0, "math": 0.5}, kl_by_category_vs_merged={"code": 0.02, "math": 0.08}, worst_prompt_vs_merged=worst
    )
    recipe = Recipe.model_validate({"evaluation": {"gates": {"max_kl_p99_vs_merged": 0.5, "min_task_ratio": None}}})
    report = Report(tmp_path, recipe, [Row("merged", merged), Row("q4", q4)], None, [], [], 0)
    apply_gates(report)
    assert not report.passed and report.rows[1].reasons == ["KL p99 0.6 > 0.5"]
    columns, body = report.table()
    assert body[1][columns.index("KL p99")] == "0.6" and body[1][columns.index("|Δp| p99")] == "10.0%"
    report.recipe.evaluation.gates.tokens = "answers"
    apply_gates(report)
    assert report.passed
    columns, body = report.table()
    assert columns[4:7] == ["KL vs merged (answers)", "KL p99 (answers)", "|Δp| p99 (answers)"]
    assert body[1][4:7] == ["0.005", "0.06", "1.0%"]
    columns, body = report.tail_table()
    assert [row[:2] for row in body] == [["q4", "all"], ["q4", "answers"]]
    columns, body = report.worst_table()
    assert body == [["q4", "math: 0.08", "math: +50.0", "0.91", "What is 17 * 23? ⟶ 391"]]
    q4.by_category = {"code": 1.0, "math": 1.0}
    assert report.worst_table()[1][0][2] == "none below merged"
    assert "\\|Δp\\| p99" in _markdown(report).splitlines()[2]  # a header's pipes are escaped too
