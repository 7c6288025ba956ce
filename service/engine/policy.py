"""The verification policy: what happens to one cluster given its score, size and answers so far.

This module is the single source of truth for the decision rule of the paper (Sec. 4.3-4.5) and
for its extensions. Both the live service (state in Postgres) and the simulator
(:mod:`service.engine.runner`, state in numpy arrays) call :func:`decide`, so simulated runs
predict live ones.

Rules, in order (``S`` = cluster score, ``size`` = number of masks):

1. Automatic rules, which need no human (:func:`auto_action`):
   ``S <= K_pr`` -> auto-reject; ``K_pr < S <= K_pa`` and ``size > N_s`` -> auto-split;
   ``S <= K_pa`` and ``size <= N_s`` -> auto-reject (too small to split usefully, and
   ``P_h ~ 0`` below ``K_pa``); ``size < N_s`` above ``K_pa`` with ``small_clusters="skip"`` ->
   skip, as the paper's authors did in their live rounds.
2. Otherwise humans answer yes/no about sampled masks and the cluster is accepted
   (``Q~ >= K_a``), rejected (``Q~ <= 1 - K_a``) or split, where ``Q~ = yes / answers``.

Exactness: ``K_a`` is read as the shortest decimal that round-trips to the given float
(``0.85`` -> ``17/20``) and every threshold test is done in integers (``yes >= ceil(n*17/20)``),
so float rounding can never flip a decision that sits exactly on a boundary (``17/20`` answers
of yes accepts at ``K_a=0.85``; ``0.85 * 20`` in floating point would be ``16.999...``).

Variants (``PolicyParams.variant``):

``paper``
    exactly ``N_s`` answers (all masks of a cluster smaller than ``N_s``), then decide.
``curtailed``
    stop as soon as the ``paper`` decision can no longer change whatever the remaining answers
    are. It reaches the same decision as ``paper`` on every answer sequence with at most as many
    questions (``tests/engine/test_policy.py`` proves it as a property test).
``sequential``
    a Beta posterior over the cluster quality ``Q`` with a prior whose mean comes from the score
    ``S`` (a calibrated piecewise-linear map ``S -> E[Q]``, identity by default, clipped to
    ``(0.02, 0.98)``) and whose strength is ``prior_strength`` pseudo-answers. It stops when
    ``P(Q >= K_a)``, ``P(Q <= 1-K_a)`` or ``P(1-K_a < Q < K_a)`` reaches ``1 - error_rate``;
    after ``max_questions`` answers (default ``N_s``) it falls back to the paper rule on the
    answers so far, and once every mask of the cluster is answered ``Q`` is known exactly. It
    never decides before ``min_answers`` human answers, so a confident score cannot replace
    verification. A 95% posterior is a stricter standard than the paper's point estimate on 15
    answers: with a weak prior, clear-cut bad clusters need ~20 answers where curtailment needs
    13; a calibrated prior (:mod:`service.engine.calibrate`) is what makes it cheap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from fractions import Fraction
from functools import lru_cache
from itertools import pairwise
from typing import Any

import numpy as np
from scipy.special import betainc, betaincc

__all__ = [
    "AUTO_CODE_ACTIONS",
    "PRIOR_MEAN_CLIP",
    "SEQUENTIAL_BATCH",
    "Action",
    "Decision",
    "PolicyParams",
    "auto_action",
    "auto_action_codes",
    "decide",
    "plan_length",
    "posterior_probabilities",
    "prior_mean",
    "sample_positions",
    "threshold_action",
]

VARIANTS = ("paper", "curtailed", "sequential")
SMALL_CLUSTER_MODES = ("ask_all", "skip")

#: The sequential prior mean is kept away from 0 and 1: a Beta prior with a mean of exactly 0 or 1
#: is degenerate and no number of answers could move it.
PRIOR_MEAN_CLIP = (0.02, 0.98)

#: Largest batch the sequential variant requests at once. Small batches keep the test sequential
#: (fewer wasted answers); batches > 1 save round trips in the live service.
SEQUENTIAL_BATCH = 5


class Action(StrEnum):
    """What happens to a cluster. Values are stable strings (stored in the database and JSON)."""

    AUTO_REJECT = "auto_reject"
    AUTO_SPLIT = "auto_split"
    SKIP = "skip"
    ASK = "ask"
    ACCEPT = "accept"
    REJECT = "reject"
    SPLIT = "split"


#: ``auto_action_codes`` returns int8 codes indexing this tuple (``None`` = humans needed).
AUTO_CODE_ACTIONS: tuple[Action | None, ...] = (
    None,
    Action.AUTO_REJECT,
    Action.AUTO_SPLIT,
    Action.SKIP,
)
_CODE_NONE, _CODE_AUTO_REJECT, _CODE_AUTO_SPLIT, _CODE_SKIP = range(4)


def _is_int(value: Any) -> bool:
    if type(value) is int:  # fast path: the runner calls the policy ~10^5 times per run
        return True
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_real(value: Any) -> bool:
    if type(value) is float:
        return math.isfinite(value)
    return (_is_int(value) or isinstance(value, float | np.floating)) and math.isfinite(value)


@dataclass(frozen=True)
class PolicyParams:
    """Parameters of the verification policy; defaults are the paper's (Sec. 4-5).

    ``k_iou`` is not used by the decision itself (workers answer "is this mask correct", i.e.
    ``IoU >= K_iou``); it travels with the policy so that the simulator and the ground truth
    used for calibration and gold questions agree with what workers are told.

    ``max_questions`` is a *per-cluster* cap for the sequential variant (``None`` means
    ``n_s``: never more answers per cluster than the paper asks), not the campaign budget (that is ``run_search(max_questions=...)``).
    ``min_answers`` stops the sequential test from deciding on the score prior alone: it never
    decides before that many human answers (or all masks of a smaller cluster).
    ``prior_map`` holds ``(S, E[Q])`` knots of a piecewise-linear map, increasing in ``S``, as
    produced by :meth:`service.engine.calibrate.Calibration.prior_map`; ``None`` = identity.
    """

    n_s: int = 15
    k_a: float = 0.85
    k_iou: float = 0.75
    k_pa: float = 0.7
    k_pr: float = 0.0
    small_clusters: str = "ask_all"
    variant: str = "paper"
    error_rate: float = 0.05
    prior_strength: float = 2.0
    prior_map: tuple[tuple[float, float], ...] | None = None
    max_questions: int | None = None
    min_answers: int = 3
    reuse_parent_answers: bool = True

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.n_s) or self.n_s < 1:
            raise ValueError(f"n_s must be an integer >= 1, got {self.n_s!r}")
        for name in ("k_a", "k_iou", "k_pa", "k_pr", "error_rate", "prior_strength"):
            if not _is_real(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not 0.5 < self.k_a <= 1.0:
            raise ValueError(f"k_a must satisfy 0.5 < k_a <= 1, got {self.k_a!r}")
        if not 0.0 < self.k_iou <= 1.0:
            raise ValueError(f"k_iou must satisfy 0 < k_iou <= 1, got {self.k_iou!r}")
        if self.k_pr > self.k_pa:
            raise ValueError(f"k_pr must be <= k_pa, got k_pr={self.k_pr!r} > k_pa={self.k_pa!r}")
        if self.small_clusters not in SMALL_CLUSTER_MODES:
            raise ValueError(
                f"small_clusters must be one of {SMALL_CLUSTER_MODES}, got {self.small_clusters!r}"
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not 0.0 < self.error_rate < 0.5:
            raise ValueError(f"error_rate must satisfy 0 < error_rate < 0.5, got {self.error_rate}")
        if self.prior_strength <= 0:
            raise ValueError(f"prior_strength must be > 0, got {self.prior_strength!r}")
        if self.max_questions is not None and (
            not _is_int(self.max_questions) or self.max_questions < 1
        ):
            raise ValueError(
                f"max_questions must be None or an integer >= 1, got {self.max_questions!r}"
            )
        if not _is_int(self.min_answers) or self.min_answers < 1:
            raise ValueError(f"min_answers must be an integer >= 1, got {self.min_answers!r}")
        if not isinstance(self.reuse_parent_answers, bool):
            raise ValueError(
                f"reuse_parent_answers must be a bool, got {self.reuse_parent_answers!r}"
            )
        if self.variant == "sequential" and self.k_a >= 1.0:
            # P(Q >= 1) is 0 under any Beta posterior: the test could only ever split.
            raise ValueError("k_a must be < 1 for the sequential variant")
        if self.prior_map is not None:
            object.__setattr__(self, "prior_map", _validate_prior_map(self.prior_map))

    @property
    def sequential_cap(self) -> int:
        """Answers after which the sequential variant falls back to the paper rule."""
        return self.max_questions if self.max_questions is not None else self.n_s

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyParams:
        """Build validated params from JSON-like data; unknown keys and bad values raise."""
        if not isinstance(data, Mapping):
            raise ValueError(f"policy params must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown policy parameter(s): {', '.join(map(str, unknown))}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``from_dict(p.to_dict()) == p``."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.prior_map is not None:
            out["prior_map"] = [list(knot) for knot in self.prior_map]
        return out


def _validate_prior_map(knots: Any) -> tuple[tuple[float, float], ...]:
    if isinstance(knots, str | bytes) or not isinstance(knots, Iterable):
        raise ValueError("prior_map must be a sequence of (S, E[Q]) pairs")
    out: list[tuple[float, float]] = []
    for knot in knots:
        try:
            s, q = knot
        except (TypeError, ValueError):
            raise ValueError(f"prior_map entries must be (S, E[Q]) pairs, got {knot!r}") from None
        if not (_is_real(s) and _is_real(q)):
            raise ValueError(f"prior_map entries must be finite numbers, got {knot!r}")
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"prior_map E[Q] values must lie in [0, 1], got {q!r}")
        out.append((float(s), float(q)))
    if not out:
        raise ValueError("prior_map must hold at least one (S, E[Q]) pair")
    if any(b[0] <= a[0] for a, b in pairwise(out)):
        raise ValueError("prior_map S values must be strictly increasing")
    return tuple(out)


@dataclass(frozen=True)
class Decision:
    """Outcome of :func:`decide`. ``more`` > 0 only for ``ASK``: answers to request now."""

    action: Action
    more: int = 0


# --------------------------------------------------------------------------------------------
# exact thresholds


@lru_cache(maxsize=64)
def _ka_fraction(k_a: float) -> tuple[int, int]:
    """``K_a`` as the fraction the user meant: the shortest decimal that round-trips."""
    frac = Fraction(repr(float(k_a)))
    return frac.numerator, frac.denominator


def _need(n: int, k_a: float) -> int:
    """Smallest count c with ``c / n >= K_a``, in exact integer arithmetic (``ceil(n K_a)``)."""
    num, den = _ka_fraction(k_a)
    return -((-num * n) // den)


def threshold_action(yes: int, no: int, size: int, params: PolicyParams) -> Action:
    """The paper's decision on the answers in hand (at least one).

    Accept iff ``yes / n >= K_a``; reject iff ``yes / n <= 1 - K_a``, i.e. ``no / n >= K_a``;
    otherwise split. Both tests use the same exact count ``ceil(n K_a)``; since ``K_a > 0.5``
    they can never both hold. A single mask cannot be split: a size-1 cluster is accepted or
    rejected on its answers (with ``K_a > 0.5`` its one answer always settles it).
    """
    n = yes + no
    if n < 1:
        raise ValueError("threshold_action needs at least one answer")
    need = _need(n, params.k_a)
    if yes >= need:
        return Action.ACCEPT
    if no >= need:
        return Action.REJECT
    if size == 1:
        return Action.ACCEPT if yes > no else Action.REJECT
    return Action.SPLIT


# --------------------------------------------------------------------------------------------
# automatic rules


def auto_action(score: float, size: int, params: PolicyParams) -> Action | None:
    """The rules that depend only on ``(S, size)``; ``None`` means humans are needed.

    Because these rules ignore answers, the nodes a human could ever be asked about are known as
    soon as the tree is built (the live service only creates rows for those).
    """
    _check_score_size(score, size)
    if score <= params.k_pr:
        return Action.AUTO_REJECT
    if score <= params.k_pa:
        return Action.AUTO_SPLIT if size > params.n_s else Action.AUTO_REJECT
    if size < params.n_s and params.small_clusters == "skip":
        return Action.SKIP
    return None


def auto_action_codes(scores: np.ndarray, sizes: np.ndarray, params: PolicyParams) -> np.ndarray:
    """Vectorised :func:`auto_action` for whole trees: int8 codes into ``AUTO_CODE_ACTIONS``."""
    s = np.asarray(scores, dtype=np.float64)
    z = np.asarray(sizes)
    if s.shape != z.shape or s.ndim != 1:
        raise ValueError(f"scores and sizes must be 1-D of equal length, got {s.shape}, {z.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if z.size and (not np.issubdtype(z.dtype, np.integer) or z.min() < 1):
        raise ValueError("sizes must be integers >= 1")
    codes = np.zeros(s.shape, dtype=np.int8)
    low = s <= params.k_pa
    codes[low] = np.where(z[low] > params.n_s, _CODE_AUTO_SPLIT, _CODE_AUTO_REJECT)
    codes[s <= params.k_pr] = _CODE_AUTO_REJECT
    if params.small_clusters == "skip":
        codes[~low & (z < params.n_s)] = _CODE_SKIP
    return codes


def _check_score_size(score: float, size: int) -> None:
    if not _is_real(score):
        raise ValueError(f"cluster score must be a finite number, got {score!r}")
    if not _is_int(size) or size < 1:
        raise ValueError(f"cluster size must be an integer >= 1, got {size!r}")


# --------------------------------------------------------------------------------------------
# the decision


def plan_length(size: int, params: PolicyParams) -> int:
    """How many distinct masks of a cluster the variant may ask about at most.

    ``paper``/``curtailed``: ``min(N_s, size)``; ``sequential``: ``min(cap, size)``. The runner
    draws this many sample positions up front (asking only as many as needed), which keeps the
    random stream identical across ``paper`` and ``curtailed`` runs.
    """
    cap = params.sequential_cap if params.variant == "sequential" else params.n_s
    return min(cap, size)


def decide(score: float, size: int, yes: int, no: int, params: PolicyParams) -> Decision:
    """Decide what happens to a cluster with score ``S``, ``size`` masks and answers so far.

    ``yes``/``no`` count answers about distinct masks of the cluster (answers inherited from the
    parent count, see ``reuse_parent_answers``). Pure function: the same inputs always give the
    same decision, so the live service may call it again after every batch of answers.
    """
    auto = auto_action(score, size, params)
    if not (_is_int(yes) and _is_int(no)) or yes < 0 or no < 0:
        raise ValueError(f"answer counts must be integers >= 0, got yes={yes!r}, no={no!r}")
    if yes + no > size:
        raise ValueError(f"{yes + no} answers exceed the cluster size {size}")
    if auto is not None:
        return Decision(auto)
    if params.variant == "paper":
        return _decide_paper(yes, no, size, params)
    if params.variant == "curtailed":
        return _decide_curtailed(yes, no, size, params)
    return _decide_sequential(score, yes, no, size, params)


def _decide_paper(yes: int, no: int, size: int, params: PolicyParams) -> Decision:
    target = plan_length(size, params)
    n = yes + no
    if n < target:
        return Decision(Action.ASK, target - n)
    return Decision(threshold_action(yes, no, size, params))


def _decide_curtailed(yes: int, no: int, size: int, params: PolicyParams) -> Decision:
    """Stop once every continuation to ``N_s`` answers gives the same paper decision.

    With ``r`` answers still to come and ``need = ceil(T K_a)`` for the paper's ``T`` answers:
    accept is certain once ``yes >= need``, reject once ``no >= need`` (counts only grow), and
    split once ``max(yes, no) + r < need`` (neither side can reach ``need`` any more).
    """
    target = plan_length(size, params)
    n = yes + no
    if n >= target:
        return Decision(threshold_action(yes, no, size, params))
    remaining = target - n
    need = _need(target, params.k_a)
    if yes >= need:
        return Decision(Action.ACCEPT)
    if no >= need:
        return Decision(Action.REJECT)
    if max(yes, no) + remaining < need:
        return Decision(Action.SPLIT)
    return Decision(Action.ASK, _curtailed_more(yes, no, remaining, need))


def _curtailed_more(yes: int, no: int, remaining: int, need: int) -> int:
    """Fewest further answers after which the decision could be settled (for some answers)."""
    candidates = [remaining]
    if need - yes <= remaining:
        candidates.append(need - yes)  # all yes -> accept
    if need - no <= remaining:
        candidates.append(need - no)  # all no -> reject
    n = yes + no
    larger = max(yes, no)
    for k in range(1, remaining + 1):
        # The most balanced split of k more answers minimises max(yes', no'); split is settled
        # when even the larger side plus everything still to come stays under ``need``.
        if max(larger, -(-(n + k) // 2)) + remaining - k < need:
            candidates.append(k)
            break
    return min(candidates)


# --------------------------------------------------------------------------------------------
# sequential variant


def prior_mean(score: float | np.ndarray, params: PolicyParams) -> float | np.ndarray:
    """``E[Q | S]`` for the sequential prior: the calibrated map (or identity), clipped."""
    if params.prior_map is None and isinstance(score, float | int):
        return min(max(float(score), PRIOR_MEAN_CLIP[0]), PRIOR_MEAN_CLIP[1])
    s = np.asarray(score, dtype=np.float64)
    if params.prior_map is None:
        m = s
    else:
        xs = np.array([k[0] for k in params.prior_map])
        ys = np.array([k[1] for k in params.prior_map])
        m = np.interp(s, xs, ys)
    out = np.clip(m, *PRIOR_MEAN_CLIP)
    return float(out) if out.ndim == 0 else out


def posterior_probabilities(
    score: float, yes: int | np.ndarray, no: int | np.ndarray, params: PolicyParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(P(Q >= K_a), P(Q <= 1-K_a), P(1-K_a < Q < K_a))`` under the Beta posterior.

    The Beta models the quality of the population the cluster's masks are drawn from; for a
    finite cluster it overstates the uncertainty a little (sampling is without replacement),
    which only makes the test ask more, never decide riskier.
    """
    m = prior_mean(score, params)
    a = m * params.prior_strength + np.asarray(yes, dtype=np.float64)
    b = (1.0 - m) * params.prior_strength + np.asarray(no, dtype=np.float64)
    p_accept = betaincc(a, b, params.k_a)
    p_reject = betainc(a, b, 1.0 - params.k_a)
    p_split = np.clip(1.0 - p_accept - p_reject, 0.0, 1.0)
    return p_accept, p_reject, p_split


def _verdict(a: float, b: float, params: PolicyParams) -> Action | None:
    """The sequential test on a ``Beta(a, b)`` posterior (scalar: the runner's hot path)."""
    level = 1.0 - params.error_rate
    p_accept = float(betaincc(a, b, params.k_a))
    if p_accept >= level:
        return Action.ACCEPT
    p_reject = float(betainc(a, b, 1.0 - params.k_a))
    if p_reject >= level:
        return Action.REJECT
    # error_rate < 0.5, so at most one of the three probabilities can reach the level.
    if 1.0 - p_accept - p_reject >= level:
        return Action.SPLIT
    return None


def _could_settle(a: float, b: float, k: int, params: PolicyParams) -> bool:
    """Whether some split of ``k`` more answers into yes/no would end the test.

    Only three candidates need checking: ``P(Q >= K_a)`` grows with every yes, so if any split
    accepts, all-yes does; likewise all-no for reject; and the mass of the symmetric interval
    ``(1-K_a, K_a)`` is largest when the posterior is most balanced, i.e. ``a + j`` closest to
    ``b + k - j``.
    """
    if _verdict(a + k, b, params) is not None or _verdict(a, b + k, params) is not None:
        return True
    centre = (b + k - a) / 2.0
    for j in {min(max(math.floor(centre), 0), k), min(max(math.ceil(centre), 0), k)}:
        if _verdict(a + j, b + k - j, params) is not None:
            return True
    return False


def _decide_sequential(
    score: float, yes: int, no: int, size: int, params: PolicyParams
) -> Decision:
    n = yes + no
    if n >= size or n >= params.sequential_cap:
        # All masks answered (Q is known exactly) or the cap reached: the paper rule.
        return Decision(threshold_action(yes, no, size, params))
    m = float(prior_mean(score, params))
    a = m * params.prior_strength + yes
    b = (1.0 - m) * params.prior_strength + no
    floor = min(params.min_answers, size)
    if n >= floor:
        verdict = _verdict(a, b, params)
        if verdict is not None:
            return Decision(verdict)
    remaining = min(params.sequential_cap, size) - n
    batch = min(SEQUENTIAL_BATCH, remaining)
    # The smallest k in [start, batch) after which some answers could end the test; otherwise a
    # full batch (which may end at the cap or at the size of the cluster).
    for k in range(max(1, floor - n), batch):
        if _could_settle(a, b, k, params):
            return Decision(Action.ASK, k)
    return Decision(Action.ASK, batch)


# --------------------------------------------------------------------------------------------
# sampling


def sample_positions(
    lo: int, hi: int, k: int, rng: np.random.Generator, exclude: Iterable[int] = ()
) -> np.ndarray:
    """``k`` distinct leaf positions drawn uniformly from ``[lo, hi)`` minus ``exclude``.

    Returned in random order as int64. Cost is O(k + |exclude|) for large ranges (rejection
    sampling of integers) and O(hi - lo) only when ``k`` is a sizeable share of the range, so
    sampling 15 masks of a million-mask cluster is as cheap as of a small one.
    """
    if not (_is_int(lo) and _is_int(hi) and _is_int(k)):
        raise ValueError(f"lo, hi and k must be integers, got {lo!r}, {hi!r}, {k!r}")
    lo, hi, k = int(lo), int(hi), int(k)
    if lo < 0 or hi < lo:
        raise ValueError(f"invalid range [{lo}, {hi})")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    excluded = {int(p) for p in exclude if lo <= int(p) < hi}
    available = hi - lo - len(excluded)
    if k > available:
        raise ValueError(f"cannot sample {k} distinct positions from {available} available")
    if k == 0:
        return np.empty(0, dtype=np.int64)
    if available <= 4 * k:
        # Dense case (the range is a few times k at most): permute the available positions.
        pick = rng.permutation(available)[:k]
        if not excluded:
            return pick.astype(np.int64) + lo
        pool = np.array([p for p in range(lo, hi) if p not in excluded], dtype=np.int64)
        return pool[pick]
    # Sparse case: draw with replacement and drop repeats / excluded positions in draw order.
    # The first k distinct survivors are a uniform ordered sample without replacement.
    chosen: list[int] = []
    seen = set(excluded)
    while len(chosen) < k:
        missing = k - len(chosen)
        for p in rng.integers(lo, hi, size=2 * missing + 4).tolist():
            if p not in seen:
                seen.add(p)
                chosen.append(p)
                if len(chosen) == k:
                    break
    return np.asarray(chosen, dtype=np.int64)
