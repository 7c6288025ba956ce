"""Simulated crowd workers: accuracy spread, spammers, gold-based blocking, and their answers.

Model. The crowd is ``n_workers`` concurrently active workers. Honest workers answer correctly
with their own accuracy, drawn from a Beta distribution (mean 0.93, concentration 60: 90% of
honest workers between about 0.87 and 0.97). A ``spammer_share`` of workers are spammers who
answer at random (``random``) or always "yes" (``always_yes``). Each HIT holds
``questions_per_hit`` questions plus ``gold_per_hit`` hidden gold questions and goes to a random
active worker.

With gold-based blocking, a worker whose cumulative gold accuracy falls under ``block_below``
is blocked after that HIT: the HIT's answers (the ones not yet vouched for by a passed gold check)
are discarded and asked again, and a fresh worker from the same population takes the free slot
(so spammers keep arriving at their base rate). Workers also leave on their own after
``mean_hits_per_worker`` HITs on average (geometric), replaced the same way. Blocking costs
the discarded questions and the gold questions themselves; honest workers are sometimes
blocked by bad luck, which the simulation counts too.

To compare methods fairly, answers are fixed per *mask*, not per request: :func:`simulate_crowd`
plays a long stream of HITs once per campaign, and :func:`draw_answers` gives every mask of a
class the answer of a question slot drawn from that stream (re-drawing while the slot's HIT was
discarded, each draw a paid question). Every method asking about mask ``i`` then gets the same
answer at the same cost, so differences between methods come from the methods, not from luck.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SPAMMER_MODES = ("random", "always_yes")

_HONEST, _RANDOM, _ALWAYS_YES = 0, 1, 2


@dataclass(frozen=True)
class WorkerModel:
    """Parameters of the simulated crowd (see the module docstring)."""

    n_workers: int = 200
    spammer_share: float = 0.10
    spammer_mode: str = "random"
    accuracy_mean: float = 0.93
    accuracy_concentration: float = 60.0
    gold_blocking: bool = True
    questions_per_hit: int = 50
    gold_per_hit: int = 5
    gold_positive_share: float = 0.5  # share of gold masks whose right answer is "yes"
    block_below: float = 0.8
    mean_hits_per_worker: float = 20.0
    stream_hits: int = 5000

    def __post_init__(self) -> None:
        if self.n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {self.n_workers}")
        if not 0.0 <= self.spammer_share <= 1.0:
            raise ValueError(f"spammer_share must be in [0, 1], got {self.spammer_share}")
        if self.spammer_mode not in SPAMMER_MODES:
            raise ValueError(
                f"spammer_mode must be one of {SPAMMER_MODES}, got {self.spammer_mode!r}"
            )
        if not 0.5 <= self.accuracy_mean < 1.0:
            raise ValueError(f"accuracy_mean must be in [0.5, 1), got {self.accuracy_mean}")
        if self.accuracy_concentration <= 0:
            raise ValueError(
                f"accuracy_concentration must be > 0, got {self.accuracy_concentration}"
            )
        if self.questions_per_hit < 1:
            raise ValueError(f"questions_per_hit must be >= 1, got {self.questions_per_hit}")
        if self.gold_per_hit < (1 if self.gold_blocking else 0):
            raise ValueError("gold-based blocking needs gold_per_hit >= 1")
        if not 0.0 <= self.gold_positive_share <= 1.0:
            raise ValueError("gold_positive_share must be in [0, 1]")
        if not 0.0 <= self.block_below <= 1.0:
            raise ValueError(f"block_below must be in [0, 1], got {self.block_below}")
        if self.mean_hits_per_worker < 1:
            raise ValueError(f"mean_hits_per_worker must be >= 1, got {self.mean_hits_per_worker}")
        if self.stream_hits < 1:
            raise ValueError(f"stream_hits must be >= 1, got {self.stream_hits}")

    @property
    def gold_per_question(self) -> float:
        """Gold questions paid per real question (0 without quality control)."""
        return self.gold_per_hit / self.questions_per_hit if self.gold_blocking else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class Crowd:
    """A played stream of HITs: who answered each and whether it was discarded."""

    model: WorkerModel
    p_correct: np.ndarray  # float64[h]: the HIT worker's accuracy (honest workers)
    mode: np.ndarray  # int8[h]: 0 honest, 1 random spammer, 2 always-yes spammer
    discarded: np.ndarray  # bool[h]
    workers_seen: int
    blocked_honest: int
    blocked_spammers: int

    def stats(self) -> dict[str, Any]:
        kept = ~self.discarded
        return {
            "hits_simulated": int(self.discarded.size),
            "workers_seen": self.workers_seen,
            "blocked_honest": self.blocked_honest,
            "blocked_spammers": self.blocked_spammers,
            "discarded_share": float(self.discarded.mean()),
            "spammer_share_of_kept_answers": float((self.mode[kept] != _HONEST).mean()),
            "mean_honest_accuracy": float(self.p_correct[kept & (self.mode == _HONEST)].mean())
            if np.any(kept & (self.mode == _HONEST))
            else None,
        }


def _new_worker(model: WorkerModel, rng: np.random.Generator) -> tuple[float, int]:
    if rng.random() < model.spammer_share:
        return 0.5, _RANDOM if model.spammer_mode == "random" else _ALWAYS_YES
    a = model.accuracy_mean * model.accuracy_concentration
    b = (1.0 - model.accuracy_mean) * model.accuracy_concentration
    return float(max(0.5, rng.beta(a, b))), _HONEST


def simulate_crowd(model: WorkerModel, rng: np.random.Generator) -> Crowd:
    """Play ``model.stream_hits`` HITs with gold checks and return who answered what.

    A Python loop over HITs (a few thousand) — cheap next to the per-mask work, and it keeps the
    blocking rule readable.
    """
    acc = np.empty(model.n_workers)
    kind = np.empty(model.n_workers, dtype=np.int8)
    for w in range(model.n_workers):
        acc[w], kind[w] = _new_worker(model, rng)
    gold_ok = np.zeros(model.n_workers, dtype=np.int64)
    gold_n = np.zeros(model.n_workers, dtype=np.int64)
    h = model.stream_hits
    p_correct = np.empty(h)
    mode = np.empty(h, dtype=np.int8)
    discarded = np.zeros(h, dtype=bool)
    seen = model.n_workers
    blocked = [0, 0]  # honest, spammers
    for i in range(h):
        w = int(rng.integers(model.n_workers))
        p_correct[i], mode[i] = acc[w], kind[w]
        leaves = rng.random() * model.mean_hits_per_worker < 1.0
        if not model.gold_blocking:
            if leaves:
                acc[w], kind[w] = _new_worker(model, rng)
                seen += 1
            continue
        if kind[w] == _HONEST:
            p_gold = acc[w]
        elif kind[w] == _RANDOM:
            p_gold = 0.5
        else:  # always "yes": right exactly on the positive gold
            p_gold = model.gold_positive_share
        gold_ok[w] += rng.binomial(model.gold_per_hit, p_gold)
        gold_n[w] += model.gold_per_hit
        if gold_ok[w] < model.block_below * gold_n[w]:
            discarded[i] = True
            blocked[0 if kind[w] == _HONEST else 1] += 1
            leaves = True
        if leaves:
            acc[w], kind[w] = _new_worker(model, rng)
            gold_ok[w] = gold_n[w] = 0
            seen += 1
    if discarded.all():
        raise ValueError("the worker model blocks every worker: lower block_below")
    return Crowd(model, p_correct, mode, discarded, seen, blocked[0], blocked[1])


@dataclass(frozen=True, eq=False)
class Answers:
    """The crowd's answer about each mask of a class, and what obtaining it cost."""

    answers: np.ndarray  # bool[n]
    attempts: np.ndarray  # int32[n]: paid questions to get a kept answer (>= 1)
    from_spammer: np.ndarray  # bool[n]

    @property
    def n(self) -> int:
        return int(self.answers.shape[0])


def draw_answers(crowd: Crowd, truth: np.ndarray, rng: np.random.Generator) -> Answers:
    """One kept answer per mask (``truth``: the mask is correct, IoU >= K_iou)."""
    truth = np.asarray(truth, dtype=bool)
    n = truth.shape[0]
    n_hits = crowd.discarded.shape[0]
    slot = rng.integers(n_hits, size=n)
    attempts = np.ones(n, dtype=np.int32)
    redo = np.flatnonzero(crowd.discarded[slot])
    while redo.size:
        slot[redo] = rng.integers(n_hits, size=redo.size)
        attempts[redo] += 1
        redo = redo[crowd.discarded[slot[redo]]]
    u = rng.random(n)
    mode = crowd.mode[slot]
    honest = np.where(u < crowd.p_correct[slot], truth, ~truth)
    answers = np.where(mode == _HONEST, honest, np.where(mode == _RANDOM, u < 0.5, True))
    return Answers(answers, attempts, mode != _HONEST)


class CountingOracle:
    """The engine's oracle over one class's tree: answers by leaf position, counts paid questions.

    ``order`` maps leaf positions to mask indices (``ClusterTree.order``). Asking twice about the
    same mask returns the same answer and is paid twice, as it would be live.
    """

    def __init__(self, answers: Answers, order: np.ndarray | None = None) -> None:
        self._answers = answers
        self._order = order
        self.asked = 0
        self.paid = 0

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        idx = positions if self._order is None else self._order[positions]
        self.asked += int(idx.shape[0])
        self.paid += int(self._answers.attempts[idx].sum())
        return self._answers.answers[idx]
