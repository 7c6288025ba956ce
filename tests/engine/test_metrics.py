"""Quantity, quality, cost and speed-up arithmetic."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from service.engine.metrics import (
    CostModel,
    accepted_leaf_mask,
    cost,
    manual_hours,
    quality,
    quantity,
    speedup,
    summarize,
)


def test_default_cost_model_reproduces_the_papers_budget():
    # 245,177 questions for "less than $1,000" / $980 and 114 hours including quality control.
    c = cost(245_177)
    assert c.hits == 4_904  # ceil(245,177 / 50)
    assert c.gold_questions == 4_904 * 5
    assert c.answers == 245_177 + 24_520
    assert c.hours == pytest.approx(269_697 * 1.5 / 3600)
    assert 100 < c.hours < 120
    assert c.reward_usd == pytest.approx(4_904 * 0.17)
    assert c.fees_usd == pytest.approx(4_904 * 0.17 * 0.20)
    assert c.usd == pytest.approx(1_000.416)
    # 4,268,921 masks: ~95k hours by hand, a speed-up of the paper's order (830x).
    assert manual_hours(4_268_921) == pytest.approx(94_864.9, abs=0.1)
    assert 800 < speedup(4_268_921, c.hours) < 870


def test_fee_rate_rises_for_hits_with_ten_or_more_assignments():
    nine = CostModel(assignments_per_hit=9)
    ten = CostModel(assignments_per_hit=10)
    assert nine.fee_rate == 0.20 and ten.fee_rate == 0.40
    assert cost(100, nine).usd == pytest.approx(2 * 9 * 0.17 * 1.2)
    assert cost(100, ten).usd == pytest.approx(2 * 10 * 0.17 * 1.4)
    assert cost(100, ten).answers == (100 + 10) * 10


def test_minimum_fee_per_assignment_applies_to_cheap_hits():
    cheap = CostModel(reward_per_hit_usd=0.02)  # 20% would be $0.004 < $0.01
    assert cost(50, cheap).fees_usd == pytest.approx(0.01)
    assert cost(50, cheap).usd == pytest.approx(0.03)


def test_cost_edge_cases():
    zero = cost(0)
    assert (zero.hits, zero.answers, zero.hours, zero.usd) == (0, 0, 0.0, 0.0)
    one = cost(1)
    assert one.hits == 1 and one.answers == 6  # a HIT always carries its gold questions
    no_gold = cost(120, CostModel(gold_per_hit=0, questions_per_hit=40, seconds_per_question=2.0))
    assert (no_gold.hits, no_gold.answers) == (3, 120)
    assert no_gold.hours == pytest.approx(120 * 2 / 3600)
    with pytest.raises(ValueError, match="questions"):
        cost(-1)
    with pytest.raises(ValueError, match="questions"):
        cost(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seconds_per_question", -1.0),
        ("reward_per_hit_usd", float("nan")),
        ("questions_per_hit", 0),
        ("gold_per_hit", -1),
        ("assignments_per_hit", 1.5),
        ("mturk_fee_rate", "0.2"),
    ],
)
def test_cost_model_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        CostModel(**{field: value})


def test_cost_model_round_trip_and_unknown_fields():
    model = CostModel(reward_per_hit_usd=0.3, assignments_per_hit=3)
    assert CostModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    with pytest.raises(ValueError, match="bogus"):
        CostModel.from_dict({"bogus": 1})


def test_quantity_and_quality_over_ranges():
    iou = np.array([0.9, 0.8, 0.7, 0.2, 1.0, 0.75, 0.6, 0.95])
    ranges = np.array([[0, 3], [4, 6]])  # masks 0,1,2,4,5
    assert quantity(ranges) == 5
    q = quality(iou, ranges, k_iou=0.75)
    assert q.n_masks == 5
    assert q.mean_iou == pytest.approx((0.9 + 0.8 + 0.7 + 1.0 + 0.75) / 5)
    assert q.share_correct == pytest.approx(4 / 5)  # 0.75 itself counts as correct
    mask = accepted_leaf_mask(8, ranges)
    assert mask.tolist() == [True, True, True, False, True, True, False, False]
    singles = mask.nonzero()[0][:, None] + np.array([0, 1])  # adjacent ranges may touch
    assert quality(iou, singles).mean_iou == pytest.approx(q.mean_iou)


def test_quality_of_nothing_is_nan_and_serialises_as_null():
    q = quality(np.array([0.5, 0.9]), np.zeros((0, 2), dtype=np.int64))
    assert q.n_masks == 0 and math.isnan(q.mean_iou) and math.isnan(q.share_correct)
    assert q.to_dict()["mean_iou"] is None
    assert quantity([]) == 0


@pytest.mark.parametrize(
    ("ranges", "match"),
    [
        (np.array([[0, 3], [2, 5]]), "overlap"),
        (np.array([[3, 3]]), "lo < hi"),
        (np.array([[-1, 2]]), "lo < hi"),
        (np.array([[0, 9]]), "exceed"),
        (np.array([0, 3]), "shape"),
        (np.array([[0.0, 3.0]]), "integers"),
    ],
)
def test_bad_ranges(ranges, match):
    with pytest.raises(ValueError, match=match):
        quality(np.full(8, 0.5), ranges)


def test_quality_rejects_bad_iou_and_threshold():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quality(np.array([0.5, 1.5]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="k_iou"):
        quality(np.array([0.5, 0.5]), np.array([[0, 1]]), k_iou=0.0)


def test_speedup_and_manual_hours():
    model = CostModel(seconds_per_manual_mask=60.0)
    assert manual_hours(90, model) == pytest.approx(1.5)
    assert speedup(90, 0.5, model) == pytest.approx(3.0)
    assert speedup(90, 0.0, model) == math.inf
    assert math.isnan(speedup(0, 1.0, model))
    with pytest.raises(ValueError, match="hours"):
        speedup(10, -1.0)
    with pytest.raises(ValueError, match="n_masks"):
        manual_hours(-3)


def test_summarize_is_json_ready():
    rng = np.random.default_rng(0)
    iou = rng.random(1000)
    ranges = np.array([[0, 400], [600, 700]])
    out = summarize(ranges, 750, iou, k_iou=0.5)
    json.dumps(out, allow_nan=False)
    assert out["quantity"] == 500
    assert out["quality"]["mean_iou"] == pytest.approx(
        np.concatenate([iou[:400], iou[600:700]]).mean()
    )
    assert out["cost"]["hits"] == 15
    assert out["speedup"] == pytest.approx(out["manual_hours"] / out["cost"]["hours"])
    assert summarize(np.zeros((0, 2), dtype=np.int64), 0, iou)["speedup"] is None
