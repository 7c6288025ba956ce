"""The HTML pages (HIT, qualification, instructions, dashboard), the media URLs and the timeline."""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from service.crowd.qualification import _ensure_pool
from service.db import get_database
from service.models import (
    Assignment,
    Campaign,
    Cluster,
    ClusterState,
    Question,
    QuestionKind,
)
from service.render import EXAMPLES
from service.storage import open_storage
from tests.helpers import hit_questions, new_key
from tests.pages import add_worker, seed_project

MEDIA_URL = re.compile(r"^/media/q/[A-Za-z0-9_-]{16,64}\.jpg$")
PREVIEW = {
    "assignmentId": "ASSIGNMENT_ID_NOT_AVAILABLE",
    "hitId": "3XYZ",
    "workerId": "",
    "turkSubmitTo": "https://workersandbox.mturk.com",
}


@pytest.fixture(scope="module")
def seeded(app, settings):
    with get_database(app).session() as session:
        return seed_project(session, open_storage(settings.storage_url), settings)


@pytest.fixture(scope="module")
def campaign_id(app, seeded):
    response = app.test_client().post(
        f"/api/v1/projects/{seeded.project_id}/campaigns",
        json={
            "budget_usd": 5,
            "backend": "local",
            "reward_per_hit_usd": 0.05,
            "questions_per_hit": 6,
            "gold_per_hit": 2,
        },
        headers=seeded.headers,
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def _html(response, status: int) -> str:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == "text/html"
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["Referrer-Policy"] == "no-referrer"
    return text


def _config(text: str) -> dict:
    match = re.search(r'<script id="mm-config" type="application/json">(.*?)</script>', text, re.S)
    assert match, "no config block"
    return json.loads(match.group(1))


# ------------------------------------------------------------------------------------- the HIT


def test_preview_shows_instructions_and_an_example_and_claims_nothing(client, db, seeded):
    before = db.scalar(select(func.count()).select_from(Assignment))
    response = client.get("/hit", query_string=PREVIEW)
    text = _html(response, 200)
    assert 'id="preview"' in text and "Accept the HIT to start" in text
    assert text.count('class="example ') >= 1
    assert "mm-config" not in text and "hit.js" not in text  # no claiming code at all
    # MTurk shows the page in an iframe: it may be framed by MTurk, by nobody else.
    assert (
        "frame-ancestors 'self' https://www.mturk.com"
        in response.headers["Content-Security-Policy"]
    )
    assert db.scalar(select(func.count()).select_from(Assignment)) == before


def test_qualified_worker_gets_the_task_page(client, db, seeded):
    _, token = add_worker(db, seeded.project_id, qualified=True)
    text = _html(client.get("/hit", query_string={"token": token}), 200)
    config = _config(text)
    assert config["mode"] == "work" and config["token"] == token
    assert config["claimUrl"] == "/api/v1/work/assignments"
    assert 'id="verifier"' in text and "/static/hit.js" in text and "/static/verify.js" in text
    static = client.get("/static/hit.js")
    assert static.status_code == 200 and b"X-Worker-Token" not in static.data  # in verify.js
    assert b"X-Worker-Token" in client.get("/static/verify.js").data


def test_unqualified_worker_is_sent_to_the_qualification_test(client, db, seeded):
    _, token = add_worker(db, seeded.project_id)
    response = client.get("/hit", query_string={"token": token})
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/qualification?token=")
    text = _html(client.get(response.headers["Location"]), 200)
    assert 'id="start-test"' in text and _config(text)["testUrl"] == "/api/v1/work/qualification"


@pytest.mark.parametrize("path", ["/hit", "/qualification"])
def test_bad_token_gets_a_friendly_page(client, path):
    text = _html(client.get(path, query_string={"token": "not-a-real-token"}), 403)
    assert "This link does not work" in text and "invite link is not valid" in text
    assert "mm-config" not in text


def test_blocked_worker_sees_the_reason(client, db, seeded):
    _, token = add_worker(db, seeded.project_id, qualified=True, blocked_reason="gold 2/10")
    for path in ("/hit", "/qualification"):
        text = _html(client.get(path, query_string={"token": token}), 403)
        assert "gold 2/10" in text


def test_missing_token_and_mturk_assignments(client):
    assert "invite link" in _html(client.get("/hit"), 400)
    mturk = dict(PREVIEW, assignmentId="3ABC", workerId="A1")
    assert "Mechanical Turk" in _html(client.get("/hit", query_string=mturk), 501)
    assert "invite link" in _html(client.get("/qualification"), 400)


def test_qualified_worker_on_the_qualification_page(client, db, seeded):
    _, token = add_worker(db, seeded.project_id, qualified=True)
    text = _html(client.get("/qualification", query_string={"token": token}), 200)
    assert "You are qualified" in text and f"/hit?token={token}" in text


# ------------------------------------------------------------------------- other pages


def test_instructions_show_every_example(client):
    text = _html(client.get("/instructions"), 200)
    urls = re.findall(r'src="(/media/examples/[a-z_]+\.jpg)"', text)
    assert len(urls) == len(EXAMPLES)
    assert text.count('class="example correct"') == sum(e.answer for e in EXAMPLES)
    first = client.get(urls[0])
    assert first.status_code == 200 and first.mimetype == "image/jpeg"
    assert first.data[:2] == b"\xff\xd8"
    assert client.get("/media/examples/nope.jpg").status_code == 404


def test_dashboard_page(client):
    text = _html(client.get("/dashboard"), 200)
    assert 'id="key-form"' in text and "/static/dashboard.js" in text
    assert "frame-ancestors 'none'" in client.get("/dashboard").headers["Content-Security-Policy"]
    css = client.get("/static/maskmill.css")
    assert css.status_code == 200 and b"@media (max-width: 600px)" in css.data


# ------------------------------------------------------------------------------------ media


def test_media_urls_and_headers_are_identical_for_gold_and_samples(client, db, seeded, campaign_id):
    _, token = add_worker(db, seeded.project_id, qualified=True)
    claimed = client.post("/api/v1/work/assignments", headers={"X-Worker-Token": token})
    assert claimed.status_code == 200, claimed.get_json()
    payload = claimed.get_json()["questions"]
    kinds = {q.public_id: q.kind for q in hit_questions(db, public_id=[q["id"] for q in payload])}
    assert set(kinds.values()) == {QuestionKind.SAMPLE, QuestionKind.GOLD}
    header_sets = {}
    for question in payload:
        assert MEDIA_URL.match(question["image_url"]), question["image_url"]
        assert question["image_url"] == f"/media/q/{question['id']}.jpg"
        response = client.get(question["image_url"])
        assert response.status_code == 200 and response.mimetype == "image/jpeg"
        assert response.data[:2] == b"\xff\xd8"
        headers = {
            k: v for k, v in response.headers.items() if k not in ("Content-Length", "ETag", "Date")
        }
        header_sets.setdefault(kinds[question["id"]], set()).add(tuple(sorted(headers.items())))
    # One header set per kind, and the same one for both kinds.
    assert len(header_sets[QuestionKind.SAMPLE]) == 1
    assert header_sets[QuestionKind.SAMPLE] == header_sets[QuestionKind.GOLD]
    (single,) = header_sets[QuestionKind.GOLD]
    assert dict(single)["Cache-Control"].startswith("private, max-age=")


def test_media_conditional_get_and_unknown_ids(client, db, seeded):
    # A qualification question, as the first test of the project creates them (one per item).
    _ensure_pool(db, seeded.project_id)
    db.commit()
    question = db.scalar(
        select(Question).where(Question.gold_item_id == seeded.qualification_ids[0])
    )
    url = f"/media/q/{question.public_id}.jpg"
    first = client.get(url)
    assert first.status_code == 200 and first.headers["ETag"]
    again = client.get(url, headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304
    for bad in (f"/media/q/{secrets.token_urlsafe(16)}.jpg", "/media/q/%2E%2E%2Fetc.jpg"):
        response = client.get(bad)
        assert response.status_code == 404 and response.mimetype == "application/json"
        assert response.get_json()["error"]["code"] == "not_found"


# ---------------------------------------------------------------------------------- timeline


def test_timeline_counts_decisions_since_the_campaign_began(client, db, seeded, campaign_id):
    created = db.get(Campaign, campaign_id).created_at
    base = dict(project_id=seeded.project_id, tree_id=seeded.tree_id, score=0.9)
    rows = [
        Cluster(node=10_000, lo=0, hi=4, size=4, state=ClusterState.ACCEPTED, **base),
        Cluster(node=10_001, lo=4, hi=7, size=3, state=ClusterState.ACCEPTED, **base),
        Cluster(node=10_002, lo=7, hi=9, size=2, state=ClusterState.REJECTED, **base),
        Cluster(node=10_003, lo=9, hi=20, size=11, state=ClusterState.ACCEPTED, **base),
    ]
    db.add_all(rows)
    db.flush()
    moments = [created + timedelta(seconds=s) for s in (30, 90, 60)] + [
        created - timedelta(hours=1)  # before the campaign: not its work
    ]
    for row, moment in zip(rows, moments, strict=True):
        db.execute(update(Cluster).where(Cluster.id == row.id).values(decided_at=moment))
    db.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id)
        .values(created_at=created, status="stopped")
    )
    db.commit()
    try:
        response = client.get(
            f"/api/v1/campaigns/{campaign_id}/timeline?buckets=3", headers=seeded.headers
        )
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        # A finished campaign's axis ends at its last decision (90 s): 3 buckets of 30 s.
        assert body["bucket_seconds"] == 30
        points = body["points"]
        assert [p["accepted_masks"] for p in points] == [0, 4, 7]
        assert [p["rejected_masks"] for p in points] == [0, 0, 2]
        assert points[-1]["accepted_clusters"] == 2
        assert datetime.fromisoformat(points[-1]["t"]) == datetime.fromisoformat(body["end"])
        assert datetime.fromisoformat(body["start"]).astimezone(UTC) == created.astimezone(UTC)
    finally:
        for row in rows:
            db.delete(row)
        db.execute(update(Campaign).where(Campaign.id == campaign_id).values(status="running"))
        db.commit()


def test_timeline_is_private_and_validates_buckets(client, db, seeded, campaign_id):
    _, other = new_key(db, "other")
    url = f"/api/v1/campaigns/{campaign_id}/timeline"
    assert client.get(url, headers=other).status_code == 404
    assert client.get(url).status_code == 401
    bad = client.get(url + "?buckets=0", headers=seeded.headers)
    assert bad.status_code == 422 and "buckets" in bad.get_json()["error"]["message"]
    live = client.get(url, headers=seeded.headers).get_json()
    assert 1 <= len(live["points"]) <= 48


def test_timeline_on_sqlite(sqlite_url, tmp_path):
    # The embedded default buckets decision times with SQLite's date functions.
    from service import migrate
    from service.app import create_app
    from service.models import Backend, Project, ProjectClass, Round, Tree
    from service.settings import Settings

    migrate.upgrade(sqlite_url)
    app = create_app(Settings(database_url=sqlite_url, storage_url=str(tmp_path / "s")))
    with get_database(app).session() as session:
        key_id, headers = new_key(session)
        project = Project(name="p", api_key_id=key_id, params={})
        project.classes = [ProjectClass(name="a")]
        session.add(project)
        session.flush()
        round_row = Round(project_id=project.id, number=1)
        session.add(round_row)
        session.flush()
        tree = Tree(
            project_id=project.id,
            round_id=round_row.id,
            class_id=project.classes[0].id,
            uri="file:///nowhere",
            mask_count=100,
        )
        campaign = Campaign(
            project_id=project.id,
            backend=Backend.LOCAL,
            budget_micros=10,
            reward_per_hit_micros=1,
            status="stopped",
        )
        session.add_all([tree, campaign])
        session.flush()
        session.refresh(campaign)
        start = campaign.created_at.replace(tzinfo=UTC)
        for node, (seconds, state, size) in enumerate(
            [
                (10, ClusterState.ACCEPTED, 5),
                (40, ClusterState.REJECTED, 3),
                (100, ClusterState.ACCEPTED, 7),
            ]
        ):
            session.add(
                Cluster(
                    project_id=project.id,
                    tree_id=tree.id,
                    node=node,
                    lo=10 * node,
                    hi=10 * node + size,
                    size=size,
                    score=0.9,
                    state=state,
                    decided_at=start + timedelta(seconds=seconds),
                )
            )
        session.commit()
        campaign_id = campaign.id
    body = (
        app.test_client()
        .get(f"/api/v1/campaigns/{campaign_id}/timeline?buckets=4", headers=headers)
        .get_json()
    )
    get_database(app).dispose()
    assert body["bucket_seconds"] == 25
    assert [p["accepted_masks"] for p in body["points"]] == [5, 5, 5, 12]
    assert [p["rejected_masks"] for p in body["points"]] == [0, 3, 3, 3]
