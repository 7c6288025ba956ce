"""Quantity, quality and cost of a verification run (the paper's evaluation, Sec. 5-6).

Pure functions over numpy arrays plus a :class:`CostModel`, shared by the simulator, the
benchmarks and the requester dashboard, so every number is computed one way.

* Quantity: masks inside accepted clusters.
* Quality: mean IoU of the accepted masks with their ground truth, and the share with
  ``IoU >= K_iou`` (the masks a worker should have called correct).
* Cost: verification questions plus the hidden gold questions of every HIT, the hours they take
  at ``seconds_per_question`` (1.5 s, the paper's measured mean), and US dollars on MTurk:
  ``reward x assignments x (1 + fee)``, where MTurk's fee is 20% of the reward (40% for HITs
  with 10 or more assignments), at least $0.01 per assignment.
* Speed-up: the hours manual polygons would take (80 s per mask, COCO's figure used by the
  paper) over the verification hours.

Default reward. The paper asked 245,177 questions for $980 (Sec. 6). With HITs of 50
verification questions plus 5 gold ones that is 4,904 HITs; at $0.17 per HIT plus the 20% fee
they cost 4,904 x $0.204 = $1,000.42, i.e. "about $1,000" as reported. The same defaults give
(245,177 + 24,520 gold) x 1.5 s = 112.4 hours, against the paper's 114 hours including quality
control.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

__all__ = [
    "Cost",
    "CostModel",
    "Quality",
    "accepted_leaf_mask",
    "cost",
    "manual_hours",
    "quality",
    "quantity",
    "speedup",
    "summarize",
]


@dataclass(frozen=True)
class CostModel:
    """Prices and timings of crowd verification; defaults reproduce the paper's budget."""

    seconds_per_question: float = 1.5
    seconds_per_manual_mask: float = 80.0
    questions_per_hit: int = 50
    gold_per_hit: int = 5
    reward_per_hit_usd: float = 0.17
    mturk_fee_rate: float = 0.20
    mturk_fee_rate_large: float = 0.40
    large_hit_assignments: int = 10
    min_fee_per_assignment_usd: float = 0.01
    assignments_per_hit: int = 1

    def __post_init__(self) -> None:
        for name in (
            "seconds_per_question",
            "seconds_per_manual_mask",
            "reward_per_hit_usd",
            "mturk_fee_rate",
            "mturk_fee_rate_large",
            "min_fee_per_assignment_usd",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        for name, minimum in (
            ("questions_per_hit", 1),
            ("gold_per_hit", 0),
            ("large_hit_assignments", 1),
            ("assignments_per_hit", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

    @property
    def fee_rate(self) -> float:
        """MTurk's commission for HITs of this model's number of assignments."""
        if self.assignments_per_hit >= self.large_hit_assignments:
            return self.mturk_fee_rate_large
        return self.mturk_fee_rate

    @property
    def usd_per_hit(self) -> float:
        """What one HIT costs the requester: all its assignments' rewards plus fees."""
        fee = max(self.reward_per_hit_usd * self.fee_rate, self.min_fee_per_assignment_usd)
        return self.assignments_per_hit * (self.reward_per_hit_usd + fee)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown cost model field(s): {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Cost:
    """Cost of ``questions`` verification questions under a :class:`CostModel`."""

    questions: int
    gold_questions: int
    answers: int
    hits: int
    hours: float
    reward_usd: float
    fees_usd: float

    @property
    def usd(self) -> float:
        return self.reward_usd + self.fees_usd

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "usd": self.usd}


@dataclass(frozen=True)
class Quality:
    """Quality of the accepted masks; NaN when nothing was accepted."""

    n_masks: int
    mean_iou: float
    share_correct: float
    k_iou: float

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }


def _check_ranges(ranges: Any, n: int | None = None) -> np.ndarray:
    """``(lo, hi)`` rows as int64[m, 2]; they must be non-empty, disjoint and inside ``[0, n]``."""
    r = np.asarray(ranges)
    if r.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if r.ndim != 2 or r.shape[1] != 2:
        raise ValueError(f"ranges must have shape (m, 2), got {r.shape}")
    if r.dtype.kind not in "iu":
        raise ValueError(f"ranges must be integers, got dtype {r.dtype}")
    r = r.astype(np.int64, copy=False)
    lo, hi = r[:, 0], r[:, 1]
    if (lo < 0).any() or (hi <= lo).any():
        raise ValueError("ranges must satisfy 0 <= lo < hi")
    if n is not None and (hi > n).any():
        raise ValueError(f"ranges exceed the {n} leaf positions")
    order = np.argsort(lo, kind="stable")
    if (lo[order][1:] < hi[order][:-1]).any():
        raise ValueError("ranges overlap: a mask would be counted twice")
    return r


def quantity(accepted_ranges: Any) -> int:
    """Number of accepted masks (sum of range lengths)."""
    r = _check_ranges(accepted_ranges)
    return int((r[:, 1] - r[:, 0]).sum())


def accepted_leaf_mask(n: int, accepted_ranges: Any) -> np.ndarray:
    """bool[n]: True at leaf positions inside an accepted range; O(n + m)."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    r = _check_ranges(accepted_ranges, int(n))
    delta = np.zeros(int(n) + 1, dtype=np.int64)
    np.add.at(delta, r[:, 0], 1)
    np.add.at(delta, r[:, 1], -1)
    return np.cumsum(delta[:-1]) > 0


def quality(iou_in_leaf_order: Any, accepted_ranges: Any, k_iou: float = 0.75) -> Quality:
    """Mean IoU of accepted masks and the share with ``IoU >= k_iou``.

    ``iou_in_leaf_order``: IoU of every mask (leaf order) with its best-matching ground truth,
    0 for a mask matching none. O(n) for the prefix sums, O(m) over the ranges.
    """
    iou = np.asarray(iou_in_leaf_order)
    if iou.ndim != 1 or iou.dtype.kind not in "biuf":
        raise ValueError("iou_in_leaf_order must be a 1-D numeric array")
    iou = iou.astype(np.float64, copy=False)
    if not np.isfinite(iou).all() or (iou < 0).any() or (iou > 1).any():
        raise ValueError("IoU values must lie in [0, 1]")
    if isinstance(k_iou, bool) or not isinstance(k_iou, int | float) or not 0 < k_iou <= 1:
        raise ValueError(f"k_iou must satisfy 0 < k_iou <= 1, got {k_iou!r}")
    r = _check_ranges(accepted_ranges, iou.shape[0])
    n_masks = int((r[:, 1] - r[:, 0]).sum())
    if n_masks == 0:
        return Quality(0, math.nan, math.nan, float(k_iou))
    iou_prefix = np.concatenate([[0.0], np.cumsum(iou)])
    ok_prefix = np.concatenate([[0], np.cumsum(iou >= k_iou)])
    iou_sum = float((iou_prefix[r[:, 1]] - iou_prefix[r[:, 0]]).sum())
    ok_sum = int((ok_prefix[r[:, 1]] - ok_prefix[r[:, 0]]).sum())
    return Quality(n_masks, iou_sum / n_masks, ok_sum / n_masks, float(k_iou))


def cost(questions: int, model: CostModel | None = None) -> Cost:
    """Questions, gold overhead, HITs, hours and dollars of a run of ``questions`` questions.

    Verification questions are packed ``questions_per_hit`` to a HIT, each HIT adds
    ``gold_per_hit`` hidden gold questions and is answered by ``assignments_per_hit`` workers.
    """
    if isinstance(questions, bool) or not isinstance(questions, int | np.integer) or questions < 0:
        raise ValueError(f"questions must be an integer >= 0, got {questions!r}")
    m = model or CostModel()
    questions = int(questions)
    hits = -(-questions // m.questions_per_hit)
    gold = hits * m.gold_per_hit
    answers = (questions + gold) * m.assignments_per_hit
    reward = hits * m.assignments_per_hit * m.reward_per_hit_usd
    fees = hits * m.usd_per_hit - reward
    return Cost(
        questions=questions,
        gold_questions=gold,
        answers=answers,
        hits=hits,
        hours=answers * m.seconds_per_question / 3600.0,
        reward_usd=reward,
        fees_usd=fees,
    )


def manual_hours(n_masks: int, model: CostModel | None = None) -> float:
    """Hours to draw ``n_masks`` polygons by hand (80 s each by default, as COCO)."""
    if isinstance(n_masks, bool) or not isinstance(n_masks, int | np.integer) or n_masks < 0:
        raise ValueError(f"n_masks must be an integer >= 0, got {n_masks!r}")
    return int(n_masks) * (model or CostModel()).seconds_per_manual_mask / 3600.0


def speedup(n_masks: int, hours: float, model: CostModel | None = None) -> float:
    """Manual-polygon hours for the same masks over verification ``hours``.

    ``inf`` when masks were obtained for no time at all, NaN when there were no masks.
    """
    if isinstance(hours, bool) or not isinstance(hours, int | float) or not hours >= 0:
        raise ValueError(f"hours must be a number >= 0, got {hours!r}")
    manual = manual_hours(n_masks, model)
    if manual == 0:
        return math.nan
    return manual / hours if hours > 0 else math.inf


def summarize(
    accepted_ranges: Any,
    questions: int,
    iou_in_leaf_order: Any,
    *,
    k_iou: float = 0.75,
    model: CostModel | None = None,
) -> dict[str, Any]:
    """All metrics of one run as a JSON-ready dict (NaN/inf become ``None``)."""
    q = quality(iou_in_leaf_order, accepted_ranges, k_iou)
    c = cost(questions, model)
    s = speedup(q.n_masks, c.hours, model)
    return {
        "quantity": q.n_masks,
        "quality": q.to_dict(),
        "cost": c.to_dict(),
        "manual_hours": manual_hours(q.n_masks, model),
        "speedup": s if math.isfinite(s) else None,
    }
