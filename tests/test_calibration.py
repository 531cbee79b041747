"""Calibration draws: deterministic, stratified over the records' categories, and packed whole."""

from __future__ import annotations

from collections import Counter

from qtune.calibration import calibration_set, draw_order
from qtune.recipe import DataSection
from support import QUICKSTART_DATA


def test_the_draw_is_deterministic_and_covers_every_category_evenly():
    strata = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    order = draw_order(strata, seed=3)
    assert order == draw_order(list(strata), seed=3) and sorted(order) == list(range(100))
    assert order != draw_order(strata, seed=4)
    first = Counter(strata[i] for i in order[:20])
    assert first == {"a": 12, "b": 6, "c": 2}  # every prefix keeps the strata's proportions


def test_records_without_a_category_are_one_stratum():
    assert sorted(draw_order([None] * 7, seed=0)) == list(range(7))


def test_quickstart_calibration_is_stratified_over_its_categories(smol_tokenizer):
    cfg = DataSection(train=str(QUICKSTART_DATA / "quickstart_train.jsonl"))
    calibration = calibration_set(smol_tokenizer, cfg, QUICKSTART_DATA, samples=6, seq_len=256, seed=0)
    assert calibration.input_ids.shape[0] == 6 and calibration.tokens > 6 * 128
    again = calibration_set(smol_tokenizer, cfg, QUICKSTART_DATA, samples=6, seq_len=256, seed=0)
    assert (again.input_ids == calibration.input_ids).all()
    other = calibration_set(smol_tokenizer, cfg, QUICKSTART_DATA, samples=6, seq_len=256, seed=1)
    assert other.input_ids.shape != calibration.input_ids.shape or not (other.input_ids == calibration.input_ids).all()
    text = smol_tokenizer.decode(calibration.input_ids[calibration.attention_mask.bool()])
    # six templates in the quickstart data; a stratified draw of ~18 examples holds each of them
    for marker in ("years old and lives in", "| Age:", "resident", "Meet ", "full name", "Dear team"):
        assert marker in text, marker
