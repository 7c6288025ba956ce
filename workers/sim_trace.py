"""Progress curves of annotation methods: cost spent against masks obtained and their quality.

Every method (engine variants and baselines) reports, per class, a sequence of *events* — a
decided cluster, a verified mask, a labelled batch — with what each one cost and yielded, plus a
*priority*: the order in which a campaign over all classes would run them (cluster or mask score
for score-ordered methods, progress for the others). Merging the classes' events by priority
gives the campaign-level curve of the paper's Fig. 8 without running classes in lock-step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Events kept per class and method; consecutive events are pooled beyond this.
MAX_CLASS_EVENTS = 4000


@dataclass(frozen=True, eq=False)
class Trace:
    """Per-event increments; all arrays have one entry per event."""

    priority: np.ndarray  # float64: higher runs earlier in a campaign
    seconds: np.ndarray  # float64: annotation time the event cost
    questions: np.ndarray  # int64: verification answers used
    accepted: np.ndarray  # int64: masks added to the dataset
    iou_sum: np.ndarray  # float64: summed IoU of those masks
    good: np.ndarray  # int64: how many of them have IoU >= K_iou

    def __post_init__(self) -> None:
        n = self.priority.shape[0]
        for name in ("seconds", "questions", "accepted", "iou_sum", "good"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"trace field {name!r} must have {n} entries")

    @property
    def n_events(self) -> int:
        return int(self.priority.shape[0])

    @classmethod
    def empty(cls) -> Trace:
        z = np.zeros(0)
        zi = np.zeros(0, dtype=np.int64)
        return cls(z, z, zi, zi, z, zi)

    def pooled(self, max_events: int = MAX_CLASS_EVENTS) -> Trace:
        """Pool consecutive events so at most ``max_events`` remain (sums kept exact).

        A pooled event takes the priority of its last member: it completes when that one does.
        """
        n = self.n_events
        if n <= max_events:
            return self
        edges = np.linspace(0, n, max_events + 1).astype(np.int64)
        starts = edges[:-1]
        last = edges[1:] - 1

        def pool(a: np.ndarray) -> np.ndarray:
            return np.add.reduceat(a, starts)

        return Trace(
            self.priority[last],
            pool(self.seconds),
            pool(self.questions),
            pool(self.accepted),
            pool(self.iou_sum),
            pool(self.good),
        )


def merge(traces: Sequence[Trace]) -> Trace:
    """All classes' events in campaign order (priority descending, stable within a class)."""
    if not traces:
        return Trace.empty()
    cat = [np.concatenate([getattr(t, f) for t in traces]) for f in _FIELDS]
    order = np.argsort(-cat[0], kind="stable")
    return Trace(*(a[order] for a in cat))


_FIELDS = ("priority", "seconds", "questions", "accepted", "iou_sum", "good")


@dataclass(frozen=True)
class Curve:
    """Cumulative campaign curve, sampled at a bounded number of points for reports and plots."""

    hours: list[float]
    questions: list[int]
    accepted: list[int]
    mean_iou: list[float | None]

    def to_dict(self) -> dict[str, list]:
        return {
            "hours": self.hours,
            "questions": self.questions,
            "masks_accepted": self.accepted,
            "mean_iou": self.mean_iou,
        }


def curve(trace: Trace, max_points: int = 200) -> Curve:
    """Cumulative hours / questions / masks / mean IoU at up to ``max_points`` log-spaced events."""
    n = trace.n_events
    if n == 0:
        return Curve([], [], [], [])
    hours = np.cumsum(trace.seconds) / 3600.0
    questions = np.cumsum(trace.questions)
    accepted = np.cumsum(trace.accepted)
    iou = np.cumsum(trace.iou_sum)
    if n <= max_points:
        idx = np.arange(n)
    else:  # log-spaced, as the curves are drawn on log axes; always ends at the last event
        idx = np.unique(np.geomspace(1, n, num=max_points).astype(np.int64) - 1)
    mean = [float(iou[i] / accepted[i]) if accepted[i] else None for i in idx]
    return Curve(
        [float(hours[i]) for i in idx],
        [int(questions[i]) for i in idx],
        [int(accepted[i]) for i in idx],
        mean,
    )
