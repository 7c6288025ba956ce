"""The crowd's two hot requests, served below Flask when the fast path can serve them.

A crowd worker repeats two requests, claim a HIT and submit its answers, hundreds of times per
second across a campaign. On PostgreSQL each is a few statements of :mod:`service.crowd.fastpath`,
and Flask's own machinery around them (request and application contexts, routing, the request's
session, ``jsonify``) cost about as much CPU as the claim statement itself: measured with
``scripts/bench_service.py --request-cpu``, see ``HotLane``.

So this WSGI middleware, in front of the Flask app, takes exactly those two requests, and only
the ordinary case of each: a worker token in the ``X-Worker-Token`` header, a JSON body the
answers' model accepts, an assignment the fast path serves. It runs the same code as the Flask
views (:func:`service.api.work.fast_claim`, :func:`service.crowd.fastpath.submit` inside
:func:`service.api.work.in_transaction`, the same refusals) and answers the same JSON. Everything
else goes to Flask unchanged -- the token in the query string, a bad body (whose 4xx names the
problem), a claim with no HIT ready, a submission the fast path hands back, any error -- with
the body it read put back and, when the fast path was already tried, a mark in the environ
(``FAST_PATH_TRIED``) so the view goes straight to the portable code. Both kinds of request are
idempotent, so a request handed over after an error is simply served again from the start.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from flask import Flask
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import ClosingIterator

from service.api import work
from service.api.work import FAST_PATH_TRIED, AnswersIn, in_transaction, refusal
from service.auth import hash_secret
from service.crowd import CrowdError, fastpath
from service.db import Database

log = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

CLAIM_PATH = "/api/v1/work/assignments"
#: Public ids are base64url text; anything else (percent-escapes, slashes) is Flask's to route.
SUBMIT_PATH = re.compile(r"/api/v1/work/assignments/([A-Za-z0-9_-]{1,64})/answers")
#: Larger bodies (up to the service's limit) go to Flask: a HIT's answers are a few kB.
MAX_HOT_BODY = 256 * 1024


class _Answer:
    """What the hot lane sends back: status, headers, body, and what to run once it is sent."""

    __slots__ = ("after", "body", "headers", "status")

    def __init__(
        self,
        body: bytes,
        status: int = 200,
        headers: dict[str, str] | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        self.status, self.headers, self.body, self.after = status, headers or {}, body, after


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Answer:
    return _Answer(json.dumps(value, separators=(",", ":")).encode(), status, headers)


class HotLane:
    """WSGI middleware serving the ordinary claim and submission below Flask (module docstring).

    Measured on this machine (``bench_service.py --request-cpu``, gunicorn sync workers under
    load): CPU per claim 1.05 ms through Flask, of which the claim itself (``fast_claim``) was
    0.31 ms; per submission 2.73 ms, of which ``fastpath.submit`` 1.5 ms. Through this lane
    (``bench_compare.py --request-cpu`` against the same code without it, 12 slice pairs):
    0.72x per claim, 0.84x per submission, 1.10x HIT cycles/s.
    """

    def __init__(self, app: Flask, inner: WSGIApp, database: Database, max_body: int) -> None:
        self.app = app
        self.inner = inner
        self.database = database
        self.max_body = min(max_body, MAX_HOT_BODY)
        self.enabled = fastpath.available(database)  # the dialect only: nothing connects

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        answer = None
        if self.enabled and environ.get("REQUEST_METHOD") == "POST":
            # Either way Flask serves the request again from the start, retrying and reporting
            # what fails as it does.
            try:
                answer = self._serve(environ)
            except (DBAPIError, psycopg.Error) as exc:  # e.g. a connection the server dropped
                log.warning(
                    "the hot lane handed a request to Flask after a database error: %s", exc
                )
                answer = None
            except Exception:
                log.exception("the hot lane handed a request to Flask after an error")
                answer = None
        if answer is None:
            return self.inner(environ, start_response)
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(answer.body))),
            *answer.headers.items(),
        ]
        start_response(f"{answer.status} {HTTP_STATUS_CODES[answer.status]}", headers)
        if answer.after is not None:
            return ClosingIterator([answer.body], answer.after)
        return [answer.body]

    def _serve(self, environ: dict[str, Any]) -> _Answer | None:
        path = environ.get("PATH_INFO", "")
        token = environ.get("HTTP_X_WORKER_TOKEN", "").strip()
        if not token:
            return None  # in the query string, or missing: Flask's to accept or refuse
        if path == CLAIM_PATH:
            return self._claim(environ, hash_secret(token))
        match = SUBMIT_PATH.fullmatch(path)
        if match is not None:
            return self._submit(environ, hash_secret(token), match.group(1))
        return None

    def _claim(self, environ: dict[str, Any], token_hash: str) -> _Answer | None:
        outcome = work.fast_claim(self.database, token_hash)
        if outcome.claim is None:
            # No HIT ready, a lapsed lease to sweep, or a bad token: the portable claim's work.
            environ[FAST_PATH_TRIED] = True
            return None
        answer = _Answer(outcome.claim.json_text().encode())
        if outcome.refill is not None:
            campaign_id = outcome.refill
            answer.after = lambda: work.build_ahead(self.app, self.database, campaign_id)
        return answer

    def _submit(
        self, environ: dict[str, Any], token_hash: str, assignment_id: str
    ) -> _Answer | None:
        body = self._json_body(environ)
        if body is None:
            return None
        try:
            answers = work.answer_triples(AnswersIn.model_validate_json(body))
        except ValidationError:
            return None  # Flask parses it again and says what is wrong
        # A connection from the pool, not a session: see fastpath._transaction_connection.
        with self.database.engine.connect() as connection:
            try:
                result = in_transaction(
                    lambda c: fastpath.submit(c, token_hash, assignment_id, answers), connection
                )
            except fastpath.Fallback:
                connection.rollback()
                environ[FAST_PATH_TRIED] = True
                return None
            except CrowdError as exc:
                status, error, headers = refusal(exc)
                return _json(error, status, headers)
        return _json(result.to_json())

    def _json_body(self, environ: dict[str, Any]) -> bytes | None:
        """The whole body of a JSON request of a plausible size, read and put back for Flask;
        ``None`` (nothing read) for anything else."""
        mimetype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if mimetype != "application/json":
            return None
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return None
        if not 0 < length <= self.max_body:
            return None
        try:
            body = environ["wsgi.input"].read(length)
        except OSError:  # the client went away mid-body (gunicorn's NoMoreData is one)
            return None
        environ["wsgi.input"] = io.BytesIO(body)
        return body if len(body) == length else None
