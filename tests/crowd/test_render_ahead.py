"""Rendering ahead: every batch of HITs a claim builds records a render job in the build's own
transaction, dispatched to the job runner once it commits; the job fills the overlay cache, the
media route serves from it and still renders on demand what is not there yet.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from flask import Flask
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from service import jobs, render
from service.app import create_app
from service.crowd import hits
from service.crowd.hits import RENDER_JOB, build_hits, load_campaign, render_job_id
from service.db import get_database
from service.models import Hit, Job, JobStatus, QuestionKind
from service.render import overlay_key
from service.settings import Settings
from service.storage import open_storage
from tests.helpers import hit_questions
from tests.pages import Seeded, add_worker, seed_project

#: Small HITs: the root cluster's 15 samples make three, so a build renders about twenty overlays.
CAMPAIGN = {
    "budget_usd": 20.0,
    "backend": "local",
    "reward_per_hit_usd": 0.1,
    "questions_per_hit": 5,
    "gold_per_hit": 2,
}


@pytest.fixture(scope="module")
def settings(settings: Settings) -> Settings:
    """Not a ``testing`` app: a testing app records no render jobs (see ``hits._job_settings``)."""
    return settings.replace(job_retry_delays=(), testing=False)


@pytest.fixture()
def project(app: Flask, settings: Settings) -> Iterator[tuple[Seeded, int]]:
    """A fresh project (a candidate root of 24 masks) with a running campaign."""
    storage = open_storage(settings.storage_url)
    with get_database(app).session() as session:
        seeded = seed_project(session, storage, settings)
    created = app.test_client().post(
        f"/api/v1/projects/{seeded.project_id}/campaigns", json=CAMPAIGN, headers=seeded.headers
    )
    assert created.status_code == 201, created.get_json()
    yield seeded, created.get_json()["id"]


def _claim(app: Flask, seeded: Seeded) -> dict:
    with get_database(app).session() as session:
        _, token = add_worker(session, seeded.project_id, qualified=True)
    response = app.test_client().post("/api/v1/work/assignments", headers={"X-Worker-Token": token})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _hit_ids(db: Session, campaign_id: int) -> list[int]:
    return list(db.scalars(select(Hit.id).where(Hit.campaign_id == campaign_id).order_by(Hit.id)))


def _wait(settings: Settings, job_id: str) -> None:
    runner = jobs.dispatcher_for(settings)
    assert job_id in runner.futures, "the job was not dispatched"
    runner.wait(job_id, timeout=120)


def test_a_built_batch_is_rendered_by_its_job_and_served_from_the_cache(
    app, db, settings, project, monkeypatch
):
    seeded, campaign_id = project
    hit = _claim(app, seeded)
    hit_ids = _hit_ids(db, campaign_id)
    assert len(hit_ids) == 3  # 15 samples in HITs of 5 (gold comes on top)

    job_id = render_job_id(hit_ids)
    _wait(settings, job_id)
    job = db.get(Job, job_id)
    assert (job.func_name, job.queue, job.kwargs) == (RENDER_JOB, "cpu", {"hit_ids": hit_ids})
    assert job.project_id == seeded.project_id
    assert job.status is JobStatus.FINISHED, job.error

    storage = open_storage(settings.storage_url)
    questions = hit_questions(db, hit_id=list(hit_ids))
    keys = {overlay_key(q) for q in questions}
    assert len(questions) == 3 * (5 + 2) and {q.kind for q in questions} == {
        QuestionKind.SAMPLE,
        QuestionKind.GOLD,
    }
    assert all(storage.exists(key) for key in keys)
    # Several gold questions may show the same item: each overlay is rendered once.
    assert job.progress["result"] == {
        "rendered": len(keys),
        "cached": len(questions) - len(keys),
        "missing": 0,
        "failed": 0,
    }

    # The worker's page now reads every image from the cache: nothing is rendered.
    def boom(*_args, **_kwargs):
        raise AssertionError("rendered although the render job cached it")

    monkeypatch.setattr(render, "render_overlay", boom)
    client = app.test_client()
    for item in hit["questions"]:
        (question,) = hit_questions(db, public_id=item["id"])
        response = client.get(item["image_url"])
        assert response.status_code == 200
        assert response.mimetype == "image/jpeg"
        assert response.data == storage.get_bytes(overlay_key(question))


def test_the_media_route_renders_what_is_not_cached_yet(app, db, settings, project):
    seeded, campaign_id = project
    hit = _claim(app, seeded)
    _wait(settings, render_job_id(_hit_ids(db, campaign_id)))
    storage = open_storage(settings.storage_url)
    item = hit["questions"][0]
    (question,) = hit_questions(db, public_id=item["id"])
    key = overlay_key(question)
    cached = storage.get_bytes(key)
    storage.delete(key)  # as if the job had not got to it yet

    response = app.test_client().get(item["image_url"])
    assert response.status_code == 200
    # Rendering is deterministic: on demand gives the very bytes the job had stored.
    assert response.data == cached and storage.get_bytes(key) == cached


def _build_in_app(app: Flask, campaign_id: int) -> tuple[list[int], int]:
    """Build one batch inside an app context, counting the statements SQLAlchemy sends; the
    transaction is rolled back."""
    engine = get_database(app).engine
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with app.app_context(), get_database(app).session() as session:
            built = build_hits(session, load_campaign(session, campaign_id))
            recorded = session.scalars(select(Job.id).where(Job.id.like("render-%"))).all()
            assert (render_job_id(built) in recorded) is (not app.testing)
            statements.pop()  # the check just above
            session.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return built, len(statements)


def test_the_job_costs_one_statement_and_is_dropped_with_a_rolled_back_build(
    app, db, settings, project
):
    _, campaign_id = project
    built, with_job = _build_in_app(app, campaign_id)
    assert built
    # Rolled back: no row, and nothing went to the runner (it would look for a row in vain).
    assert db.get(Job, render_job_id(built)) is None
    assert render_job_id(built) not in jobs.dispatcher_for(settings).futures

    # The same build in a testing app (same database) records no job: one statement fewer.
    testing = create_app(settings.replace(testing=True))
    try:
        again, without_job = _build_in_app(testing, campaign_id)
    finally:
        get_database(testing).dispose()
    assert len(again) == len(built)
    assert with_job == without_job + 1


def test_no_job_without_an_app_context(app, db, project):
    _, campaign_id = project
    with get_database(app).session() as session:
        built = build_hits(session, load_campaign(session, campaign_id))
        session.commit()
    assert built
    assert db.get(Job, render_job_id(built)) is None


def test_a_failed_dispatch_leaves_the_claim_served_and_the_job_queued(
    app, db, settings, project, monkeypatch, caplog
):
    seeded, campaign_id = project

    def unreachable(_settings):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(jobs, "dispatcher_for", unreachable)
    with caplog.at_level(logging.ERROR, logger=hits.__name__):
        _claim(app, seeded)
    job_id = render_job_id(_hit_ids(db, campaign_id))
    assert db.get(Job, job_id).status is JobStatus.QUEUED  # a reconciler can dispatch it later
    assert f"could not dispatch {job_id}" in caplog.text


def test_render_job_id_and_job_arguments_are_checked(settings):
    from workers.render import MAX_HITS_PER_JOB, render_hits_job

    assert render_job_id([7, 8, 9]) == "render-hits-7-n3"
    with pytest.raises(ValueError, match="at least one HIT"):
        render_job_id([])
    with jobs.job_context_for_tests(settings) as ctx:
        with pytest.raises(ValueError, match="hit_ids must be a list"):
            render_hits_job(ctx, hit_ids="1,2")
        with pytest.raises(ValueError, match="integers only"):
            render_hits_job(ctx, hit_ids=[1, True])
        with pytest.raises(ValueError, match="at most"):
            render_hits_job(ctx, hit_ids=list(range(MAX_HITS_PER_JOB + 1)))
        assert render_hits_job(ctx, hit_ids=[]) == {
            "rendered": 0,
            "cached": 0,
            "missing": 0,
            "failed": 0,
        }


def test_a_missing_tree_file_fails_its_questions_with_one_warning(
    app, db, settings, project, caplog
):
    from workers.render import render_hits

    seeded, campaign_id = project
    with get_database(app).session() as session:
        built = build_hits(session, load_campaign(session, campaign_id))
        session.commit()
    storage = open_storage(settings.storage_url)
    storage.delete(seeded.tree_key)
    with caplog.at_level(logging.WARNING, logger="workers.render"):
        report = render_hits(get_database(app), storage, settings, built)
    sample_count = len(hit_questions(db, hit_id=list(built), kind=QuestionKind.SAMPLE))
    assert report.failed == sample_count == 15
    warnings = [r for r in caplog.records if r.name == "workers.render"]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("15 question(s)")


def test_a_batch_built_ahead_after_the_response_records_its_render_job_too(app, client, db):
    from tests.crowd.world import campaign_world, worker_headers

    _, campaign, worker = campaign_world(
        client, db, "ahead", "GL" * 8, params={"hits_per_build": 2, "build_batch_hits": 4}
    )
    headers = worker_headers(worker["token"])
    first = client.post("/api/v1/work/assignments", headers=headers)
    assert first.status_code == 200  # no open HIT: this claim built a batch of 4, took one
    answers = [
        {"question_id": q["id"], "value": True, "ms": 900} for q in first.get_json()["questions"]
    ]
    url = f"/api/v1/work/assignments/{first.get_json()['assignment_id']}/answers"
    assert client.post(url, json={"answers": answers}, headers=headers).status_code == 200
    before = _hit_ids(db, campaign["id"])
    db.rollback()
    second = client.post("/api/v1/work/assignments", headers=headers)
    assert second.status_code == 200
    # The fast path left 2 open (< 4): the next batch is built once the response is closed,
    # outside the request's application context -- and records its render job all the same.
    second.close()
    built_ahead = [h for h in _hit_ids(db, campaign["id"]) if h not in before]
    db.rollback()
    assert built_ahead, "nothing was built ahead"
    job = db.get(Job, render_job_id(built_ahead))
    assert job is not None and job.func_name == RENDER_JOB, "the batch built ahead has no job"
    assert job.kwargs == {"hit_ids": built_ahead}
    db.rollback()
