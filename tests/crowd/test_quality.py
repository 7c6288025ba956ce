"""Quality control and qualification: rejected HITs, blocked workers and too-fast submissions are
stored with their reasons and their questions are asked again; the qualification test passes,
fails, and limits and spaces retakes."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.crowd.qualification import _ensure_pool
from service.crowd.quality import assignment_stats
from service.db import get_database
from service.models import (
    Assignment,
    Campaign,
    Cluster,
    ClusterState,
    GoldItem,
    Question,
    QuestionKind,
    QuestionStatus,
    Worker,
)
from tests.crowd.world import (
    add_gold,
    add_tree,
    block_world,
    correct_answers,
    do_hit,
    invite,
    make_world,
    qualify_directly,
    worker_headers,
)
from tests.helpers import hit_answers, hit_questions

ALL_NO = [False] * 5  # every gold item's answer is "no": a yes-sayer gets 0/5


def _setup(client, db, name, **campaign):
    world = make_world(client, db, name=name)
    scores, truth = block_world("GL" * 8)
    add_tree(db, world, scores, truth)
    gold_ids = add_gold(db, world, ALL_NO)
    body = {"questions_per_hit": 15, "gold_per_hit": 5}
    body.update(campaign)
    return world, world.campaign(client, **body), gold_ids


def _worker(client, db, world):
    worker = invite(client, world)
    qualify_directly(db, worker["worker_id"])
    return worker


def _assignment(db, public_id):
    db.rollback()
    return db.scalar(select(Assignment).where(Assignment.public_id == public_id))


def _sample_questions(db, hit):
    ids = [q["id"] for q in hit["questions"]]
    return hit_questions(db, public_id=ids, kind=QuestionKind.SAMPLE)


def test_a_hit_failing_gold_is_rejected_and_reasked(client, db):
    # One HIT built at a time: the re-asked clusters are next in line, not behind a built batch.
    world, campaign, _ = _setup(
        client, db, "gold-fail", params={"hits_per_build": 1, "build_batch_hits": 1}
    )
    spammer, honest = _worker(client, db, world), _worker(client, db, world)
    hit = do_hit(client, db, world, spammer["token"], answerer=lambda _q, _right: True)
    assignment = _assignment(db, hit["assignment_id"])
    assert assignment.status == "rejected"
    assert "gold 0/5" in assignment.decision_reason and "below" in assignment.decision_reason
    samples = _sample_questions(db, hit)
    assert samples and all(q.status == QuestionStatus.DISCARDED for q in samples)
    sample_ids = {q.id for q in samples}
    answers = hit_answers(db, Assignment.id == assignment.id)
    assert len(answers) == len(hit["questions"])
    assert all(
        a.discarded and "gold 0/5" in a.discard_reason
        for a in answers
        if a.question_id in sample_ids
    )
    assert not any(a.discarded for a in answers if a.question_id not in sample_ids)
    # Gold answers are kept (they are the evidence) and nothing was counted.
    cluster_ids = {q.cluster_id for q in samples}
    clusters = db.scalars(select(Cluster).where(Cluster.id.in_(cluster_ids))).all()
    assert all(c.state == ClusterState.CANDIDATE and c.yes_count == 0 for c in clusters)
    # Not paid: the reservation went back to the budget.
    row = db.execute(
        select(Campaign.spent_micros, Campaign.reserved_micros).where(Campaign.id == campaign["id"])
    ).one()
    assert tuple(row) == (0, 0)
    # The same clusters are asked again, to the next worker, at the same priority.
    again = do_hit(client, db, world, honest["token"])
    asked_again = {q.cluster_id for q in _sample_questions(db, again)}
    assert cluster_ids & asked_again


def test_a_worker_below_the_running_gold_threshold_is_blocked(client, db):
    """3/5 gold per HIT passes each HIT (0.6) but 6/10 overall is under 0.7: blocked after the
    second HIT; the unchecked answers of both HITs are discarded and re-asked. (Ten questions per
    HIT: no cluster gets its 15 answers, so none is decided before the block.)"""
    world, campaign, gold_ids = _setup(client, db, "block", questions_per_hit=10)
    sloppy = _worker(client, db, world)
    wrong = {"n": 0}

    def two_wrong_gold(qid: str, right: bool) -> bool:
        (kind,) = [q.kind for q in hit_questions(db, public_id=qid)]
        db.rollback()
        if kind == "gold" and wrong["n"] % 5 < 2:
            wrong["n"] += 1
            return not right
        if kind == "gold":
            wrong["n"] += 1
        return right

    first = do_hit(client, db, world, sloppy["token"], answerer=two_wrong_gold)
    assert _assignment(db, first["assignment_id"]).status == "approved"
    counted = db.scalar(select(func.sum(Cluster.yes_count)).where(Cluster.tree_id == world.tree_id))
    assert counted == 10
    second = do_hit(client, db, world, sloppy["token"], answerer=two_wrong_gold)
    assert _assignment(db, second["assignment_id"]).status == "approved"  # 3/5 passes the HIT
    worker = db.get(Worker, sloppy["worker_id"])
    assert worker.blocked and worker.gold_correct == 6 and worker.gold_total == 10
    assert "6/10" in worker.blocked_reason and "0.70" in worker.blocked_reason
    for hit in (first, second):
        for q in _sample_questions(db, hit):
            assert q.status == QuestionStatus.DISCARDED
    sample_ids = {q.id for hit in (first, second) for q in _sample_questions(db, hit)}
    reasons = [
        a.discard_reason
        for a in hit_answers(db, Assignment.worker_id == sloppy["worker_id"])
        if a.question_id in sample_ids
    ]
    assert reasons and all(r and r.startswith("worker blocked") for r in reasons)
    # Counts were taken back: nothing of theirs stands, every cluster is asked again.
    counted = db.scalar(select(func.sum(Cluster.yes_count)).where(Cluster.tree_id == world.tree_id))
    assert counted == 0
    assert (
        db.scalar(
            select(func.count()).where(
                Cluster.tree_id == world.tree_id, Cluster.state == ClusterState.ACCEPTED
            )
        )
        == 0
    )
    blocked = client.post("/api/v1/work/assignments", headers=worker_headers(sloppy["token"]))
    assert blocked.status_code == 403 and blocked.get_json()["error"]["code"] == "blocked"
    progress = client.get(f"/api/v1/campaigns/{campaign['id']}", headers=world.headers).get_json()
    assert progress["workers"] == {"active": 0, "blocked": 1}
    assert gold_ids  # gold items were in play


def test_quality_control_reads_the_same_numbers_as_sql(client, db):
    """The hot path scores an assignment from rows it already holds; the SQL aggregate agrees."""
    world, _, _ = _setup(client, db, "stats")
    worker = _worker(client, db, world)
    hit = do_hit(client, db, world, worker["token"], answerer=lambda q, right: right, ms=1234)
    assignment = _assignment(db, hit["assignment_id"])
    stats = assignment_stats(db, assignment.id)
    assert (stats.answers, stats.total_ms) == (20, 20 * 1234)
    assert (
        (stats.gold_correct, stats.gold_total)
        == (
            assignment.gold_correct,
            assignment.gold_total,
        )
        == (5, 5)
    )
    assert "gold 5/5" in assignment.decision_reason and "1234 ms" in assignment.decision_reason


def test_too_fast_submissions_are_discarded(client, db):
    world, campaign, _ = _setup(client, db, "fast")
    hasty = _worker(client, db, world)
    hit = do_hit(client, db, world, hasty["token"], ms=120)
    assignment = _assignment(db, hit["assignment_id"])
    assert assignment.status == "rejected" and "too fast" in assignment.decision_reason
    assert "120 ms" in assignment.decision_reason and "500 ms" in assignment.decision_reason
    assert all(q.status == QuestionStatus.DISCARDED for q in _sample_questions(db, hit))
    progress = client.get(f"/api/v1/campaigns/{campaign['id']}", headers=world.headers).get_json()
    assert progress["questions"]["answered"] == 0 and progress["spent_usd"] == 0


def test_a_good_worker_gets_clusters_accepted(client, db):
    world, campaign, _ = _setup(client, db, "good")
    good = _worker(client, db, world)
    for _ in range(8):
        assert do_hit(client, db, world, good["token"]) is not None
    assert do_hit(client, db, world, good["token"]) is None
    progress = client.get(f"/api/v1/campaigns/{campaign['id']}", headers=world.headers).get_json()
    assert progress["clusters"]["accepted"] == 8
    assert progress["masks"] == {
        "accepted": 128,
        "rejected": 128,
        "skipped": 0,
        "pending": 0,
        "total": 256,
    }
    assert progress["questions"] == {"asked": 120, "answered": 120, "discarded": 0}
    assert progress["status"] == "finished"
    assert progress["spent_usd"] == 4.0


# ------------------------------------------------------------------------------ qualification


def _qual_world(client, db, name):
    world = make_world(client, db, name=name)
    add_gold(db, world, [True, False] * 5, for_qualification=True)
    world.campaign(client, params={"qualification_retry_seconds": 600})
    return world


def _take(client, db, token, correct: int):
    headers = worker_headers(token)
    test = client.get("/api/v1/work/qualification", headers=headers)
    if test.status_code != 200:
        return test
    questions = test.get_json()["questions"]
    assert len(questions) == 10
    right = correct_answers(db, None, [q["id"] for q in questions])
    answers = [
        {
            "question_id": q["id"],
            "value": right[q["id"]] if i < correct else not right[q["id"]],
            "ms": 900,
        }
        for i, q in enumerate(questions)
    ]
    return client.post("/api/v1/work/qualification", json={"answers": answers}, headers=headers)


def test_qualification_pass(client, db):
    world = _qual_world(client, db, "qual-pass")
    worker = invite(client, world)
    headers = worker_headers(worker["token"])
    test = client.get("/api/v1/work/qualification", headers=headers).get_json()
    again = client.get("/api/v1/work/qualification", headers=headers).get_json()
    assert again["questions"] == test["questions"]  # a reload shows the same test
    for q in test["questions"]:
        assert set(q) == {"id", "image_url", "class_name"}
    result = _take(client, db, worker["token"], correct=8)
    assert result.get_json()["passed"] is True and result.get_json()["correct"] == 8
    assert client.get("/api/v1/work/me", headers=headers).get_json()["qualified"] is True


def test_qualification_fail_retake_spacing_and_limit(client, db):
    world = _qual_world(client, db, "qual-fail")
    worker = invite(client, world)
    headers = worker_headers(worker["token"])
    failed = _take(client, db, worker["token"], correct=7).get_json()
    assert failed == {
        "passed": False,
        "correct": 7,
        "total": 10,
        "retry_after_s": 600,
        "attempts_left": 2,
    }
    assert client.post("/api/v1/work/assignments", headers=headers).status_code == 403
    soon = client.get("/api/v1/work/qualification", headers=headers)
    assert soon.status_code == 429 and soon.get_json()["error"]["code"] == "retry_later"
    assert 0 < int(soon.headers["Retry-After"]) <= 600

    def wait_out():
        db.execute(
            update(Worker)
            .where(Worker.id == worker["worker_id"])
            .values(last_qualification_at=datetime.now(UTC) - timedelta(seconds=601))
        )
        db.commit()

    wait_out()
    assert _take(client, db, worker["token"], correct=0).get_json()["attempts_left"] == 1
    wait_out()
    last = _take(client, db, worker["token"], correct=3).get_json()
    assert last["passed"] is False and last["attempts_left"] == 0 and "retry_after_s" not in last
    wait_out()
    done = client.get("/api/v1/work/qualification", headers=headers)
    assert done.status_code == 403 and done.get_json()["error"]["code"] == "no_attempts_left"


def test_first_tests_started_at_once_get_one_question_per_item(app, client, db):
    """Two workers start a project's first tests at the same moment (PostgreSQL, read committed):
    the second waits for the first's new questions instead of adding copies of its own, which
    could show one mask twice in a test."""
    world = _qual_world(client, db, "qual-race")
    engine = get_database(app).engine
    with Session(engine) as first, Session(engine) as second:
        _ensure_pool(first, world.project_id)  # uncommitted: the second cannot see its rows
        done = threading.Event()

        def start_second() -> None:
            _ensure_pool(second, world.project_id)
            second.commit()
            done.set()

        thread = threading.Thread(target=start_second)
        thread.start()
        try:
            assert not done.wait(0.5), "the second did not wait for the first"
            first.commit()
            assert done.wait(10)
        finally:
            first.rollback()
            thread.join(10)
    per_item = db.execute(
        select(Question.gold_item_id, func.count())
        .join(GoldItem, GoldItem.id == Question.gold_item_id)
        .where(GoldItem.project_id == world.project_id)
        .group_by(Question.gold_item_id)
    ).all()
    assert len(per_item) == 10 and {n for _, n in per_item} == {1}


def test_qualification_answers_must_match_the_test(client, db):
    world = _qual_world(client, db, "qual-bad")
    worker = invite(client, world)
    headers = worker_headers(worker["token"])
    none_open = client.post(
        "/api/v1/work/qualification",
        json={"answers": [{"question_id": "x", "value": True, "ms": 1}]},
        headers=headers,
    )
    assert none_open.status_code == 409
    questions = client.get("/api/v1/work/qualification", headers=headers).get_json()["questions"]
    partial = client.post(
        "/api/v1/work/qualification",
        json={"answers": [{"question_id": questions[0]["id"], "value": True, "ms": 1}]},
        headers=headers,
    )
    assert partial.status_code == 422 and "unanswered" in partial.get_json()["error"]["message"]
    alien = client.post(
        "/api/v1/work/qualification",
        json={
            "answers": [{"question_id": q["id"], "value": True, "ms": 1} for q in questions]
            + [{"question_id": "bogus", "value": True, "ms": 1}]
        },
        headers=headers,
    )
    assert alien.status_code == 422 and "bogus" in alien.get_json()["error"]["message"]
    db.rollback()
    assert db.get(Worker, worker["worker_id"]).qualification_attempts == 0
