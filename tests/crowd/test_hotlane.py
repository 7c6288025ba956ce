"""The hot lane (:mod:`service.api.hotlane`): the ordinary claim and submission are served below
Flask, with the same answers; everything else reaches the Flask views, which say what is wrong."""

from __future__ import annotations

import json
import logging
from collections import Counter

import psycopg
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from service.api import hotlane, work
from service.api.validation import parse
from service.api.work import AnswersIn
from service.crowd import fastpath
from service.models import Assignment
from tests.crowd.world import (
    campaign_world,
    correct_answers,
    do_hit,
    stored_answers,
    worker_headers,
)

CLAIM, SUBMIT = "work.claim_assignment", "work.post_answers"


@pytest.fixture
def views(app, monkeypatch) -> Counter:
    """How many requests reached each of the two Flask views."""
    reached: Counter = Counter()
    for name in (CLAIM, SUBMIT):
        view = app.view_functions[name]

        def counted(*args, _view=view, _name=name, **kwargs):
            reached[_name] += 1
            return _view(*args, **kwargs)

        monkeypatch.setitem(app.view_functions, name, counted)
    return reached


def _served_once(client, db, name: str):
    """A campaign and a worker who has done one HIT: the first claim built the batch (through
    Flask's portable claim), so the next claims find HITs ready. ``(world, worker invite)``."""
    world, _, worker = campaign_world(client, db, name)
    assert do_hit(client, db, world, worker["token"]) is not None
    return world, worker


def _claim(client, token: str, **kwargs):
    response = client.post("/api/v1/work/assignments", headers=worker_headers(token), **kwargs)
    response.close()  # runs the build ahead, as a sent response does
    return response


def _answers(hit: dict, value: bool = True) -> dict:
    return {
        "answers": [{"question_id": q["id"], "value": value, "ms": 900} for q in hit["questions"]]
    }


def _submit_url(hit: dict) -> str:
    return f"/api/v1/work/assignments/{hit['assignment_id']}/answers"


def test_the_ordinary_cycle_never_reaches_flask(client, db, views):
    world, _, worker = campaign_world(client, db, "hot-cycle")
    assert do_hit(client, db, world, worker["token"]) is not None  # the first claim builds
    assert views == Counter({CLAIM: 1})  # no HIT was ready: Flask's portable claim built them

    views.clear()
    hit = _claim(client, worker["token"])
    assert hit.status_code == 200 and hit.mimetype == "application/json"
    body = hit.get_json()
    assert set(body) == {"answered", "assignment_id", "lease_expires_at", "questions"}
    assert len(body["questions"]) == 12 and body["answered"] == []
    # A reloaded page resumes the same claim, also below Flask.
    assert _claim(client, worker["token"]).get_json() == body
    right = correct_answers(db, world, [q["id"] for q in body["questions"]])
    answers = {"answers": [{"question_id": q, "value": v, "ms": 900} for q, v in right.items()]}
    headers = worker_headers(worker["token"])
    done = client.post(_submit_url(body), json=answers, headers=headers)
    assert done.status_code == 200
    assert done.get_json() == {"accepted": 12, "duplicates": 0, "complete": True}
    # Submitting again counts nothing twice.
    again = client.post(_submit_url(body), json=answers, headers=headers)
    assert again.get_json() == {"accepted": 0, "duplicates": 12, "complete": True}
    assert views == Counter()
    assignment = db.scalar(select(Assignment).where(Assignment.public_id == body["assignment_id"]))
    assert assignment.status == "approved" and assignment.gold_total == 2
    db.rollback()


def test_a_part_of_a_hit_submitted_below_flask_is_committed(client, db, views):
    """A partial submission is the one the fast path does not commit itself (nothing completes):
    the lane's connection must have begun a transaction its commit reaches, or the answers
    would be rolled back as the connection goes back to the pool."""
    world, worker = _served_once(client, db, "hot-partial")
    hit = _claim(client, worker["token"]).get_json()
    right = correct_answers(db, world, [q["id"] for q in hit["questions"]])
    answers = [{"question_id": q, "value": v, "ms": 900} for q, v in right.items()]
    headers = worker_headers(worker["token"])
    views.clear()
    first = client.post(_submit_url(hit), json={"answers": answers[:5]}, headers=headers)
    assert first.get_json() == {"accepted": 5, "duplicates": 0, "complete": False}
    assert stored_answers(db, hit["assignment_id"]) == 5
    rest = client.post(_submit_url(hit), json={"answers": answers}, headers=headers)
    assert rest.get_json() == {"accepted": 7, "duplicates": 5, "complete": True}
    assert views == Counter()
    assignment = db.scalar(select(Assignment).where(Assignment.public_id == hit["assignment_id"]))
    assert assignment.status == "approved"
    db.rollback()


def test_the_token_in_the_query_string_goes_through_flask(client, db, views):
    _, worker = _served_once(client, db, "hot-query")
    views.clear()
    response = client.post(f"/api/v1/work/assignments?token={worker['token']}")
    response.close()
    assert response.status_code == 200 and views == Counter({CLAIM: 1})


def test_bad_bodies_get_flasks_answer(client, db, views):
    _, worker = _served_once(client, db, "hot-bad")
    hit = _claim(client, worker["token"]).get_json()
    headers = {**worker_headers(worker["token"]), "Content-Type": "application/json"}
    views.clear()
    malformed = client.post(_submit_url(hit), data=b'{"answers": [', headers=headers)
    assert malformed.status_code == 400
    assert malformed.get_json()["error"]["message"].startswith("malformed JSON")
    wrong_type = client.post(
        _submit_url(hit), json={"answers": [{"question_id": "x", "value": "yes", "ms": 1}]},
        headers=worker_headers(worker["token"]),
    )  # fmt: skip
    assert wrong_type.status_code == 422
    assert "answers.0.value" in wrong_type.get_json()["error"]["message"]
    not_json = client.post(
        _submit_url(hit), data=b"answers", headers=worker_headers(worker["token"])
    )
    assert not_json.status_code == 415
    # A body shorter than its Content-Length (the sender stopped): what came is handed over.
    cut = json.dumps(_answers(hit)).encode()[:50]
    short = client.post(
        _submit_url(hit), data=cut, headers=headers, environ_overrides={"CONTENT_LENGTH": "4000"}
    )
    assert short.status_code == 400 and short.get_json()["error"]["code"] == "bad_request"
    # A byte-order mark: Python's JSON reader takes it, pydantic's does not; Flask serves it.
    marked = b"\xef\xbb\xbf" + json.dumps(_answers(hit)).encode()
    accepted = client.post(_submit_url(hit), data=marked, headers=headers)
    assert accepted.status_code == 200 and accepted.get_json()["accepted"] == 12
    assert views == Counter({SUBMIT: 5})


def test_a_refusal_is_the_same_below_and_in_flask(app, client, db, views):
    _, worker = _served_once(client, db, "hot-refusal")
    hit = _claim(client, worker["token"]).get_json()
    unknown = {"answers": [{"question_id": "not-in-this-hit", "value": True, "ms": 900}]}
    headers = worker_headers(worker["token"])
    views.clear()
    below = client.post(_submit_url(hit), json=unknown, headers=headers)
    assert views == Counter()
    lane = app.extensions["maskmill.hotlane"]
    lane.enabled = False
    try:
        through_flask = client.post(_submit_url(hit), json=unknown, headers=headers)
    finally:
        lane.enabled = True
    assert views == Counter({SUBMIT: 1})
    assert below.status_code == through_flask.status_code and 400 <= below.status_code < 500
    assert below.get_json() == through_flask.get_json()
    assert "not-in-this-hit" in below.get_json()["error"]["message"]


def test_what_the_fast_path_hands_back_flask_serves_without_trying_it_again(
    client, db, views, monkeypatch
):
    """Another worker's assignment: the fast submit finds no assignment for this token and hands
    the request back; the view goes straight to the portable code, which refuses it."""
    world, owner = _served_once(client, db, "hot-handback")
    hit = _claim(client, owner["token"]).get_json()
    intruder = client.post(f"/api/v1/projects/{world.project_id}/workers", headers=world.headers)
    token = intruder.get_json()["token"]
    tries: list[str] = []
    real = fastpath.submit
    monkeypatch.setattr(fastpath, "submit", lambda *a, **k: (tries.append(a[2]), real(*a, **k))[1])
    views.clear()
    refused = client.post(_submit_url(hit), json=_answers(hit), headers=worker_headers(token))
    assert refused.status_code in (403, 404), refused.get_json()
    assert views == Counter({SUBMIT: 1}) and tries == [hit["assignment_id"]]


def test_an_error_below_flask_is_served_again_by_flask(client, db, views, monkeypatch, caplog):
    _, worker = _served_once(client, db, "hot-error")
    real = work.fast_claim
    failures = iter([RuntimeError("a bug below Flask")])

    def fail_once(*args, **kwargs):
        for failure in failures:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(work, "fast_claim", fail_once)
    views.clear()
    with caplog.at_level(logging.ERROR, logger=hotlane.__name__):
        response = _claim(client, worker["token"])
    assert response.status_code == 200 and len(response.get_json()["questions"]) == 12
    assert views == Counter({CLAIM: 1})
    assert "handed a request to Flask after an error" in caplog.text


def test_a_large_body_is_left_to_flask(client, db, views):
    _, worker = _served_once(client, db, "hot-large")
    hit = _claim(client, worker["token"]).get_json()
    views.clear()
    padded = json.dumps(_answers(hit)) + " " * hotlane.MAX_HOT_BODY
    response = client.post(
        _submit_url(hit),
        data=padded,
        headers={**worker_headers(worker["token"]), "Content-Type": "application/json"},
    )
    assert response.status_code == 200 and response.get_json()["accepted"] == 12
    assert views == Counter({SUBMIT: 1})


@pytest.mark.parametrize(
    "body",
    [
        b'{"answers":[{"question_id":"a","value":true,"ms":1}]}',
        b'{"answers":[{"question_id":"a","value":1,"ms":1}]}',
        b'{"answers":[{"question_id":"a","value":true,"ms":1.0}]}',
        b'{"answers":[{"question_id":"a","value":true,"ms":"1"}]}',
        b'{"answers":[{"question_id":"a","value":"true","ms":1}]}',
        b'{"answers":[{"question_id":1,"value":true,"ms":1}]}',
        b'{"answers":[{"question_id":"a","value":true,"ms":1,"extra":2}]}',
        b'{"answers":[]}',
        b"[]",
        b'{"answers":[{"question_id":"a","value":true,"ms":1}],"answers":[]}',
        b'{"answers":[{"question_id":"a","value":true,"ms":NaN}]}',
        b'{"answers":[{"question_id":"\\ud800","value":true,"ms":1}]}',
        b'{"answers":[{"question_id":"a","value":true,"ms":1e3}]}',
        b'{"answers":[{"question_id":"a","value":true,"ms":-1}]}',
        b'{"answers":[{"question_id":"a","value":null,"ms":1}]}',
        b'{"answers":[{"question_id":"","value":true,"ms":1}]}',
    ],
)
def test_the_lane_accepts_no_body_flask_would_refuse(app, body):
    """The lane validates the raw JSON with pydantic's JSON mode; Flask reads it with Python's
    JSON reader first. Whatever the lane accepts, Flask must accept with the same meaning."""
    try:
        below = AnswersIn.model_validate_json(body)
    except ValidationError:
        return  # handed to Flask, which decides
    with app.test_request_context(data=body, content_type="application/json"):
        assert parse(AnswersIn) == below


def _fail_submit_once(monkeypatch, error: Exception) -> None:
    real = fastpath.submit

    def fail(*args, **kwargs):
        monkeypatch.setattr(fastpath, "submit", real)  # once
        raise error

    monkeypatch.setattr(fastpath, "submit", fail)


def test_a_dropped_connection_is_retried_in_the_lane(client, db, views, monkeypatch):
    _, worker = _served_once(client, db, "hot-dropped")
    hit = _claim(client, worker["token"]).get_json()
    _fail_submit_once(monkeypatch, psycopg.OperationalError("server closed the connection"))
    views.clear()
    headers = worker_headers(worker["token"])
    done = client.post(_submit_url(hit), json=_answers(hit), headers=headers)
    assert done.status_code == 200 and done.get_json()["accepted"] == 12
    assert views == Counter()  # in_transaction retried on a fresh connection, as in Flask


def test_a_database_error_hands_the_submission_to_flask(client, db, views, monkeypatch, caplog):
    """One the lane does not retry: logged without a trace, and Flask serves the submission
    from the start (here the error does not come back)."""
    _, worker = _served_once(client, db, "hot-db-error")
    hit = _claim(client, worker["token"]).get_json()
    _fail_submit_once(monkeypatch, psycopg.errors.QueryCanceled("canceling statement"))
    views.clear()
    headers = worker_headers(worker["token"])
    with caplog.at_level(logging.WARNING, logger=hotlane.__name__):
        done = client.post(_submit_url(hit), json=_answers(hit), headers=headers)
    assert done.status_code == 200 and done.get_json()["accepted"] == 12
    assert views == Counter({SUBMIT: 1})
    assert "after a database error: canceling statement" in caplog.text
    assert "Traceback" not in caplog.text
