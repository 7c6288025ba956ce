"""A HIT's questions, stored on its HIT row as parallel arrays (migration 0006).

Why arrays and not a row per question: a HIT's questions are made together, sent together and
closed together. As rows, a build's 880 questions (16 HITs of 55) were inserted with four index
entries each and updated again when their HIT completed: 5-19% of the CPU of a whole HIT cycle
(three runs of ``scripts/bench_compare.py``, median 8%); as arrays they are written with the
HIT row that is inserted and updated anyway. The arrays are PostgreSQL arrays, JSON lists on
SQLite; lists in Python either way.

A question is addressed by its HIT and its position there. In Python it has one integer id,
:func:`question_id` (the HIT id shifted left by :data:`POSITION_BITS`, plus the position), so
code that keys votes, answers or discards by question needs no pair; an assignment stores its
answers by position (:mod:`service.crowd.answers`). Its public id is the HIT's random public id
followed by the position (two URL-safe characters): unguessable, and it says which HIT the
question is in, which its worker knows anyway, and nothing about gold.

Questions of a cluster are found through ``clusters.sample_hit_ids`` (the HITs that hold its
samples), which the build appends to. Every writer of a HIT's statuses locks the HIT row (id
order) and reads the arrays under the lock. The qualification test's questions are rows of
``questions`` (:class:`service.models.Question`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from service.models import Cluster, GoldItem, Hit, QuestionKind, QuestionStatus

__all__ = [
    "COLUMNS",
    "MAX_PER_HIT",
    "POSITION_BITS",
    "POSITION_CODES",
    "HitQuestion",
    "by_public_id",
    "expected_answers",
    "hit_of",
    "of_clusters",
    "of_hits",
    "of_ids",
    "of_public_ids",
    "position_code",
    "public_id",
    "question_id",
    "sample_hit_ids",
    "set_statuses",
    "split_public_id",
    "unpack",
]

_H = Hit.__table__
_CL = Cluster.__table__
_G = GoldItem.__table__

#: A position fits in this many bits of a question id (campaigns allow at most 1,100 questions
#: per HIT: 1,000 samples and 100 gold).
POSITION_BITS = 11
MAX_PER_HIT = 1 << POSITION_BITS

#: The arrays (and the HIT's public id) in :func:`unpack`'s order.
COLUMNS = (
    _H.c.public_id,
    _H.c.question_cluster_ids,
    _H.c.question_tree_ids,
    _H.c.question_leaf_pos,
    _H.c.question_gold_item_ids,
    _H.c.question_statuses,
)

# Two base64url characters per position: 4,096 codes, more than MAX_PER_HIT.
_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: Each position's two characters, by position (hot paths index this rather than call
#: :func:`position_code` per question).
POSITION_CODES = tuple(a + b for a in _DIGITS for b in _DIGITS)[:MAX_PER_HIT]
_POSITION_OF = {code: i for i, code in enumerate(POSITION_CODES)}
#: Length of a HIT's public id (:func:`service.crowd.hits.new_public_ids`).
HIT_PUBLIC_ID_LENGTH = 24


def question_id(hit_id: int, position: int) -> int:
    return (hit_id << POSITION_BITS) | position


def hit_of(qid: int) -> tuple[int, int]:
    """``(hit id, position)`` of a question id."""
    return qid >> POSITION_BITS, qid & (MAX_PER_HIT - 1)


def position_code(position: int) -> str:
    return POSITION_CODES[position]


def public_id(hit_public_id: str, position: int) -> str:
    return hit_public_id + POSITION_CODES[position]


def split_public_id(pid: str) -> tuple[str, int] | None:
    """``(the HIT's public id, position)``, or ``None`` if ``pid`` is not shaped as a HIT
    question's public id."""
    if len(pid) != HIT_PUBLIC_ID_LENGTH + 2:
        return None
    position = _POSITION_OF.get(pid[HIT_PUBLIC_ID_LENGTH:])
    return None if position is None else (pid[:HIT_PUBLIC_ID_LENGTH], position)


class HitQuestion(NamedTuple):
    """One question of a HIT, with the attributes a question row had."""

    id: int
    hit_id: int
    position: int
    public_id: str
    kind: QuestionKind
    status: QuestionStatus
    cluster_id: int | None
    tree_id: int | None
    leaf_pos: int | None
    gold_item_id: int | None


_STATUSES = {s.value: s for s in QuestionStatus}


def unpack(hit_id: int, row: Sequence) -> list[HitQuestion]:
    """A HIT's questions from :data:`COLUMNS` as read."""
    hit_public_id, clusters, trees, leaves, golds, statuses = row
    out = []
    for position, status in enumerate(statuses or ()):
        gold = golds[position]
        out.append(
            HitQuestion(
                question_id(hit_id, position),
                hit_id,
                position,
                hit_public_id + POSITION_CODES[position],
                QuestionKind.SAMPLE if gold is None else QuestionKind.GOLD,
                _STATUSES[status],
                clusters[position],
                trees[position],
                leaves[position],
                gold,
            )
        )
    return out


def of_hits(
    session: Session, hit_ids: Iterable[int], *, lock: bool = False
) -> dict[int, list[HitQuestion]]:
    """The questions of these HITs, in position order; ``lock``: take the HIT rows' locks (in
    id order) first."""
    ids = sorted(set(hit_ids))
    if not ids:
        return {}
    query = select(_H.c.id, *COLUMNS).where(_H.c.id.in_(ids)).order_by(_H.c.id)
    if lock:
        query = query.with_for_update(of=_H)
    return {int(row[0]): unpack(int(row[0]), row[1:]) for row in session.execute(query).all()}


def of_ids(session: Session, question_ids: Iterable[int]) -> dict[int, HitQuestion]:
    """These questions by id (ids of no question are left out)."""
    wanted = set(question_ids)
    by_hit = of_hits(session, {hit_of(q)[0] for q in wanted})
    return {q.id: q for questions in by_hit.values() for q in questions if q.id in wanted}


_SAMPLE_HITS = select(_CL.c.id, _CL.c.sample_hit_ids).where(
    _CL.c.id.in_(bindparam("ids", expanding=True))
)


def sample_hit_ids(session: Session, cluster_ids: Iterable[int]) -> dict[int, list[int]]:
    """The HITs holding samples of each of these clusters, in build order (``[]``: none yet)."""
    ids = sorted(set(cluster_ids))
    if not ids:
        return {}
    rows = session.execute(_SAMPLE_HITS, {"ids": ids}).all()
    return {int(cid): [int(h) for h in hits or ()] for cid, hits in rows}


def of_clusters(session: Session, cluster_ids: Iterable[int]) -> list[HitQuestion]:
    """Every sample question about these clusters, whatever its status."""
    wanted = set(cluster_ids)
    if not wanted:
        return []
    hits = {h for held in sample_hit_ids(session, wanted).values() for h in held}
    return [
        q
        for questions in of_hits(session, hits).values()
        for q in questions
        if q.cluster_id in wanted
    ]


_WRITE_STATUSES = update(_H).where(_H.c.id == bindparam("hid"))


def set_statuses(
    session: Session,
    changes: Mapping[int, QuestionStatus],
    *,
    only_from: QuestionStatus | None = None,
) -> list[HitQuestion]:
    """Give questions (by id) new statuses -- only those now ``only_from`` if given -- locking
    their HITs' rows in id order; returns the questions changed, as they were before."""
    by_hit: dict[int, dict[int, QuestionStatus]] = {}
    for qid, status in changes.items():
        hit_id, position = hit_of(qid)
        by_hit.setdefault(hit_id, {})[position] = status
    changed: list[HitQuestion] = []
    for hit_id, questions in of_hits(session, by_hit, lock=True).items():
        statuses = [q.status.value for q in questions]
        for position, status in by_hit[hit_id].items():
            if position >= len(questions):
                continue
            before = questions[position]
            if only_from is not None and before.status is not only_from:
                continue
            if before.status is not status:
                statuses[position] = status.value
                changed.append(before)
        if statuses != [q.status.value for q in questions]:
            session.execute(_WRITE_STATUSES.values(question_statuses=statuses), {"hid": hit_id})
    return changed


def of_public_ids(session: Session, pids: Iterable[str]) -> dict[str, HitQuestion]:
    """The HIT questions with these public ids (ids of no HIT question are left out)."""
    wanted: dict[str, set[int]] = {}
    for pid in pids:
        split = split_public_id(pid)
        if split is not None:
            wanted.setdefault(split[0], set()).add(split[1])
    if not wanted:
        return {}
    rows = session.execute(
        select(_H.c.id, *COLUMNS).where(_H.c.public_id.in_(sorted(wanted)))
    ).all()
    out = {}
    for row in rows:
        questions = unpack(int(row[0]), row[1:])
        for position in wanted[row[1]]:
            if position < len(questions):
                out[questions[position].public_id] = questions[position]
    return out


def by_public_id(session: Session, pid: str) -> HitQuestion | None:
    """The HIT question with this public id, if there is one."""
    return of_public_ids(session, [pid]).get(pid)


_EXPECTED = select(_G.c.id, _G.c.expected).where(_G.c.id.in_(bindparam("ids", expanding=True)))


def expected_answers(session: Session, questions: Iterable[HitQuestion]) -> dict[int, bool]:
    """The known answer of each gold question among ``questions``, by question id."""
    gold = {q.id: q.gold_item_id for q in questions if q.gold_item_id is not None}
    if not gold:
        return {}
    known = dict(session.execute(_EXPECTED, {"ids": sorted(set(gold.values()))}).all())
    return {qid: bool(known[g]) for qid, g in gold.items() if known.get(g) is not None}
