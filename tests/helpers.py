"""Small helpers shared by tests."""

from __future__ import annotations

from typing import Any, NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth import create_api_key
from service.crowd import answers as stored_answers
from service.crowd import questions as stored_questions
from service.models import Hit


def new_key(session: Session, name: str = "test") -> tuple[int, dict[str, str]]:
    """Create an API key; return its id and the Authorization header that carries it."""
    key, plaintext = create_api_key(session, name)
    session.commit()
    return key.id, {"Authorization": f"Bearer {plaintext}"}


class HitAnswer(NamedTuple):
    """One stored answer to a HIT question, as a row (the database keeps them as arrays of the
    assignment, :mod:`service.crowd.answers`)."""

    assignment_id: int
    worker_id: int
    question_id: int
    value: bool
    ms: int
    discard_reason: str | None

    @property
    def discarded(self) -> bool:
        return self.discard_reason is not None


def hit_answers(session: Session, *conditions: Any) -> list[HitAnswer]:
    """Every stored HIT answer of the assignments matching ``conditions`` (all if none)."""
    return [
        HitAnswer(assignment.assignment_id, assignment.worker_id, *answer)
        for assignment in stored_answers.where(session, *conditions)
        for answer in assignment.answers
    ]


def hit_questions(session: Session, **equal: Any) -> list[stored_questions.HitQuestion]:
    """Every question of every HIT (arrays of the HIT rows since migration 0006) whose attributes
    equal ``equal`` (e.g. ``kind=QuestionKind.SAMPLE``; a set or list matches any member), in HIT
    and position order: what tests once selected from ``questions``."""
    hit_ids = session.scalars(select(Hit.id)).all()
    out = []
    for questions in stored_questions.of_hits(session, hit_ids).values():
        for q in questions:
            if all(
                getattr(q, name) in value
                if isinstance(value, set | list | tuple)
                else getattr(q, name) == value
                for name, value in equal.items()
            ):
                out.append(q)
    return out
