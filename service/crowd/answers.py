"""A HIT's answers, stored on its assignment row as parallel arrays (migration 0005).

Why arrays and not a row per answer: a submission writes its assignment row anyway (verdict,
gold score), and its 55 answers as rows -- a sequence value, three index entries and a speculative
insertion each -- were a fifth of the CPU of a whole HIT cycle (the migration says what was
measured). The arrays are PostgreSQL arrays, JSON lists on SQLite; lists in Python either way.

Every writer locks the assignment row and reads its arrays before it writes them (a submission
appends, a discard marks), so an answer is stored once per (assignment, question) and no write
is lost; on PostgreSQL the lock returns the row's newest version even to a statement whose
snapshot is older. Discards lock the rows they change in id order. The qualification test's
answers are rows of ``answers`` (:class:`service.models.Answer`).

The rows name each answer's question by its position in the HIT (migration 0006); in Python an
answer carries the question's id (:func:`service.crowd.questions.question_id`), made from the
assignment's HIT when the arrays are read.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import ColumnElement, bindparam, select, update
from sqlalchemy.orm import Session

from service.crowd.questions import MAX_PER_HIT, question_id
from service.models import Assignment

__all__ = [
    "COLUMNS",
    "AnswerSet",
    "HitAnswers",
    "StoredAnswer",
    "discard",
    "load",
    "of_hits",
    "store",
    "where",
]

_AS = Assignment.__table__

#: The four array columns, in :meth:`AnswerSet.of`'s order.
COLUMNS = (
    _AS.c.answer_positions,
    _AS.c.answer_values,
    _AS.c.answer_ms,
    _AS.c.answer_discard_reasons,
)


class StoredAnswer(NamedTuple):
    question_id: int
    value: bool
    ms: int
    discard_reason: str | None

    @property
    def valid(self) -> bool:
        return self.discard_reason is None


@dataclass(frozen=True)
class AnswerSet:
    """One assignment's answers, in the order they were stored."""

    question_ids: tuple[int, ...] = ()
    values: tuple[bool, ...] = ()
    ms: tuple[int, ...] = ()
    #: ``None`` while no answer is discarded, else one entry per answer (``None``: valid).
    discard_reasons: tuple[str | None, ...] | None = None

    @classmethod
    def of(cls, hit_id: int, row: Sequence) -> AnswerSet:
        """From the four :data:`COLUMNS` as read for an assignment of HIT ``hit_id`` (``NULL``
        arrays: no answer yet)."""
        positions, values, ms, reasons = row
        if not positions:
            return cls()
        return cls(
            tuple(question_id(hit_id, int(p)) for p in positions),
            tuple(bool(v) for v in values),
            tuple(int(m) for m in ms),
            None if reasons is None else tuple(reasons),
        )

    def __len__(self) -> int:
        return len(self.question_ids)

    def __iter__(self) -> Iterator[StoredAnswer]:
        reasons = self.discard_reasons or (None,) * len(self.question_ids)
        return map(StoredAnswer, self.question_ids, self.values, self.ms, reasons)

    def valid(self) -> Iterator[StoredAnswer]:
        return (a for a in self if a.valid)

    def appended(self, new: Iterable[tuple[int, bool, int]]) -> AnswerSet:
        """These answers plus ``new`` ``(question id, value, ms)``, which the caller has checked
        are not stored yet."""
        new = list(new)
        return AnswerSet(
            self.question_ids + tuple(q for q, _, _ in new),
            self.values + tuple(v for _, v, _ in new),
            self.ms + tuple(m for _, _, m in new),
            None if self.discard_reasons is None else self.discard_reasons + (None,) * len(new),
        )

    def discarded(self, question_ids: Container[int] | None, reason: str) -> AnswerSet | None:
        """The set with the valid answers to ``question_ids`` (``None``: all of them) discarded
        for ``reason``; ``None`` if that changes nothing."""
        reasons = list(self.discard_reasons or (None,) * len(self.question_ids))
        changed = False
        for i, qid in enumerate(self.question_ids):
            if reasons[i] is None and (question_ids is None or qid in question_ids):
                reasons[i] = reason
                changed = True
        if not changed:
            return None
        return AnswerSet(self.question_ids, self.values, self.ms, tuple(reasons))

    def columns(self) -> dict[str, list | None]:
        """The row's values for an UPDATE of :data:`COLUMNS`."""
        return {
            "answer_positions": [q & (MAX_PER_HIT - 1) for q in self.question_ids],
            "answer_values": list(self.values),
            "answer_ms": list(self.ms),
            "answer_discard_reasons": (
                None if self.discard_reasons is None else list(self.discard_reasons)
            ),
        }


_STORE = update(_AS).where(_AS.c.id == bindparam("aid"))


def store(session: Session, assignment_id: int, answers: AnswerSet) -> None:
    """Write an assignment's answers (the caller holds its row lock and read them under it)."""
    session.execute(_STORE.values(**answers.columns()), {"aid": assignment_id})


def load(
    session: Session, assignment_ids: Iterable[int], *, lock: bool = False
) -> dict[int, AnswerSet]:
    """The answers of these assignments; ``lock``: take their row locks (in id order) first."""
    ids = sorted(set(assignment_ids))
    if not ids:
        return {}
    query = select(_AS.c.id, _AS.c.hit_id, *COLUMNS).where(_AS.c.id.in_(ids)).order_by(_AS.c.id)
    if lock:
        query = query.with_for_update()
    return {int(row[0]): AnswerSet.of(int(row[1]), row[2:]) for row in session.execute(query).all()}


class HitAnswers(NamedTuple):
    """One assignment of a HIT with its answers."""

    assignment_id: int
    hit_id: int
    worker_id: int
    answers: AnswerSet


def where(session: Session, *conditions: ColumnElement[bool]) -> list[HitAnswers]:
    """Every assignment matching ``conditions`` that has answers, in id order."""
    rows = session.execute(
        select(_AS.c.id, _AS.c.hit_id, _AS.c.worker_id, *COLUMNS)
        .where(*conditions, _AS.c.answer_positions.is_not(None))
        .order_by(_AS.c.id)
    ).all()
    return [
        HitAnswers(int(r[0]), int(r[1]), int(r[2]), AnswerSet.of(int(r[1]), r[3:])) for r in rows
    ]


def of_hits(session: Session, hit_ids: Iterable[int]) -> list[HitAnswers]:
    """Every assignment of these HITs that has answers, in id order."""
    ids = sorted(set(hit_ids))
    return where(session, _AS.c.hit_id.in_(ids)) if ids else []


def discard(session: Session, selection: Mapping[int, Container[int] | None], reason: str) -> int:
    """Discard, for ``reason``, the valid answers of each assignment in ``selection`` to the
    questions given (``None``: all its answers); returns how many assignments changed."""
    changed = 0
    for assignment_id, answers in load(session, selection, lock=True).items():
        marked = answers.discarded(selection[assignment_id], reason)
        if marked is not None:
            store(session, assignment_id, marked)
            changed += 1
    return changed
