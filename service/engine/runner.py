"""Algorithm 1 of the paper over a :class:`~service.engine.tree.ClusterTree`, state in numpy.

This is the simulator's (and the benchmarks') engine. It drives exactly the policy
(:func:`service.engine.policy.decide`) and frontier (:mod:`service.engine.search`) the live
service uses; only where the answers come from differs (an ``oracle`` callable instead of crowd
workers), so simulated runs predict live ones.

Per popped cluster the work is O(log frontier) plus O(answers) -- never O(cluster size): scores
come from the tree's prefix sums (vectorised once for all nodes), the automatic rules are
evaluated for all nodes in one vectorised pass, and samples are drawn with
:func:`~service.engine.policy.sample_positions`. A 10^6-leaf tree runs in seconds.

Sampling plan. When a cluster is first asked about, the runner draws its whole *plan*: the
positions it may ask about (``plan_length``: ``N_s`` for the paper and curtailed variants), in
random order, and asks a prefix of it in batches of ``Decision.more``. When a cluster splits,
each child inherits the part of the parent's plan inside its range, in the same order, answered
positions first (``reuse_parent_answers``); these are uniform samples of the child, and the
answered ones cost nothing. Because the plan is drawn before any answer is seen, the paper and
curtailed variants consume the random stream identically, so with the same seed and a
deterministic oracle they take identical decisions -- curtailed just asks fewer questions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.engine.metrics import accepted_leaf_mask
from service.engine.policy import (
    AUTO_CODE_ACTIONS,
    Action,
    PolicyParams,
    auto_action_codes,
    decide,
    plan_length,
    sample_positions,
)
from service.engine.search import make_frontier

__all__ = ["Oracle", "RunResult", "run_search"]

#: ``oracle(leaf_positions int64[k]) -> bool[k]``: one answer per position (True = correct).
Oracle = Callable[[np.ndarray], Any]

# int8 codes of ``auto_action_codes`` (positions in ``AUTO_CODE_ACTIONS``).
_AUTO_REJECT = AUTO_CODE_ACTIONS.index(Action.AUTO_REJECT)
_AUTO_SPLIT = AUTO_CODE_ACTIONS.index(Action.AUTO_SPLIT)
_SKIP = AUTO_CODE_ACTIONS.index(Action.SKIP)

_EMPTY_RANGES = np.zeros((0, 2), dtype=np.int64)


@dataclass(frozen=True, eq=False)
class RunResult:
    """Outcome of :func:`run_search`.

    Range arrays are int64[m, 2] rows ``(lo, hi)`` of leaf positions, in decision order.
    ``trace`` is int64[d, 2]: after each cluster's final decision (auto ones included), the
    cumulative number of questions and of accepted masks -- the paper's quantity-vs-cost curve.
    ``node_actions`` maps every popped node to its final action; a node left undecided when the
    question budget ran out is recorded as ``Action.ASK``. ``stopped`` is ``"frontier_empty"``
    or ``"budget"``; ``frontier_left`` counts candidates never popped.
    """

    accepted: np.ndarray
    rejected: np.ndarray
    auto_rejected: np.ndarray
    skipped: np.ndarray
    node_actions: dict[int, Action]
    questions: int
    trace: np.ndarray
    stopped: str
    frontier_left: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def accepted_masks(self) -> int:
        """Number of masks in accepted clusters (the paper's annotation quantity)."""
        return int((self.accepted[:, 1] - self.accepted[:, 0]).sum())

    def accepted_leaf_mask(self, n: int) -> np.ndarray:
        """bool[n]: True at leaf positions inside an accepted cluster."""
        return accepted_leaf_mask(n, self.accepted)


@dataclass
class _Plan:
    """Sample positions of one cluster; the first ``len(answers)`` of them are answered.

    Plain lists: a plan holds a few dozen entries at most, where numpy's per-call overhead
    would dominate the runner's time.
    """

    positions: list[int] = field(default_factory=list)
    answers: list[bool] = field(default_factory=list)


def _child_plan(plan: _Plan, lo: int, hi: int) -> _Plan | None:
    """The part of ``plan`` inside ``[lo, hi)``, order kept (answered positions stay first)."""
    n_answered = len(plan.answers)
    child = _Plan()
    for i, p in enumerate(plan.positions):
        if lo <= p < hi:
            child.positions.append(p)
            if i < n_answered:
                child.answers.append(plan.answers[i])
    return child if child.positions else None


def _extend_plan(plan: _Plan, lo: int, hi: int, length: int, rng: np.random.Generator) -> None:
    """Append fresh uniform samples of ``[lo, hi)`` until the plan holds ``length`` positions."""
    missing = length - len(plan.positions)
    if missing > 0:
        fresh = sample_positions(lo, hi, missing, rng, exclude=plan.positions)
        plan.positions.extend(fresh.tolist())


def _check_tree(tree: Any) -> None:
    for name in ("lo", "hi", "left", "right", "size", "score_prefix"):
        if not hasattr(tree, name):
            raise ValueError(f"tree must be a ClusterTree (missing {name!r})")


def _ask(oracle: Oracle, positions: np.ndarray) -> np.ndarray:
    raw = np.asarray(oracle(positions))
    if raw.shape != positions.shape:
        raise ValueError(
            f"oracle returned shape {raw.shape} for {positions.shape[0]} positions; "
            "it must return one boolean per position"
        )
    if raw.dtype == np.bool_:
        return raw
    if raw.dtype.kind not in "biu" or not np.isin(raw, (0, 1)).all():
        raise ValueError("oracle answers must be booleans (or 0/1)")
    return raw.astype(bool)


def run_search(
    tree: Any,
    oracle: Oracle,
    params: PolicyParams,
    *,
    search: str = "best_first",
    max_questions: int | None = None,
    rng: np.random.Generator,
) -> RunResult:
    """Run the search-annotate-propagate loop (Algorithm 1) until the frontier empties.

    ``max_questions`` is the campaign budget in questions (``None``: unlimited); the run stops
    when it is spent, leaving the current cluster undecided (``Action.ASK``) if it still needed
    answers, and never asks more than the budget. Deterministic for a given ``rng`` state and a
    deterministic oracle.
    """
    _check_tree(tree)
    if not isinstance(params, PolicyParams):
        raise ValueError(f"params must be a PolicyParams, got {type(params).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator")
    if max_questions is not None and (
        isinstance(max_questions, bool) or not isinstance(max_questions, int) or max_questions < 0
    ):
        raise ValueError(f"max_questions must be None or an integer >= 0, got {max_questions!r}")
    if not callable(oracle):
        raise ValueError("oracle must be callable")
    frontier = make_frontier(search)

    n_nodes = int(tree.size.shape[0])
    accepted: list[int] = []
    rejected: list[int] = []
    auto_rejected: list[int] = []
    skipped: list[int] = []
    actions: dict[int, Action] = {}
    trace_q: list[int] = []
    trace_a: list[int] = []
    if n_nodes == 0:
        return _result(
            tree,
            accepted,
            rejected,
            auto_rejected,
            skipped,
            actions,
            0,
            [],
            [],
            "frontier_empty",
            0,
        )

    # Hot loop: bound methods and Python scalars (``ndarray.item``), no per-node numpy calls
    # beyond the oracle's; visiting ~10^5 clusters must take about a second.
    lo_of, hi_of = tree.lo.item, tree.hi.item
    left_of, right_of = tree.left.item, tree.right.item
    scores = np.asarray(tree.node_scores(), dtype=np.float64)
    score_of = scores.item
    codes = auto_action_codes(scores, tree.size, params).tobytes()
    reuse = params.reuse_parent_answers
    carried: dict[int, _Plan] = {}
    push, pop = frontier.push, frontier.pop

    questions = 0
    accepted_masks = 0
    stopped = "frontier_empty"
    root = n_nodes - 1
    push(root, score_of(root))

    def push_children(node: int, plan: _Plan | None) -> None:
        for child in (left_of(node), right_of(node)):
            if plan is not None and plan.positions:
                sub = _child_plan(plan, lo_of(child), hi_of(child))
                if sub is not None:
                    carried[child] = sub
            push(child, score_of(child))

    while frontier:
        node = pop()
        inherited = carried.pop(node, None)
        code = codes[node]
        if code == _AUTO_REJECT:
            actions[node] = Action.AUTO_REJECT
            auto_rejected.append(node)
        elif code == _AUTO_SPLIT:
            actions[node] = Action.AUTO_SPLIT
            push_children(node, inherited if reuse else None)
        elif code == _SKIP:
            actions[node] = Action.SKIP
            skipped.append(node)
        else:
            lo, hi = lo_of(node), hi_of(node)
            size = hi - lo
            score = score_of(node)
            plan = inherited if (reuse and inherited is not None) else _Plan()
            # Draw the whole plan before looking at any answer, even if the inherited answers
            # already settle the cluster: the random stream must not depend on the variant.
            _extend_plan(plan, lo, hi, plan_length(size, params), rng)
            yes = sum(plan.answers)
            no = len(plan.answers) - yes
            while True:
                decision = decide(score, size, yes, no, params)
                if decision.action is not Action.ASK:
                    break
                k = decision.more
                if max_questions is not None:
                    k = min(k, max_questions - questions)
                    if k <= 0:
                        break
                answered = len(plan.answers)
                _extend_plan(plan, lo, hi, answered + k, rng)
                batch = np.array(plan.positions[answered : answered + k], dtype=np.int64)
                answers = _ask(oracle, batch).tolist()
                plan.answers.extend(answers)
                got = sum(answers)
                yes += got
                no += k - got
                questions += k
            action = decision.action
            actions[node] = action
            if action is Action.ASK:
                stopped = "budget"
                break
            if action is Action.ACCEPT:
                accepted.append(node)
                accepted_masks += size
            elif action is Action.REJECT:
                rejected.append(node)
            else:  # SPLIT (the policy never splits a single mask)
                push_children(node, plan if reuse else None)
        trace_q.append(questions)
        trace_a.append(accepted_masks)
    return _result(
        tree,
        accepted,
        rejected,
        auto_rejected,
        skipped,
        actions,
        questions,
        trace_q,
        trace_a,
        stopped,
        len(frontier),
    )


def _ranges(tree: Any, nodes: list[int]) -> np.ndarray:
    if not nodes:
        return _EMPTY_RANGES.copy()
    ids = np.asarray(nodes, dtype=np.int64)
    return np.stack([tree.lo[ids], tree.hi[ids]], axis=1).astype(np.int64)


def _result(
    tree: Any,
    accepted: list[int],
    rejected: list[int],
    auto_rejected: list[int],
    skipped: list[int],
    actions: dict[int, Action],
    questions: int,
    trace_q: list[int],
    trace_a: list[int],
    stopped: str,
    frontier_left: int,
) -> RunResult:
    counts: dict[str, int] = {a.value: 0 for a in Action}
    for action in actions.values():
        counts[action.value] += 1
    trace = np.array([trace_q, trace_a], dtype=np.int64).T.reshape(-1, 2)
    return RunResult(
        accepted=_ranges(tree, accepted),
        rejected=_ranges(tree, rejected),
        auto_rejected=_ranges(tree, auto_rejected),
        skipped=_ranges(tree, skipped),
        node_actions=actions,
        questions=questions,
        trace=trace,
        stopped=stopped,
        frontier_left=frontier_left,
        counts=counts,
    )
