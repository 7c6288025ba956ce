"""The qualification test a worker passes before any paid work (Sec. 6 of the paper).

The pool is the project's ``GoldItem`` rows with ``for_qualification=True``; each gets one
``Question`` (kind ``qualification``, random public id) the first time a test needs it. An
attempt shows ``qualification_items`` of them (default 10) and passes with ``qualification_pass``
correct (default 8, scaled down if the pool is smaller). Retakes are limited
(``qualification_max_attempts``) and spaced (``qualification_retry_seconds``).

Which items an attempt shows is a pure function of the attempt id (items ranked by a hash of
``attempt id : question id``, among those that existed when the attempt started), so a reload shows
the same test and grading knows exactly which questions belong to it, without storing the list.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, exists, func, insert, select, update
from sqlalchemy.orm import Session

from service.crowd import CrowdError, CrowdParams
from service.crowd.hits import WorkerRow, aware, image_url, new_public_id, utcnow
from service.models import (
    Answer,
    Campaign,
    GoldItem,
    Project,
    ProjectClass,
    QualificationAttempt,
    Question,
    QuestionKind,
    QuestionStatus,
    Worker,
)

__all__ = ["Outcome", "QualificationTest", "grade_test", "qualification_params", "start_test"]

_Q = Question.__table__
_G = GoldItem.__table__
_P = Project.__table__
_PC = ProjectClass.__table__
_QA = QualificationAttempt.__table__
_A = Answer.__table__
_W = Worker.__table__
_C = Campaign.__table__


@dataclass(frozen=True)
class QualificationTest:
    attempt_id: int
    questions: list[dict[str, str]]
    attempts_left: int

    def to_json(self) -> dict[str, Any]:
        return {"questions": self.questions, "attempts_left": self.attempts_left}


@dataclass(frozen=True)
class Outcome:
    passed: bool
    correct: int
    total: int
    retry_after_s: int | None
    attempts_left: int

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"passed": self.passed, "correct": self.correct, "total": self.total}
        if self.retry_after_s is not None:
            out["retry_after_s"] = self.retry_after_s
        out["attempts_left"] = self.attempts_left
        return out


def qualification_params(session: Session, project_id: int | None) -> CrowdParams:
    """The test's settings come from the project's newest campaign (defaults before the first)."""
    if project_id is None:
        return CrowdParams()
    params = session.scalar(
        select(_C.c.params).where(_C.c.project_id == project_id).order_by(_C.c.id.desc()).limit(1)
    )
    return CrowdParams.from_dict(params or {})


def _ensure_pool(session: Session, project_id: int) -> None:
    """Give every qualification item of the project its question (once)."""
    has_question = exists().where(_Q.c.gold_item_id == _G.c.id)
    without_question = select(_G.c.id).where(
        _G.c.project_id == project_id, _G.c.for_qualification.is_(True), ~has_question
    )
    if not session.scalars(without_question.limit(1)).first():
        return
    # Two workers starting the project's first tests at once would both find the items
    # without a question and both insert them: the second would fail on the unique gold item
    # (before 0007, a test could show one mask twice). The project's row serialises the
    # writers (on SQLite, BEGIN IMMEDIATE already does); the second reads again once the first
    # has committed and finds nothing left to add.
    session.execute(select(_P.c.id).where(_P.c.id == project_id).with_for_update(key_share=True))
    missing = session.scalars(without_question).all()
    if missing:
        session.execute(
            insert(_Q),
            [
                {
                    "public_id": new_public_id(),
                    "kind": QuestionKind.QUALIFICATION,
                    "status": QuestionStatus.OPEN,
                    "gold_item_id": gid,
                }
                for gid in missing
            ],
        )


def _rank(attempt_id: int, question_id: int) -> bytes:
    return hashlib.sha256(f"{attempt_id}:{question_id}".encode()).digest()


@dataclass(frozen=True)
class _Item:
    question_id: int
    public_id: str
    class_name: str
    expected: bool


def _selection(session: Session, project_id: int, attempt_id: int, started: datetime, n: int):
    rows = session.execute(
        select(_Q.c.id, _Q.c.public_id, _PC.c.name, _G.c.expected)
        .select_from(_Q.join(_G, _G.c.id == _Q.c.gold_item_id).join(_PC, _PC.c.id == _G.c.class_id))
        .where(
            _G.c.project_id == project_id,
            _G.c.for_qualification.is_(True),
            _Q.c.created_at <= started,
        )
    ).all()
    items = sorted((_Item(*r) for r in rows), key=lambda it: _rank(attempt_id, it.question_id))
    return items[:n]


def _open_attempt(session: Session, worker_id: int, *, lock: bool = False):
    query = (
        select(_QA.c.id, _QA.c.project_id, _QA.c.total, _QA.c.created_at)
        .where(_QA.c.worker_id == worker_id, _QA.c.submitted_at.is_(None))
        .order_by(_QA.c.id.desc())
        .limit(1)
    )
    if lock:
        query = query.with_for_update()
    return session.execute(query).first()


def _attempts(session: Session, worker_id: int) -> tuple[int, datetime | None]:
    row = session.execute(
        select(_W.c.qualification_attempts, _W.c.last_qualification_at).where(_W.c.id == worker_id)
    ).one()
    return int(row[0]), row[1]


def _check_may_start(
    session: Session, worker: WorkerRow, params: CrowdParams, now: datetime
) -> int:
    """Attempts left, or a refusal: out of attempts (403) or too soon after the last (429)."""
    used, last = _attempts(session, worker.id)
    left = params.qualification_max_attempts - used
    if left <= 0:
        raise CrowdError(
            403, "no_attempts_left", f"all {params.qualification_max_attempts} attempts are used"
        )
    if last is not None:
        wait = params.qualification_retry_seconds - (now - aware(last)).total_seconds()
        if wait > 0:
            raise CrowdError(
                429,
                "retry_later",
                f"the qualification test can be retaken in {math.ceil(wait)} s",
                retry_after_s=math.ceil(wait),
            )
    return left


def _guard(worker: WorkerRow) -> int:
    if worker.blocked:
        raise CrowdError(403, "blocked", f"this worker is blocked: {worker.blocked_reason}")
    if worker.qualified:
        raise CrowdError(409, "already_qualified", "this worker has already passed the test")
    if worker.project_id is None:
        raise CrowdError(409, "no_qualification_test", "this worker belongs to no project")
    return worker.project_id


def start_test(
    session: Session, worker: WorkerRow, params: CrowdParams, *, now: datetime | None = None
) -> QualificationTest:
    """The worker's current test, starting an attempt if none is open."""
    now = now or utcnow()
    project_id = _guard(worker)
    attempt = _open_attempt(session, worker.id)
    used, _ = _attempts(session, worker.id)
    if attempt is None:
        _check_may_start(session, worker, params, now)
        _ensure_pool(session, project_id)
        pool = _pool_size(session, project_id)
        if pool == 0:
            raise CrowdError(
                409, "no_qualification_test", "the project has no qualification items yet"
            )
        total = min(params.qualification_items, pool)
        attempt_id = session.execute(
            insert(_QA)
            .values(worker_id=worker.id, project_id=project_id, correct=0, total=total)
            .returning(_QA.c.id)
        ).scalar_one()
        attempt = _open_attempt(session, worker.id)
        assert attempt is not None and attempt[0] == attempt_id
    items = _selection(session, project_id, attempt[0], attempt[3], attempt[2])
    questions = [
        {"id": it.public_id, "image_url": image_url(it.public_id), "class_name": it.class_name}
        for it in items
    ]
    return QualificationTest(attempt[0], questions, params.qualification_max_attempts - used)


def _pool_size(session: Session, project_id: int) -> int:
    return session.execute(
        select(func.count())
        .select_from(_Q.join(_G, _G.c.id == _Q.c.gold_item_id))
        .where(
            _G.c.project_id == project_id,
            _G.c.for_qualification.is_(True),
        )
    ).scalar_one()


def grade_test(
    session: Session,
    worker: WorkerRow,
    answers: list[tuple[str, bool, int]],
    params: CrowdParams,
    *,
    now: datetime | None = None,
) -> Outcome:
    """Grade the open attempt; every one of its questions must be answered, each once."""
    now = now or utcnow()
    project_id = _guard(worker)
    attempt = _open_attempt(session, worker.id, lock=True)
    if attempt is None:
        raise CrowdError(409, "no_open_test", "fetch the qualification test before answering it")
    attempt_id, _, total, started = attempt
    items = {it.public_id: it for it in _selection(session, project_id, attempt_id, started, total)}
    if len(items) != total:
        session.execute(delete(_QA).where(_QA.c.id == attempt_id))
        raise CrowdError(
            409, "test_changed", "the qualification test changed; fetch it again", persist=True
        )
    given = {pid: (value, ms) for pid, value, ms in answers}
    unknown = sorted(set(given) - set(items))
    if unknown:
        raise CrowdError(
            422, "validation_error", f"answers.question_id: not in this test: {', '.join(unknown)}"
        )
    missing = len(items) - len(given)
    if missing:
        raise CrowdError(
            422, "validation_error", f"answers: {missing} question(s) of the test are unanswered"
        )
    session.execute(
        insert(_A),
        [
            {
                "question_id": items[pid].question_id,
                "qualification_attempt_id": attempt_id,
                "worker_id": worker.id,
                "value": value,
                "ms": ms,
            }
            for pid, (value, ms) in given.items()
        ],
    )
    correct = sum(1 for pid, (value, _) in given.items() if value == items[pid].expected)
    need = math.ceil(total * params.qualification_pass / params.qualification_items)
    passed = correct >= need
    return _record(session, worker.id, attempt_id, correct, total, passed, params, now)


def _record(
    session: Session,
    worker_id: int,
    attempt_id: int,
    correct: int,
    total: int,
    passed: bool,
    params: CrowdParams,
    now: datetime,
) -> Outcome:
    session.execute(
        update(_QA)
        .where(_QA.c.id == attempt_id)
        .values(correct=correct, passed=passed, submitted_at=now)
    )
    values: dict[str, Any] = {
        "qualification_attempts": _W.c.qualification_attempts + 1,
        "last_qualification_at": now,
    }
    if passed:
        values.update(qualified=True, qualified_at=now)
    used = session.execute(
        update(_W)
        .where(_W.c.id == worker_id)
        .values(**values)
        .returning(_W.c.qualification_attempts)
    ).scalar_one()
    left = max(0, params.qualification_max_attempts - used)
    retry = params.qualification_retry_seconds if not passed and left > 0 else None
    return Outcome(passed, correct, total, retry, left)
