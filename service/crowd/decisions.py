"""From answers to decisions: aggregate a HIT's answers, count them into clusters, apply the policy.

One cluster's life (``ClusterState``): ``pending`` rows wait for their parent to split; a split
*activates* the children (automatic rules first, then ``candidate``); the HIT builder takes
candidates and marks them ``active`` while their questions are out; when answers are counted,
:func:`service.engine.policy.decide` says accept / reject / split, or asks for more (the cluster
goes back to ``candidate`` once none of its questions is still open).

The same ``decide`` drives the simulator (:mod:`service.engine.runner`), so for the same answers the
live service reaches the same accepted and rejected ranges; ``tests/crowd`` checks exactly that.

Counting rule (kept consistent everywhere): a cluster's ``yes_count``/``no_count`` are the labels of
*answered* sample questions at distinct leaf positions of its range -- its own, plus, with
``reuse_parent_answers``, those of its ancestors (inherited when it was activated). A question is
``answered`` once its HIT is complete and its valid (non-discarded) answers agree on a label; answers
that lose a redundant vote are discarded with the reason, so "the non-discarded answers of an answered
question" always carry its label. ``open_questions`` is the number of its sample questions still
``open``: every statement that opens or closes questions moves it by the same amount, so a count delta
is ``(yes, no, closed)``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.orm import Session

from service.crowd import answers as stored_answers
from service.crowd import questions as hit_questions
from service.engine.policy import Action, PolicyParams, auto_action, decide
from service.models import (
    Cluster,
    ClusterState,
    QuestionKind,
    QuestionStatus,
)

__all__ = [
    "STATE_OF_ACTION",
    "ClusterRow",
    "Counts",
    "QuestionVotes",
    "Vote",
    "activate_children",
    "aggregate_hit",
    "ancestors",
    "closed_counts",
    "dawid_skene",
    "discard_answers",
    "hit_votes",
    "lock_clusters",
    "majority",
    "merge_counts",
    "next_state",
    "settle",
    "zero_counts",
]

_CL = Cluster.__table__

#: Where each policy action leaves a cluster.
STATE_OF_ACTION: dict[Action, ClusterState] = {
    Action.ACCEPT: ClusterState.ACCEPTED,
    Action.REJECT: ClusterState.REJECTED,
    Action.SPLIT: ClusterState.SPLIT,
    Action.AUTO_REJECT: ClusterState.AUTO_REJECTED,
    Action.AUTO_SPLIT: ClusterState.AUTO_SPLIT,
    Action.SKIP: ClusterState.SKIPPED,
}
UNDECIDED = (ClusterState.CANDIDATE, ClusterState.ACTIVE)
_SPLITS = (ClusterState.SPLIT, ClusterState.AUTO_SPLIT)

#: ``cluster id -> (yes delta, no delta, questions closed)``
Counts = dict[int, tuple[int, int, int]]

#: The cluster columns every crowd module reads (the order ``ClusterRow`` expects).
CLUSTER_COLUMNS = (
    _CL.c.id,
    _CL.c.tree_id,
    _CL.c.parent_id,
    _CL.c.lo,
    _CL.c.hi,
    _CL.c.size,
    _CL.c.score,
    _CL.c.state,
    _CL.c.yes_count,
    _CL.c.no_count,
    _CL.c.open_questions,
)

_WRITE_BACK = (
    update(_CL)
    .where(_CL.c.id == bindparam("cid"))
    .values(
        state=bindparam("new_state"),
        yes_count=bindparam("yes"),
        no_count=bindparam("no"),
        open_questions=bindparam("open"),
        decided_at=bindparam("decided"),
    )
)


@dataclass
class ClusterRow:
    id: int
    tree_id: int
    parent_id: int | None
    lo: int
    hi: int
    size: int
    score: float
    state: ClusterState
    yes: int
    no: int
    open: int  # sample questions still out in HITs

    @classmethod
    def of(cls, row: Sequence) -> ClusterRow:
        """From a row of ``(id, tree_id, parent_id, lo, hi, size, score, state, yes, no, open)``."""
        return cls(
            int(row[0]),
            int(row[1]),
            row[2],
            int(row[3]),
            int(row[4]),
            int(row[5]),
            float(row[6]),
            ClusterState(row[7]),
            int(row[8]),
            int(row[9]),
            int(row[10]),
        )


# --------------------------------------------------------------------------------- aggregation


def majority(values: Sequence[bool]) -> bool | None:
    """The majority label, ``None`` on a tie (the question is re-asked rather than guessed)."""
    yes = sum(1 for v in values if v)
    no = len(values) - yes
    if yes == no:
        return None
    return yes > no


def dawid_skene(
    answers: Iterable[tuple[int, int, bool]],
    known: Mapping[int, bool] | None = None,
    *,
    iterations: int = 50,
    tol: float = 1e-6,
) -> dict[int, float]:
    """Posterior ``P(label = yes)`` per item by Dawid & Skene's EM over worker confusion matrices.

    ``answers`` are ``(item, worker, value)`` triples; ``known`` items (gold) are clamped to their
    true label, which anchors each worker's sensitivity and specificity. Binary labels, so a
    worker's confusion matrix is two numbers; they and the class prior are smoothed by one pseudo
    count each way, so a worker seen on a single item cannot become infinitely trusted.
    """
    known = dict(known or {})
    by_item: dict[int, list[tuple[int, bool]]] = defaultdict(list)
    for item, worker, value in answers:
        by_item[item].append((worker, bool(value)))
    items = sorted(by_item)
    post = {}
    for item in items:
        if item in known:
            post[item] = 1.0 if known[item] else 0.0
        else:
            votes = by_item[item]
            post[item] = sum(v for _, v in votes) / len(votes)
    for _ in range(iterations):
        sens, spec, prior = _ds_m_step(by_item, post)
        changed = 0.0
        for item in items:
            if item in known:
                continue
            logit = math.log(prior / (1.0 - prior))
            for worker, value in by_item[item]:
                a, b = sens[worker], spec[worker]
                logit += math.log(a / (1.0 - b)) if value else math.log((1.0 - a) / b)
            new = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, logit))))
            changed = max(changed, abs(new - post[item]))
            post[item] = new
        if changed < tol:
            break
    return post


def _ds_m_step(
    by_item: Mapping[int, list[tuple[int, bool]]], post: Mapping[int, float]
) -> tuple[dict[int, float], dict[int, float], float]:
    """Sensitivity, specificity per worker and the prior of "yes", from soft labels."""
    yes_said_yes: dict[int, float] = defaultdict(lambda: 1.0)
    yes_total: dict[int, float] = defaultdict(lambda: 2.0)
    no_said_no: dict[int, float] = defaultdict(lambda: 1.0)
    no_total: dict[int, float] = defaultdict(lambda: 2.0)
    for item, votes in by_item.items():
        p = post[item]
        for worker, value in votes:
            yes_total[worker] += p
            no_total[worker] += 1.0 - p
            if value:
                yes_said_yes[worker] += p
            else:
                no_said_no[worker] += 1.0 - p
    sens = {w: yes_said_yes[w] / yes_total[w] for w in yes_total}
    spec = {w: no_said_no[w] / no_total[w] for w in no_total}
    prior = (sum(post.values()) + 1.0) / (len(post) + 2.0)
    return sens, spec, prior


@dataclass(frozen=True)
class Vote:
    worker_id: int
    value: bool
    assignment_id: int
    ms: int


@dataclass
class QuestionVotes:
    cluster_id: int | None
    kind: QuestionKind
    expected: bool | None
    votes: list[Vote]


def hit_votes(session: Session, hit_id: int) -> dict[int, QuestionVotes]:
    """The still-open questions of a HIT with their valid (non-discarded) answers, from every
    assignment of the HIT.

    Quality control reads its per-assignment gold score and speed from the same votes, so a HIT's
    completion costs one read of its answers.
    """
    questions = [
        q
        for q in hit_questions.of_hits(session, [hit_id]).get(hit_id, [])
        if q.status is QuestionStatus.OPEN
    ]
    expected = hit_questions.expected_answers(session, questions)
    out = {q.id: QuestionVotes(q.cluster_id, q.kind, expected.get(q.id), []) for q in questions}
    for assignment in stored_answers.of_hits(session, [hit_id]):
        for answer in assignment.answers.valid():
            entry = out.get(answer.question_id)
            if entry is not None:
                entry.votes.append(
                    Vote(assignment.worker_id, answer.value, assignment.assignment_id, answer.ms)
                )
    return out


def _labels(votes: Mapping[int, QuestionVotes], method: str) -> dict[int, bool | None]:
    """A label (or ``None``: no usable answer) for every sample question of the HIT."""
    samples = {q: v for q, v in votes.items() if v.kind is QuestionKind.SAMPLE}
    if method == "dawid_skene" and any(len(v.votes) > 1 for v in samples.values()):
        triples = [(q, x.worker_id, x.value) for q, v in votes.items() for x in v.votes]
        known = {
            q: bool(v.expected)
            for q, v in votes.items()
            if v.kind is QuestionKind.GOLD and v.expected is not None
        }
        post = dawid_skene(triples, known)
        return {
            q: (None if not v.votes or post[q] == 0.5 else post[q] > 0.5)
            for q, v in samples.items()
        }
    return {q: majority([x.value for x in v.votes]) for q, v in samples.items()}


def aggregate_hit(
    session: Session,
    hit_id: int,
    method: str = "majority",
    votes: Mapping[int, QuestionVotes] | None = None,
) -> Counts:
    """Close a completed HIT's questions and return the count deltas for their clusters.

    Every sample question of the HIT ends ``answered`` (its answers agree on a label, losers of a
    redundant vote discarded with the reason) or ``discarded`` (no usable answer: it will be
    re-asked, because its cluster asks for more); either way it is closed. Every cluster touched
    appears in the result, so the caller settles it (e.g. back to ``candidate``).
    ``votes`` may be passed if already read (and still current) in this transaction.
    """
    votes = hit_votes(session, hit_id) if votes is None else votes
    labels = _labels(votes, method)
    answered: list[int] = [q for q, v in votes.items() if v.kind is not QuestionKind.SAMPLE]
    dropped: list[int] = []
    outvoted: dict[int, set[int]] = defaultdict(set)  # assignment -> its losing questions
    deltas: Counts = {}
    for qid, label in labels.items():
        entry = votes[qid]
        cid = int(entry.cluster_id)  # sample questions always have a cluster (DB check)
        yes, no, closed = deltas.get(cid, (0, 0, 0))
        if label is None:
            dropped.append(qid)
            for x in entry.votes:
                outvoted[x.assignment_id].add(qid)
        else:
            answered.append(qid)
            for x in entry.votes:
                if x.value != label:
                    outvoted[x.assignment_id].add(qid)
            yes, no = (yes + 1, no) if label else (yes, no + 1)
        deltas[cid] = (yes, no, closed + 1)
    _set_status(session, answered, QuestionStatus.ANSWERED)
    _set_status(session, dropped, QuestionStatus.DISCARDED)
    if outvoted:
        discard_answers(session, outvoted, f"outvoted or tied when aggregating by {method}")
    return deltas


def _set_status(session: Session, question_ids: list[int], status: QuestionStatus) -> None:
    if question_ids:
        hit_questions.set_statuses(session, dict.fromkeys(question_ids, status))


def discard_answers(
    session: Session, selection: Mapping[int, Iterable[int] | None], reason: str
) -> None:
    """Discard the valid answers of each assignment to the questions given (``None``: all)."""
    if selection:
        chosen = {a: None if q is None else set(q) for a, q in selection.items()}
        stored_answers.discard(session, chosen, reason)


# -------------------------------------------------------------------------------- settling


_SET_OPEN = update(_CL).where(_CL.c.id == bindparam("cid")).values(open_questions=bindparam("open"))
_LOCK = (
    select(*CLUSTER_COLUMNS)
    .where(_CL.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(_CL.c.id)
    .with_for_update(of=_CL)
)


def lock_clusters(session: Session, cluster_ids: Iterable[int]) -> dict[int, ClusterRow]:
    """Lock clusters in id order (every writer does, so two transactions cannot deadlock on them)."""
    ids = sorted(set(cluster_ids))
    if not ids:
        return {}
    return {row.id: row for row in map(ClusterRow.of, session.execute(_LOCK, {"ids": ids}).all())}


def next_state(cluster: ClusterRow, policy: PolicyParams) -> ClusterState:
    """Where an undecided cluster stands after its counts changed: the policy's decision, or, if
    it asks for more, ``active`` while questions are out and ``candidate`` once none is."""
    decision = decide(cluster.score, cluster.size, cluster.yes, cluster.no, policy)
    if decision.action is Action.ASK:
        return ClusterState.ACTIVE if cluster.open else ClusterState.CANDIDATE
    return STATE_OF_ACTION[decision.action]


def settle(
    session: Session,
    deltas: Mapping[int, tuple[int, int, int]],
    policy: PolicyParams,
    now: datetime,
) -> dict[int, ClusterState]:
    """Add count deltas to clusters and apply the policy's decision to the undecided ones.

    All in the caller's transaction: counts, states, ``decided_at`` and the activation of split
    clusters' children land together. Decided clusters ignore late yes/no deltas (answers that
    arrive after a decision are kept but no longer change it); closed questions are taken off
    every cluster's open count. Returns the new state of every undecided cluster touched
    (children activated by a split included).
    """
    clusters = lock_clusters(session, deltas)
    writes, closes, undecided = [], [], []
    for c in clusters.values():
        dy, dn, closed = deltas[c.id]
        c.open -= closed
        if c.state in UNDECIDED:
            c.yes, c.no = c.yes + dy, c.no + dn
        if c.yes < 0 or c.no < 0 or c.open < 0:
            raise RuntimeError(
                f"cluster {c.id} would have negative counts ({c.yes}, {c.no}, open {c.open})"
            )
        if c.state in UNDECIDED:
            undecided.append(c)
            c.state = next_state(c, policy)
            writes.append(_write(c, None if c.state in UNDECIDED else now))
        elif closed:
            closes.append({"cid": c.id, "open": c.open})
    if writes:
        session.execute(_WRITE_BACK, writes)
    if closes:
        session.execute(_SET_OPEN, closes)
    result = {c.id: c.state for c in undecided}
    result.update(
        activate_children(session, [c for c in undecided if c.state in _SPLITS], policy, now)
    )
    return result


def _write(c: ClusterRow, decided: datetime | None) -> dict:
    return {
        "cid": c.id,
        "new_state": c.state.value,
        "yes": c.yes,
        "no": c.no,
        "open": c.open,
        "decided": decided,
    }


# ------------------------------------------------------------------------------- activation


def ancestors(session: Session | Connection, cluster_ids: Sequence[int]) -> dict[int, list[int]]:
    """Each cluster's ancestor rows, parent first (a recursive walk up ``parent_id``, primary-key
    lookups only). Their questions are then read through each cluster's ``sample_hit_ids``
    (:func:`service.crowd.questions.of_clusters`)."""
    if not cluster_ids:
        return {}
    start = (
        select(_CL.c.id.label("start"), _CL.c.parent_id.label("node"))
        .where(_CL.c.id.in_(list(cluster_ids)), _CL.c.parent_id.is_not(None))
        .cte("chain", recursive=True)
    )
    up = _CL.alias("up")
    chain = start.union_all(
        select(start.c.start, up.c.parent_id)
        .join(up, up.c.id == start.c.node)
        .where(up.c.parent_id.is_not(None))
    )
    out: dict[int, list[int]] = defaultdict(list)
    for begin, node in session.execute(select(chain.c.start, chain.c.node)).all():
        out[int(begin)].append(int(node))
    return dict(out)


def _known_answers(session: Session | Connection, parent: ClusterRow) -> list[tuple[int, bool]]:
    """``(leaf_pos, label)`` of every answered sample question of ``parent`` and its ancestors
    inside ``parent``'s range: what its children may inherit. An answered question's valid
    answers all carry its label (the module docstring's counting rule)."""
    ids = [parent.id, *ancestors(session, [parent.id]).get(parent.id, [])]
    rows = [
        q
        for q in hit_questions.of_clusters(session, ids)
        if q.status is QuestionStatus.ANSWERED and parent.lo <= q.leaf_pos < parent.hi
    ]
    position = {q.id: int(q.leaf_pos) for q in rows}
    labels: dict[int, bool] = {}
    for assignment in stored_answers.of_hits(session, {q.hit_id for q in rows}):
        for answer in assignment.answers.valid():
            pos = position.get(answer.question_id)
            if pos is not None:
                labels[pos] = answer.value
    return list(labels.items())


def _children(
    session: Session | Connection, parents: list[ClusterRow]
) -> dict[int, list[ClusterRow]]:
    """Child rows of ``parents``, locked in id order (``parent_id`` is indexed)."""
    rows = session.execute(_CHILDREN, {"ids": sorted({p.id for p in parents})}).all()
    out: dict[int, list[ClusterRow]] = defaultdict(list)
    for row in rows:
        child = ClusterRow.of(row)
        out[int(child.parent_id)].append(child)
    return out


_CHILDREN = (
    select(*CLUSTER_COLUMNS)
    .where(_CL.c.parent_id.in_(bindparam("ids", expanding=True)))
    .order_by(_CL.c.id)
    .with_for_update()
)


def _activate(
    child: ClusterRow, inherited: list[tuple[int, bool]], policy: PolicyParams
) -> ClusterState:
    """A newly reached node's state: automatic rules, else the policy on inherited answers."""
    auto = auto_action(child.score, child.size, policy)
    if auto is not None:
        child.yes = child.no = 0
        return STATE_OF_ACTION[auto]
    child.yes = sum(1 for _, label in inherited if label)
    child.no = len(inherited) - child.yes
    decision = decide(child.score, child.size, child.yes, child.no, policy)
    if decision.action is Action.ASK:
        return ClusterState.CANDIDATE
    return STATE_OF_ACTION[decision.action]


def activate_children(
    session: Session | Connection, parents: list[ClusterRow], policy: PolicyParams, now: datetime
) -> dict[int, ClusterState]:
    """Bring the children of split clusters into the search, level by level (one query each).

    A child gets its automatic state (``auto_split`` recurses), or becomes a ``candidate``; with
    ``reuse_parent_answers`` its counts start from the answered questions of its ancestors inside
    its range, and if those already settle it the decision is applied at once (as the engine's
    runner does when it pops such a child).

    Core statements only, so a bare connection serves as well as a session (the hot lane's
    submissions have no session).
    """
    reuse = policy.reuse_parent_answers
    level = [(p, _known_answers(session, p) if reuse else []) for p in parents]
    result: dict[int, ClusterState] = {}
    while level:
        kids = _children(session, [p for p, _ in level])
        writes, following = [], []
        for parent, known in level:
            for child in kids.get(parent.id, []):
                if child.state is not ClusterState.PENDING:
                    continue  # already activated: activation is idempotent
                inherited = [(pos, lab) for pos, lab in known if child.lo <= pos < child.hi]
                child.state = _activate(child, inherited, policy)
                decided = None if child.state is ClusterState.CANDIDATE else now
                writes.append(_write(child, decided))
                result[child.id] = child.state
                if child.state in _SPLITS:
                    following.append((child, inherited))
        if writes:
            session.execute(_WRITE_BACK, writes)
        level = following
    return result


def zero_counts(cluster_ids: Iterable[int]) -> Counts:
    """No count change (the clusters are settled again, e.g. a decision reached on inherited
    answers)."""
    return {int(c): (0, 0, 0) for c in cluster_ids}


def closed_counts(cluster_ids: Iterable[int | None]) -> Counts:
    """One closed question per occurrence of a cluster id (``None``: not a sample question)."""
    out: Counts = {}
    for cid in cluster_ids:
        if cid is not None:
            out[int(cid)] = (0, 0, out.get(int(cid), (0, 0, 0))[2] + 1)
    return out


def merge_counts(*parts: Mapping[int, tuple[int, int, int]]) -> Counts:
    out: Counts = {}
    for part in parts:
        for cid, (dy, dn, dc) in part.items():
            y, n, c = out.get(cid, (0, 0, 0))
            out[cid] = (y + dy, n + dn, c + dc)
    return out
