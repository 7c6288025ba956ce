"""The alternatives the paper compares against in Fig. 8, on the simulated masks of one class.

* **manual** — every object is drawn as a polygon (80 s per mask, COCO's figure). A manual mask
  is not perfect either: its IoU with the "true" object is drawn from a Beta distribution whose
  mean is the human annotation consistency (``manual_iou_mean``, 0.83: the paper quotes a
  segmentation quality of 0.80–0.85 across manually annotated datasets, COCO at 0.826).
* **verify_all** — the naive brute-force binary verification of [39]: every predicted mask is
  asked about, highest score first, and kept when the worker says yes.
* **lsun** — the LSUN loop [61] adapted to masks: per class, workers label a random batch, a
  logistic regression on (f, s) is trained on all labels so far, unlabelled masks scoring above
  the threshold that reaches ``precision`` on the labelled data are accepted (and those below
  the symmetric threshold for negatives are dropped), the next batch is drawn from the masks
  still undecided, for ``rounds`` rounds. Thresholds come from out-of-fold probabilities, as
  in-sample ones would be optimistic. Labelled masks answered "yes" are kept too.

All crowd answers come from :class:`workers.sim_workers.Answers`, the same per-mask answers the
engine sees, so the comparison is paired.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.sim_model import MaskSample
from workers.sim_trace import Trace
from workers.sim_workers import Answers


@dataclass(frozen=True, eq=False)
class ClassOutcome:
    """What one method obtained on one class and what it spent."""

    method: str
    questions: int  # verification answers used
    paid_questions: int  # questions paid, including the re-asks of discarded answers
    manual_masks: int  # polygons drawn by hand
    accepted: int  # masks in the dataset
    iou_sum: float  # their summed IoU
    good: int  # of which IoU >= K_iou
    trace: Trace
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BaselineParams:
    """Tunables of the baselines (documented in the module docstring)."""

    manual_iou_mean: float = 0.83
    manual_iou_concentration: float = 40.0
    lsun_batch: int = 500
    lsun_rounds: int = 4
    lsun_precision: float = 0.95
    lsun_min_support: int = 20

    def __post_init__(self) -> None:
        if not 0.0 < self.manual_iou_mean < 1.0:
            raise ValueError(f"manual_iou_mean must be in (0, 1), got {self.manual_iou_mean}")
        if self.manual_iou_concentration <= 0:
            raise ValueError("manual_iou_concentration must be > 0")
        if self.lsun_batch < 2:
            raise ValueError(f"lsun_batch must be >= 2, got {self.lsun_batch}")
        if self.lsun_rounds < 1:
            raise ValueError(f"lsun_rounds must be >= 1, got {self.lsun_rounds}")
        if not 0.5 < self.lsun_precision < 1.0:
            raise ValueError(f"lsun_precision must be in (0.5, 1), got {self.lsun_precision}")
        if self.lsun_min_support < 1:
            raise ValueError("lsun_min_support must be >= 1")


def _progress_priority(n_events: int) -> np.ndarray:
    """Priorities that interleave classes evenly: event k of n completes at progress (k+1)/n."""
    return 1.0 - (np.arange(n_events) + 1.0) / max(n_events, 1)


def run_manual(
    n_masks: int,
    rng: np.random.Generator,
    params: BaselineParams,
    *,
    seconds_per_mask: float,
    k_iou: float,
    events: int = 200,
) -> ClassOutcome:
    """Draw every object by hand; the curve is linear in time."""
    m, c = params.manual_iou_mean, params.manual_iou_concentration
    iou = rng.beta(m * c, (1.0 - m) * c, size=n_masks)
    n_ev = max(1, min(events, n_masks))
    starts = np.linspace(0, n_masks, n_ev + 1).astype(np.int64)[:-1]
    counts = np.diff(np.append(starts, n_masks))
    trace = Trace(
        _progress_priority(n_ev),
        counts * float(seconds_per_mask),
        np.zeros(n_ev, dtype=np.int64),
        counts.astype(np.int64),
        np.add.reduceat(iou, starts) if n_masks else np.zeros(n_ev),
        np.add.reduceat((iou >= k_iou).astype(np.int64), starts)
        if n_masks
        else np.zeros(n_ev, dtype=np.int64),
    )
    return ClassOutcome(
        "manual",
        0,
        0,
        n_masks,
        n_masks,
        float(iou.sum()),
        int((iou >= k_iou).sum()),
        trace,
    )


def run_verify_all(
    sample: MaskSample,
    answers: Answers,
    *,
    seconds_per_question: float,
    k_iou: float,
) -> ClassOutcome:
    """Ask about every mask, best score first; keep the ones answered yes."""
    order = np.argsort(-sample.scores, kind="stable")
    yes = answers.answers[order]
    iou = sample.iou[order]
    paid = answers.attempts[order].astype(np.int64)
    kept_iou = np.where(yes, iou, 0.0)
    trace = Trace(
        sample.scores[order],
        paid * float(seconds_per_question),
        np.ones(sample.n, dtype=np.int64),
        yes.astype(np.int64),
        kept_iou,
        (yes & (iou >= k_iou)).astype(np.int64),
    ).pooled()
    return ClassOutcome(
        "verify_all",
        sample.n,
        int(paid.sum()),
        0,
        int(yes.sum()),
        float(kept_iou.sum()),
        int((yes & (iou >= k_iou)).sum()),
        trace,
    )


def _threshold_for_precision(
    prob: np.ndarray, positive: np.ndarray, precision: float, min_support: int
) -> float:
    """Lowest probability cut whose top set reaches ``precision``; ``inf`` when none does.

    The top-k set must hold at least ``min_support`` labelled masks, so a lucky handful cannot
    open the gate.
    """
    order = np.argsort(-prob, kind="stable")
    hits = np.cumsum(positive[order])
    k = np.arange(1, prob.shape[0] + 1)
    ok = (hits >= precision * k) & (k >= min_support)
    if not ok.any():
        return np.inf
    return float(prob[order][np.flatnonzero(ok)[-1]])


def run_lsun(
    sample: MaskSample,
    answers: Answers,
    rng: np.random.Generator,
    params: BaselineParams,
    *,
    seconds_per_question: float,
    k_iou: float,
) -> ClassOutcome:
    """The LSUN-style label / train / auto-label loop (see the module docstring)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    n = sample.n
    x = np.column_stack([sample.features, sample.scores])
    x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-12)
    undecided = np.ones(n, dtype=bool)
    accepted = np.zeros(n, dtype=bool)
    labelled: list[np.ndarray] = []
    ev: dict[str, list[float]] = {k: [] for k in ("seconds", "q", "acc", "iou", "good")}
    rounds_run = 0
    questions = paid = 0
    for _ in range(params.lsun_rounds):
        pool = np.flatnonzero(undecided)
        if pool.size == 0:
            break
        rounds_run += 1
        batch = rng.choice(pool, size=min(params.lsun_batch, pool.size), replace=False)
        undecided[batch] = False
        labelled.append(batch)
        newly = batch[answers.answers[batch]]
        round_paid = int(answers.attempts[batch].sum())
        questions += int(batch.size)
        paid += round_paid
        lab = np.concatenate(labelled)
        y = answers.answers[lab]
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        rest = np.flatnonzero(undecided)
        if min(n_pos, n_neg) >= 2 and rest.size:
            folds = min(3, n_pos, n_neg)
            clf = LogisticRegression(solver="newton-cholesky", max_iter=100)
            oof = cross_val_predict(clf, x[lab], y, cv=folds, method="predict_proba")[:, 1]
            t_hi = _threshold_for_precision(oof, y, params.lsun_precision, params.lsun_min_support)
            t_lo = -_threshold_for_precision(
                -oof, ~y, params.lsun_precision, params.lsun_min_support
            )
            prob = clf.fit(x[lab], y).predict_proba(x[rest])[:, 1]
            auto_yes = rest[prob >= t_hi]
            auto_no = rest[prob <= t_lo]
            undecided[auto_yes] = False
            undecided[auto_no] = False
            newly = np.concatenate([newly, auto_yes])
        accepted[newly] = True
        ev["seconds"].append(round_paid * float(seconds_per_question))
        ev["q"].append(batch.size)
        ev["acc"].append(newly.size)
        ev["iou"].append(float(sample.iou[newly].sum()))
        ev["good"].append(int((sample.iou[newly] >= k_iou).sum()))
    trace = Trace(
        # Round r of every class runs together in a campaign.
        _progress_priority(params.lsun_rounds)[:rounds_run],
        np.asarray(ev["seconds"], dtype=np.float64),
        np.asarray(ev["q"], dtype=np.int64),
        np.asarray(ev["acc"], dtype=np.int64),
        np.asarray(ev["iou"], dtype=np.float64),
        np.asarray(ev["good"], dtype=np.int64),
    )
    iou = sample.iou[accepted]
    return ClassOutcome(
        "lsun",
        questions,
        paid,
        0,
        int(accepted.sum()),
        float(iou.sum()),
        int((iou >= k_iou).sum()),
        trace,
        {"rounds": rounds_run, "undecided": int(undecided.sum())},
    )
