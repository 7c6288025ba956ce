"""The HTML side of the service: the worker's HIT page, the qualification test, the instructions, the
requester dashboard, and the overlay images every question shows.

Pages are thin: they check who is asking (a local worker's invite token, or MTurk's ExternalQuestion
parameters) and hand the browser a small JSON config; the browser then talks to the JSON API
(``/api/v1/work/...`` for workers, the requester API for the dashboard). Errors a person can cause (a
bad invite link, a blocked account) get a friendly HTML page, never a stack trace.

Overlays are served at ``/media/q/<public_id>.jpg`` for every kind of question with the same headers,
so neither the URL, the headers nor the bytes' provenance tell gold from samples.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    redirect,
    render_template,
    request,
    url_for,
)
from sqlalchemy import select

from service.app import get_settings
from service.auth import hash_secret
from service.crowd import questions as hit_questions
from service.db import get_session
from service.errors import ApiError, not_found
from service.models import Question, Worker
from service.render import EXAMPLES, EXAMPLES_BY_NAME, example_overlay, overlay_for_question
from service.storage import Storage

log = logging.getLogger(__name__)

bp = Blueprint("pages", __name__)

#: MTurk's placeholder ``assignmentId`` while a worker previews a HIT (before accepting it).
PREVIEW_ASSIGNMENT_ID = "ASSIGNMENT_ID_NOT_AVAILABLE"

#: What a preview shows: one right and one wrong outline.
PREVIEW_EXAMPLES = ("good", "partial")

#: Overlays never change for a given public id; workers' browsers may keep them for a day.
MEDIA_MAX_AGE_S = 24 * 3600

# ``secrets.token_urlsafe`` alphabet; anything else cannot be a public id (cheap 404, no query).
_PUBLIC_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

# MTurk shows the HIT page in an iframe on its own sites; nothing else may frame our pages.
_MTURK_FRAMERS = "https://www.mturk.com https://workersandbox.mturk.com"


def _storage() -> Storage:
    return current_app.extensions["maskmill.storage"]


# ------------------------------------------------------------------------------------- helpers


def _secure(response: Response, *, frameable: bool = False) -> Response:
    """Headers every page gets. Scripts and styles only from our own origin (no inline script: the
    config travels as a JSON data block); no referrer, because invite tokens travel in URLs."""
    ancestors = f"'self' {_MTURK_FRAMERS}" if frameable else "'none'"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        f"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors {ancestors}"
    )
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"  # pages carry tokens and live state
    return response


def _page(template: str, status: int = 200, *, frameable: bool = False, **context: Any) -> Response:
    response = Response(render_template(template, **context), status=status, mimetype="text/html")
    return _secure(response, frameable=frameable)


def error_page(status: int, title: str, message: str, *, frameable: bool = False) -> Response:
    """A plain, friendly HTML error (the JSON error body is for API clients, not people)."""
    return _page("base.html", status, frameable=frameable, error_title=title, error_message=message)


def worker_for_token(token: str) -> Worker | None:
    """The local worker an invite token belongs to (only its SHA-256 is stored)."""
    if not token or len(token) > 200:
        return None
    return get_session().scalar(select(Worker).where(Worker.token_hash == hash_secret(token)))


def _invite_problem(
    token: str, *, frameable: bool = False
) -> tuple[Worker | None, Response | None]:
    """The token's worker, or the error page to show instead."""
    worker = worker_for_token(token)
    if worker is None:
        return None, error_page(
            403,
            "This link does not work",
            "The invite link is not valid. Check that you copied the whole link, or ask the "
            "project's requester for a new one.",
            frameable=frameable,
        )
    if worker.blocked:
        return None, error_page(
            403,
            "No more work for this account",
            "Your answers did not meet the quality needed for this project, so this account "
            f"cannot take more work. Reason: {worker.blocked_reason}",
            frameable=frameable,
        )
    return worker, None


def _examples(names: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    return [
        {
            "url": url_for("pages.example_image", name=e.name),
            "class_name": e.class_name,
            "answer": e.answer,
            "title": e.title,
            "explanation": e.explanation,
        }
        for e in EXAMPLES
        if names is None or e.name in names
    ]


# --------------------------------------------------------------------------------------- pages


@bp.get("/hit")
def hit():
    """The HIT page. MTurk's ExternalQuestion conventions: ``hitId, assignmentId, workerId,
    turkSubmitTo`` in the query, ``assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE`` while previewing (show
    the task, claim nothing). Local workers come with ``?token=<invite token>``."""
    token = request.args.get("token", "")
    assignment_id = request.args.get("assignmentId", "")
    if assignment_id == PREVIEW_ASSIGNMENT_ID:
        return _page(
            "hit.html", frameable=True, mode="preview", examples=_examples(PREVIEW_EXAMPLES)
        )
    if token:
        worker, problem = _invite_problem(token, frameable=True)
        if problem is not None:
            return problem
        if not worker.qualified:
            return redirect(url_for("pages.qualification", token=token))
        config = {
            "mode": "work",
            "token": token,
            "claimUrl": "/api/v1/work/assignments",
            "answersUrl": "/api/v1/work/assignments/{id}/answers",
            "qualificationUrl": url_for("pages.qualification", token=token),
            "instructionsUrl": url_for("pages.instructions", token=token),
        }
        return _page("hit.html", frameable=True, mode="work", page_config=config, examples=[])
    if assignment_id or request.args.get("workerId"):
        return error_page(
            501,
            "Not available on Mechanical Turk yet",
            "This server does not take Mechanical Turk assignments yet. Please return the HIT.",
            frameable=True,
        )
    return error_page(
        400,
        "Open this page from your invite link",
        "This page needs the personal link you were given to start working.",
        frameable=True,
    )


@bp.get("/qualification")
def qualification():
    """The qualification test: the same question UI over a few known masks, then pass / fail."""
    token = request.args.get("token", "")
    if not token:
        return error_page(
            400,
            "Open this page from your invite link",
            "The qualification test needs the personal link you were given.",
        )
    worker, problem = _invite_problem(token)
    if problem is not None:
        return problem
    config = {
        "mode": "qualification",
        "token": token,
        "testUrl": "/api/v1/work/qualification",
        "hitUrl": url_for("pages.hit", token=token),
        "instructionsUrl": url_for("pages.instructions", token=token),
    }
    return _page(
        "qualification.html",
        page_config=config,
        qualified=worker.qualified,
        hit_url=config["hitUrl"],
        instructions_url=config["instructionsUrl"],
    )


@bp.get("/instructions")
def instructions():
    """The task explained, with correct and incorrect examples."""
    token = request.args.get("token", "")
    back = url_for("pages.hit", token=token) if token and len(token) <= 200 else None
    return _page("instructions.html", examples=_examples(), back_url=back)


@bp.get("/dashboard")
def dashboard():
    """The requester dashboard: a static page; the browser asks for an API key and calls the API."""
    return _page("dashboard.html")


# --------------------------------------------------------------------------------------- media


def _image_response(data: bytes) -> Response:
    response = Response(data, mimetype="image/jpeg")
    response.headers["Cache-Control"] = f"private, max-age={MEDIA_MAX_AGE_S}"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.add_etag()
    return response.make_conditional(request)


@bp.get("/media/q/<public_id>.jpg")
def question_image(public_id: str):
    """The overlay a question shows (any kind of question; the same headers for all)."""
    if not _PUBLIC_ID.match(public_id):
        raise not_found("question")
    session = get_session()
    question = hit_questions.by_public_id(session, public_id) or session.scalar(
        select(Question).where(Question.public_id == public_id)
    )
    if question is None:
        raise not_found("question")
    try:
        data = overlay_for_question(session, _storage(), get_settings(), question)
    except (LookupError, ValueError) as exc:
        # A data problem (a moved image file, a missing tree file): log the detail for the operator;
        # the worker's page shows its own "image unavailable" message.
        log.error("overlay of question %s failed: %s", question.id, exc)
        raise ApiError(
            500, "render_failed", "this question's image could not be rendered"
        ) from None
    return _image_response(data)


@bp.get("/media/examples/<name>.jpg")
def example_image(name: str):
    """An instructions example, rendered from a synthetic scene on first request."""
    if name not in EXAMPLES_BY_NAME:
        raise not_found("example")
    return _image_response(example_overlay(_storage(), name))
