"""Small helpers shared by tests."""

from __future__ import annotations

from typing import Any, NamedTuple

from sqlalchemy.orm import Session

from service.auth import create_api_key
from service.crowd import answers as stored_answers


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
