"""Quality control when an assignment is complete, and what follows from it in the same transaction.

The paper's crowd protocol (Sec. 6) with every decision stored with its reason:

* **Gold per assignment**: below ``hit_min_gold_accuracy`` the assignment is rejected
  (``Assignment.decision_reason``) and its sample answers are discarded
  (``Assignment.answer_discard_reasons``); their questions go back to their clusters, which ask
  again.
* **Too fast**: a mean time per question under ``min_ms_per_question`` discards the assignment the
  same way (spam clicks through a HIT in seconds).
* **Gold per worker**: once a worker has ``worker_min_gold`` gold answers, a running accuracy below
  ``worker_min_gold_accuracy`` blocks them (``Worker.blocked_reason``); their unchecked answers --
  those in clusters not decided yet -- are discarded and re-asked, their open claims expire.

Then money (approve -> spend the assignment's share of the reservation, reject -> release it) and,
once every slot of the HIT is final, aggregation and decisions (:mod:`service.crowd.decisions`).

Lock order, shared by every writer so transactions cannot deadlock: assignment, HIT, worker,
clusters (in id order), campaign (last, because it is the hottest row).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from service.crowd import CrowdParams, money
from service.crowd import answers as stored_answers
from service.crowd import questions as hit_questions
from service.crowd.decisions import (
    Counts,
    QuestionVotes,
    aggregate_hit,
    discard_answers,
    hit_votes,
    lock_clusters,
    merge_counts,
    settle,
)
from service.crowd.hits import CampaignInfo, expire_assignments, lock_hit, reopen_hits, utcnow
from service.models import (
    Assignment,
    AssignmentStatus,
    Cluster,
    ClusterState,
    Hit,
    HitStatus,
    QuestionKind,
    QuestionStatus,
    Worker,
)

__all__ = [
    "AssignmentStats",
    "Review",
    "assignment_stats",
    "block_reason",
    "block_worker",
    "finalize_assignment",
    "judge",
    "stats_from_votes",
]

_AS = Assignment.__table__
_H = Hit.__table__
_W = Worker.__table__
_CL = Cluster.__table__

_FINAL = (AssignmentStatus.APPROVED, AssignmentStatus.REJECTED)


@dataclass(frozen=True)
class AssignmentStats:
    answers: int
    total_ms: int
    gold_total: int
    gold_correct: int

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.answers if self.answers else 0.0


@dataclass(frozen=True)
class Review:
    approved: bool
    reason: str
    stats: AssignmentStats
    worker_blocked: bool
    hit_complete: bool


def assignment_stats(session: Session, assignment_id: int) -> AssignmentStats:
    """Answer count, time and gold score of one assignment (every answer it stored)."""
    answers = stored_answers.load(session, [assignment_id]).get(assignment_id)
    if not answers:
        return AssignmentStats(0, 0, 0, 0)
    expected = hit_questions.expected_answers(
        session, hit_questions.of_ids(session, answers.question_ids).values()
    )
    gold = [a.value == expected[a.question_id] for a in answers if a.question_id in expected]
    return AssignmentStats(len(answers), sum(answers.ms), len(gold), sum(gold))


def judge(stats: AssignmentStats, params: CrowdParams) -> tuple[bool, str]:
    """Approve or reject an assignment; the reason is stored either way (it is the audit trail)."""
    gold = f"gold {stats.gold_correct}/{stats.gold_total}"
    if stats.answers and stats.mean_ms < params.min_ms_per_question:
        return False, (
            f"too fast: {stats.mean_ms:.0f} ms per question on average, "
            f"minimum {params.min_ms_per_question} ms"
        )
    if stats.gold_total:
        accuracy = stats.gold_correct / stats.gold_total
        if accuracy < params.hit_min_gold_accuracy:
            return False, (
                f"{gold} correct = {accuracy:.2f}, below the HIT threshold "
                f"{params.hit_min_gold_accuracy:.2f}"
            )
    return True, f"approved: {gold} correct, {stats.mean_ms:.0f} ms per question"


def _sample_questions(session: Session, hit_id: int) -> list[int]:
    return [
        q.id
        for q in hit_questions.of_hits(session, [hit_id]).get(hit_id, [])
        if q.kind is QuestionKind.SAMPLE
    ]


_ADD_WORKER_GOLD = (
    update(_W)
    .where(_W.c.id == bindparam("wid"))
    .values(
        gold_correct=_W.c.gold_correct + bindparam("c"),
        gold_total=_W.c.gold_total + bindparam("t"),
    )
    .returning(_W.c.gold_correct, _W.c.gold_total, _W.c.blocked)
)
_JUDGE_ASSIGNMENT = (
    update(_AS)
    .where(_AS.c.id == bindparam("aid"))
    .values(
        status=bindparam("new_status"),
        submitted_at=bindparam("at"),
        gold_correct=bindparam("gc"),
        gold_total=bindparam("gt"),
        decision_reason=bindparam("reason"),
    )
)
_HIT_COMPLETED = update(_H).where(_H.c.id == bindparam("hid")).values(status=HitStatus.COMPLETED)


def _update_worker_gold(
    session: Session, worker_id: int, stats: AssignmentStats
) -> tuple[int, int, bool]:
    row = session.execute(
        _ADD_WORKER_GOLD, {"wid": worker_id, "c": stats.gold_correct, "t": stats.gold_total}
    ).one()
    return int(row[0]), int(row[1]), bool(row[2])


def block_reason(correct: int, total: int, params: CrowdParams) -> str | None:
    """Why a worker with this running gold score must be blocked, or ``None``."""
    if total < params.worker_min_gold:
        return None
    accuracy = correct / total
    if accuracy >= params.worker_min_gold_accuracy:
        return None
    return (
        f"running gold accuracy {correct}/{total} = {accuracy:.2f} is below "
        f"{params.worker_min_gold_accuracy:.2f}"
    )


def block_worker(
    session: Session, worker_id: int, reason: str, *, now: datetime | None = None
) -> Counts:
    """Block a worker and discard their unchecked answers; returns count deltas to settle.

    Unchecked = answers about clusters that are not decided yet. A question that had been counted
    and loses its only valid answer becomes ``discarded`` (its cluster asks again); the worker's
    open claims expire so their HITs go to other workers.
    """
    now = now or utcnow()
    session.execute(
        update(_W)
        .where(_W.c.id == worker_id)
        .values(blocked=True, blocked_reason=reason, blocked_at=now)
    )
    undecided = (ClusterState.CANDIDATE, ClusterState.ACTIVE)
    # The worker's valid answers, through their assignments (this path is rare).
    value_of = {
        (assignment.assignment_id, answer.question_id): answer.value
        for assignment in stored_answers.where(session, _AS.c.worker_id == worker_id)
        for answer in assignment.answers.valid()
    }
    samples = [
        q
        for q in hit_questions.of_ids(session, {qid for _, qid in value_of}).values()
        if q.kind is QuestionKind.SAMPLE
    ]
    states = dict(
        session.execute(
            select(_CL.c.id, _CL.c.state).where(
                _CL.c.id.in_(sorted({q.cluster_id for q in samples})),
                _CL.c.state.in_(undecided),
            )
        ).all()
    )
    about = {q.id: (q.cluster_id, q.status, q.hit_id) for q in samples if q.cluster_id in states}
    locked = lock_clusters(session, (cid for cid, _, _ in about.values()))
    rows = [
        (aid, qid, about[qid], value)
        for (aid, qid), value in value_of.items()
        if qid in about and locked[about[qid][0]].state in undecided
    ]
    chosen: dict[int, set[int]] = {}
    for aid, qid, _, _ in rows:
        chosen.setdefault(aid, set()).add(qid)
    discard_answers(session, chosen, f"worker blocked: {reason}")
    deltas: Counts = {cid: (0, 0, 0) for _, _, (cid, _, _), _ in rows}
    answered = {
        qid: (cid, hit, value)
        for _, qid, (cid, status, hit), value in rows
        if status is QuestionStatus.ANSWERED
    }
    if answered:
        still_valid = {
            answer.question_id
            for assignment in stored_answers.of_hits(session, {h for _, h, _ in answered.values()})
            for answer in assignment.answers.valid()
        }
        lost = [q for q in answered if q not in still_valid]
        if lost:
            hit_questions.set_statuses(session, dict.fromkeys(lost, QuestionStatus.DISCARDED))
        for qid in lost:
            cid, _, value = answered[qid]
            yes, no, closed = deltas[cid]
            deltas[cid] = (yes - 1, no, closed) if value else (yes, no - 1, closed)
    claims = session.execute(
        select(_AS.c.id, _AS.c.hit_id).where(
            _AS.c.worker_id == worker_id, _AS.c.status == AssignmentStatus.CLAIMED
        )
    ).all()
    if claims:
        expire_assignments(session, [c[0] for c in claims], f"worker blocked: {reason}")
        reopen_hits(session, sorted({c[1] for c in claims}))
    return deltas


def _hit_complete(session: Session, hit_id: int, max_assignments: int) -> bool:
    if max_assignments == 1:
        return True
    final = session.execute(
        select(func.count()).where(_AS.c.hit_id == hit_id, _AS.c.status.in_(_FINAL))
    ).scalar_one()
    return final >= max_assignments


def stats_from_votes(votes: Mapping[int, QuestionVotes], assignment_id: int) -> AssignmentStats:
    """:func:`assignment_stats` computed from rows already read by :func:`hit_votes`."""
    answers = total_ms = gold_total = gold_correct = 0
    for entry in votes.values():
        for vote in entry.votes:
            if vote.assignment_id != assignment_id:
                continue
            answers += 1
            total_ms += vote.ms
            if entry.kind is QuestionKind.GOLD and entry.expected is not None:
                gold_total += 1
                gold_correct += vote.value == entry.expected
    return AssignmentStats(answers, total_ms, gold_total, gold_correct)


def finalize_assignment(
    session: Session,
    assignment_id: int,
    hit_id: int,
    worker_id: int,
    *,
    votes: Mapping[int, QuestionVotes] | None = None,
    now: datetime | None = None,
) -> Review:
    """Quality control, money and (once the HIT is complete) decisions for a finished assignment.

    Called in the transaction that stored its last answer, with the assignment row locked.
    ``votes``: this assignment's answers as the submission saw them
    (:attr:`~service.crowd.hits.SubmitResult.votes`); they are the HIT's whole vote when it has a
    single assignment, which saves reading them again.
    """
    now = now or utcnow()
    max_assignments, campaign = lock_hit(session, hit_id)
    params = campaign.crowd
    if votes is None or max_assignments != 1:
        votes = hit_votes(session, hit_id)
    stats = stats_from_votes(votes, assignment_id)
    approved, reason = judge(stats, params)
    session.execute(
        _JUDGE_ASSIGNMENT,
        {
            "aid": assignment_id,
            "new_status": (
                AssignmentStatus.APPROVED if approved else AssignmentStatus.REJECTED
            ).value,
            "at": now,
            "gc": stats.gold_correct,
            "gt": stats.gold_total,
            "reason": reason,
        },
    )
    if not approved:
        discard_answers(session, {assignment_id: _sample_questions(session, hit_id)}, reason)
    correct, total, already_blocked = _update_worker_gold(session, worker_id, stats)
    blocked_for = None if already_blocked else block_reason(correct, total, params)
    deltas: Counts = {}
    if blocked_for is not None:
        deltas = block_worker(session, worker_id, blocked_for, now=now)
    complete = _hit_complete(session, hit_id, max_assignments)
    if complete:
        session.execute(_HIT_COMPLETED, {"hid": hit_id})
        # Answers discarded above changed the votes: read them again on those (rare) paths.
        fresh = votes if approved and blocked_for is None else None
        deltas = merge_counts(deltas, aggregate_hit(session, hit_id, params.aggregation, fresh))
    if deltas:
        settle(session, deltas, campaign.policy, now)
    _pay(session, campaign, hit_id, assignment_id, approved)
    return Review(approved, reason, stats, blocked_for is not None, complete)


def _pay(
    session: Session, campaign: CampaignInfo, hit_id: int, assignment_id: int, approved: bool
) -> None:
    share = campaign.assignment_cost
    if approved:
        money.spend(
            session, campaign.id, share, hit_id=hit_id, note=f"assignment {assignment_id} approved"
        )
    else:
        money.release(
            session,
            campaign.id,
            share,
            hit_id=hit_id,
            note=f"assignment {assignment_id} rejected",
            next_hit_cost=campaign.hit_cost,
        )
