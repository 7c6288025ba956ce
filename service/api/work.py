"""The worker side of the API: qualification test, claiming HITs, answering them.

Workers authenticate with the token of their invite (header ``X-Worker-Token`` or ``?token=``).
Payloads never reveal which questions are gold: every question is ``{id, image_url, class_name}``
with a random id and the same URL scheme, in shuffled order, and answers are acknowledged with
counts only.

Each write runs in one transaction, retried a few times if PostgreSQL aborts it for a deadlock or a
serialization failure (safe: every write here is idempotent -- an answer already stored on its
assignment is acknowledged as a duplicate, and a claim resumes the worker's open assignment).

On PostgreSQL, claiming and answering first try :mod:`service.crowd.fastpath` (a few static
statements per request); whatever it does not serve runs through the portable code below, which
also produces every refusal's exact message.
"""

from __future__ import annotations

import functools
import logging
import random
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from pydantic import Field
from sqlalchemy import Connection, bindparam, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from service.api.validation import Body, accepts, parse
from service.auth import hash_secret
from service.crowd import CrowdError, fastpath
from service.crowd.hits import Claim, WorkerRow, claim, record_answers, refill
from service.crowd.qualification import grade_test, qualification_params, start_test
from service.crowd.quality import finalize_assignment
from service.db import Database, get_database, get_session, writes
from service.errors import ApiError
from service.models import Backend, Worker

bp = Blueprint("work", __name__, url_prefix="/api/v1/work")
log = logging.getLogger(__name__)

T = TypeVar("T")

#: SQLSTATEs worth retrying: serialization_failure, deadlock_detected.
_RETRYABLE = {"40001", "40P01"}
_ATTEMPTS = 5


class AnswerIn(Body):
    question_id: str = Field(min_length=1, max_length=64)
    value: bool
    ms: int = Field(ge=0, le=24 * 3600 * 1000)


class AnswersIn(Body):
    answers: list[AnswerIn] = Field(min_length=1, max_length=1000)


#: Set in the WSGI environ by :mod:`service.api.hotlane` when its fast path has already been
#: tried for this request and did not serve it: the view goes straight to the portable code.
FAST_PATH_TRIED = "maskmill.fast_path_tried"


def refusal(exc: CrowdError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A crowd refusal as an HTTP answer: status, JSON body, extra headers."""
    headers = {}
    if exc.status == 429 and "retry_after_s" in exc.details:
        headers["Retry-After"] = str(exc.details["retry_after_s"])
    return exc.status, ApiError(exc.status, exc.code, exc.message, **exc.details).body(), headers


@bp.errorhandler(CrowdError)
def _crowd_error(exc: CrowdError):
    status, body, headers = refusal(exc)
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers)
    return response


def _retryable(exc: DBAPIError | psycopg.Error) -> bool:
    """A deadlock or serialization failure, raised through SQLAlchemy or (fast path) by psycopg;
    or, on SQLite, a transaction that waited out the busy timeout for the write lock (every
    SQLite transaction takes it when it begins, :mod:`service.db`)."""
    error = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(error, sqlite3.OperationalError):
        return "database is locked" in str(error)
    return getattr(error, "sqlstate", None) in _RETRYABLE


def _disconnected(exc: DBAPIError | psycopg.Error) -> bool:
    """The connection died under the request (server restart, failover, network): pooled
    connections are only tested when they were idle (:mod:`service.db`), so the first statement
    on a connection the server dropped a moment ago fails here, and the request is retried on a
    fresh one."""
    if isinstance(exc, DBAPIError):
        return bool(exc.connection_invalidated)
    if not isinstance(exc, psycopg.OperationalError):
        return False
    # Class 08 (connection exception), 57P0x (server shutting down); none: the socket is gone.
    sqlstate = exc.sqlstate or ""
    return sqlstate == "" or sqlstate.startswith("08") or sqlstate.startswith("57P0")


def _reset(owner: Session | Connection, exc: DBAPIError | psycopg.Error) -> None:
    """Roll back after a failed attempt. After a disconnect, drop the dead connection, and the
    pool's other connections with it: whatever cut this one (a server restart, a failover) cut
    those too, and the pool tests only idle ones."""
    if not _disconnected(exc):
        owner.rollback()
    elif isinstance(owner, Session):
        owner.invalidate()
        owner.get_bind().dispose()
    else:
        owner.invalidate()
        owner.rollback()  # a connection reconnects only once its dead transaction is ended
        owner.engine.dispose()


def in_transaction(work: Callable[[Any], T], session: Session | Connection | None = None) -> T:
    """Run ``work`` in ``session`` (default: the request's) and commit; retry on deadlock /
    serialization failure; on a refusal, commit first if the refusal says its writes stand
    (``CrowdError.persist``). ``session`` may be a bare connection (the hot lane's), which
    ``work`` receives instead."""
    session = session if session is not None else get_session()
    for attempt in range(_ATTEMPTS):
        try:
            result = work(session)
            session.commit()
            return result
        except CrowdError as exc:
            if exc.persist:
                session.commit()
            else:
                session.rollback()
            raise
        except (DBAPIError, psycopg.Error) as exc:
            _reset(session, exc)
            if not (_retryable(exc) or _disconnected(exc)) or attempt == _ATTEMPTS - 1:
                raise
            log.info("retrying a worker request after %s", type(exc).__name__)
            # Let the other writer finish: 12-25 ms, then doubling (about 0.2-0.4 s in all).
            time.sleep(0.025 * 2**attempt * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def _token() -> str:
    token = request.headers.get("X-Worker-Token") or request.args.get("token") or ""
    if not token.strip():
        raise ApiError(401, "unauthorized", "send the invite token as 'X-Worker-Token: <token>'")
    return token.strip()


_W = Worker.__table__
_BY_TOKEN = select(
    _W.c.id, _W.c.project_id, _W.c.backend, _W.c.qualified, _W.c.blocked, _W.c.blocked_reason
).where(_W.c.token_hash == bindparam("token_hash"))


def current_worker() -> WorkerRow:
    row = get_session().execute(_BY_TOKEN, {"token_hash": hash_secret(_token())}).first()
    if row is None:
        raise ApiError(401, "unauthorized", "the worker token is not valid")
    return WorkerRow(row[0], row[1], Backend(row[2]), bool(row[3]), bool(row[4]), row[5])


def worker_view(view: Callable[..., Any]) -> Callable[..., Any]:
    """Resolve the worker before the view runs (401 without a valid token)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return view(current_worker(), *args, **kwargs)

    return wrapper


def answer_triples(body: AnswersIn) -> list[tuple[str, bool, int]]:
    return [(a.question_id, a.value, a.ms) for a in body.answers]


@bp.get("/me")
@worker_view
def me(worker: WorkerRow):
    """The calling worker's standing: qualified, blocked (with the reason)."""
    return jsonify(
        {
            "worker_id": worker.id,
            "qualified": worker.qualified,
            "blocked": worker.blocked,
            "blocked_reason": worker.blocked_reason,
        }
    )


@bp.get("/qualification")
@writes  # starts an attempt if none is open
@worker_view
def get_qualification(worker: WorkerRow):
    """The worker's qualification test (starts an attempt if none is open)."""

    def work(session: Session):
        params = qualification_params(session, worker.project_id)
        return start_test(session, worker, params)

    return jsonify(in_transaction(work).to_json())


@bp.post("/qualification")
@worker_view
@accepts(AnswersIn)
def post_qualification(worker: WorkerRow):
    """Grade the qualification test: every question answered once."""
    answers = answer_triples(parse(AnswersIn))

    def work(session: Session):
        params = qualification_params(session, worker.project_id)
        return grade_test(session, worker, answers, params)

    return jsonify(in_transaction(work).to_json())


def _claim_response(served: Claim) -> Response:
    return Response(served.json_text(), mimetype="application/json")


def build_ahead(app: Flask, database: Database, campaign_id: int) -> None:
    """Build the campaign's next batch of HITs, if it still needs one; run once a claim's
    response has been sent, so the worker does not wait for it and the next claims find HITs
    instead of waiting for a build. Never raises: claims build on demand if this fails."""
    try:
        # The response is gone, and its application context with it: the build runs in one
        # of its own, so it records the batch's render job like any other build.
        with app.app_context(), database.session() as session:
            refill(session, campaign_id)
            session.commit()
    except Exception:
        log.exception("building HITs ahead for campaign %s failed", campaign_id)


def _refill_after(response: Response, campaign_id: int) -> None:
    app = current_app._get_current_object()
    database = get_database()
    response.call_on_close(lambda: build_ahead(app, database, campaign_id))


@bp.post("/assignments")
def claim_assignment():
    """Claim the next HIT (or resume the open one): questions and the lease's end."""
    token_hash = hash_secret(_token())
    database = get_database()
    if fastpath.available(database) and not request.environ.get(FAST_PATH_TRIED):
        outcome = fast_claim(database, token_hash)
        if outcome.claim is not None:
            response = _claim_response(outcome.claim)
            if outcome.refill is not None:
                _refill_after(response, outcome.refill)
            return response
        if outcome.worker is None:
            raise ApiError(401, "unauthorized", "the worker token is not valid")
    worker = current_worker()
    return _claim_response(in_transaction(lambda s: claim(s, worker)))


def fast_claim(database: Database, token_hash: str) -> fastpath.ClaimOutcome:
    """The claim statement on the thread's held autocommit connection. After an error the
    connection is dropped; after a dropped connection the claim is retried once on a new one
    (safe: a claim that did land is found again as the worker's open assignment), and the pool's
    connections are dropped too, as :func:`_reset` does: whatever cut this one cut those."""
    for attempt in range(2):
        try:
            return fastpath.claim(database.autocommit_connection(), token_hash)
        except psycopg.Error as exc:
            database.discard_autocommit_connection()
            if attempt or not _disconnected(exc):
                raise
            database.engine.dispose()
    raise AssertionError("unreachable")


@bp.post("/assignments/<string:assignment_id>/answers")
@accepts(AnswersIn)
def post_answers(assignment_id: str):
    """Store answers of an assignment (partial and repeated submissions are fine)."""
    token_hash = hash_secret(_token())
    answers = answer_triples(parse(AnswersIn))
    session = get_session()
    if fastpath.available(session) and not request.environ.get(FAST_PATH_TRIED):
        try:
            return jsonify(
                in_transaction(
                    lambda s: fastpath.submit(s, token_hash, assignment_id, answers)
                ).to_json()
            )
        except fastpath.Fallback:
            session.rollback()
    worker = current_worker()

    def work(session: Session):
        result = record_answers(session, worker.id, assignment_id, answers)
        if result.newly_complete:
            finalize_assignment(
                session, result.assignment_id, result.hit_id, worker.id, votes=result.votes
            )
        return result

    return jsonify(in_transaction(work).to_json())
