"""The PostgreSQL fast paths (:mod:`service.crowd.fastpath`): they serve the common claim and
submission themselves, leave the same rows the portable code would, hand the unusual cases back to
it, and HITs are built ahead of demand once the pool runs low."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter

import psycopg
import pytest
from sqlalchemy import func, insert, select

from service.crowd import MAX_BATCH_HITS, CrowdParams, fastpath, hits
from service.crowd.hits import (
    Claim,
    encode_payload,
    needs_refill,
    new_public_id,
    new_public_ids,
    question_payload,
)
from service.models import (
    Assignment,
    Campaign,
    Cluster,
    ClusterState,
    Hit,
    HitStatus,
    LedgerEntry,
    QuestionStatus,
)
from tests.crowd.world import (
    campaign_world,
    correct_answers,
    do_hit,
    stored_answers,
    worker_headers,
)
from tests.helpers import hit_answers, hit_questions


def _open_counts_agree(db, tree_id: int) -> None:
    """Every cluster's ``open_questions`` is the number of its sample questions still open."""
    counted = dict(
        Counter(
            q.cluster_id for q in hit_questions(db, tree_id=tree_id, status=QuestionStatus.OPEN)
        )
    )
    stored = dict(
        db.execute(
            select(Cluster.id, Cluster.open_questions).where(
                Cluster.tree_id == tree_id, Cluster.open_questions > 0
            )
        ).all()
    )
    db.rollback()
    assert stored == counted


def test_a_cycle_is_served_by_the_fast_path(client, db, monkeypatch):
    """After the first claim (which builds), claims and submissions never reach the portable
    functions, and leave exactly the rows and money movements the portable code leaves."""
    world, campaign, worker = campaign_world(client, db, "fast")
    assert do_hit(client, db, world, worker["token"]) is not None  # builds the first batch

    def portable(*_args, **_kwargs):
        raise AssertionError("the portable code was used")

    monkeypatch.setattr("service.api.work.claim", portable)
    monkeypatch.setattr("service.api.work.record_answers", portable)
    monkeypatch.setattr("service.crowd.quality.finalize_assignment", portable)
    hit = do_hit(client, db, world, worker["token"])
    assert hit is not None and len(hit["questions"]) == 12

    assignment = db.scalar(select(Assignment).where(Assignment.public_id == hit["assignment_id"]))
    assert assignment.status == "approved" and assignment.gold_total == 2
    assert assignment.decision_reason.startswith("approved: gold 2/2 correct")
    questions = hit_questions(db, hit_id=assignment.hit_id)
    assert len(questions) == 12 and {q.status for q in questions} == {QuestionStatus.ANSWERED}
    answers = hit_answers(db, Assignment.id == assignment.id)
    assert len(answers) == 12 and not any(a.discarded for a in answers)
    assert {a.question_id for a in answers} == {q.id for q in questions}
    assert {a.worker_id for a in answers} == {worker["worker_id"]}
    assert db.get(Hit, assignment.hit_id).status == HitStatus.COMPLETED
    spent = db.execute(
        select(func.count(), func.sum(LedgerEntry.amount_micros)).where(
            LedgerEntry.campaign_id == campaign["id"], LedgerEntry.kind == "spend"
        )
    ).one()
    assert tuple(spent) == (2, 1_000_000)
    row = db.execute(
        select(Campaign.spent_micros, Campaign.reserved_micros).where(Campaign.id == campaign["id"])
    ).one()
    assert row[0] == 1_000_000
    db.rollback()
    _open_counts_agree(db, world.tree_id)


def test_the_fast_path_counts_and_decides_like_the_engine(client, db):
    """Clusters decided by fast submissions: each decided cluster's counts are its answered
    questions' labels and its state is the policy's decision for them."""
    world, _, worker = campaign_world(client, db, "decide", blocks="GLBLGLBL", questions_per_hit=15)
    while do_hit(client, db, world, worker["token"]) is not None:
        pass
    states = dict(
        db.execute(
            select(Cluster.lo, Cluster.state).where(
                Cluster.tree_id == world.tree_id, Cluster.state.in_(["accepted", "rejected"])
            )
        ).all()
    )
    db.rollback()
    assert states == {
        0: ClusterState.ACCEPTED,
        32: ClusterState.REJECTED,
        64: ClusterState.ACCEPTED,
        96: ClusterState.REJECTED,
    }
    _open_counts_agree(db, world.tree_id)


def test_a_pool_running_low_is_refilled_after_the_response(client, db):
    _, campaign, worker = campaign_world(
        client, db, "refill", "GL" * 8, params={"hits_per_build": 2, "build_batch_hits": 4}
    )
    headers = worker_headers(worker["token"])
    open_hits = select(func.count()).where(
        Hit.campaign_id == campaign["id"], Hit.status == HitStatus.OPEN
    )
    first = client.post("/api/v1/work/assignments", headers=headers)
    assert first.status_code == 200
    assert db.scalar(open_hits) == 3  # the claim built a batch of 4 and took one
    db.rollback()
    answers = [
        {"question_id": q["id"], "value": True, "ms": 900} for q in first.get_json()["questions"]
    ]
    url = f"/api/v1/work/assignments/{first.get_json()['assignment_id']}/answers"
    assert client.post(url, json={"answers": answers}, headers=headers).status_code == 200
    second = client.post("/api/v1/work/assignments", headers=headers)
    assert second.status_code == 200
    assert db.scalar(open_hits) == 2  # taken by the fast path; the refill waits for the close
    db.rollback()
    second.close()  # the server closes the response after sending it: the refill runs now
    assert db.scalar(open_hits) == 6
    db.rollback()


def _record_refills(monkeypatch) -> list[int]:
    """The campaign ids claims build ahead for once their responses are sent, in order (the
    builds still run), whether Flask or the hot lane served the claim."""
    from service.api import work

    asked: list[int] = []
    real = work.build_ahead
    monkeypatch.setattr(
        work,
        "build_ahead",
        lambda app, database, cid: (asked.append(cid), real(app, database, cid)),
    )
    return asked


def test_claims_during_a_build_do_not_ask_for_another(client, db, monkeypatch):
    """While the build lock is held (a batch is being built), a claim that leaves the pool low
    does not schedule a refill of its own; once the lock is free, the next one does."""
    _, campaign, worker = campaign_world(
        client, db, "refill-busy", "GL" * 8, params={"hits_per_build": 2, "build_batch_hits": 4}
    )
    asked = _record_refills(monkeypatch)
    headers = worker_headers(worker["token"])

    def claim_and_answer() -> None:
        hit = client.post("/api/v1/work/assignments", headers=headers)
        assert hit.status_code == 200
        hit.close()
        body = hit.get_json()
        answers = [{"question_id": q["id"], "value": True, "ms": 900} for q in body["questions"]]
        url = f"/api/v1/work/assignments/{body['assignment_id']}/answers"
        assert client.post(url, json={"answers": answers}, headers=headers).status_code == 200

    claim_and_answer()  # builds the first batch on demand (the portable path): 3 left
    db.execute(select(func.pg_advisory_xact_lock(hits.BUILD_LOCK_CLASS, campaign["id"])))
    claim_and_answer()  # 2 left, but someone is building
    assert asked == []
    db.rollback()  # the build lock goes
    claim_and_answer()
    assert asked == [campaign["id"]]
    open_hits = select(func.count()).where(
        Hit.campaign_id == campaign["id"], Hit.status == HitStatus.OPEN
    )
    assert db.scalar(open_hits) == 1 + 4
    db.rollback()


def test_a_pool_beyond_what_a_claim_counts_asks_for_no_refill(client, db, monkeypatch):
    """The claim counts open HITs only up to MAX_BATCH_HITS + 1: a campaign holding more than
    that (the count's cap) still reads as full, at the largest batch size allowed."""
    _, campaign, worker = campaign_world(
        client, db, "big-pool", "GL" * 8, params={"build_batch_hits": MAX_BATCH_HITS}
    )
    asked = _record_refills(monkeypatch)
    # More open HITs than the cap (empty ones: only the count matters here).
    db.execute(
        insert(Hit),
        [
            {"campaign_id": campaign["id"], "cost_micros": 0, "payload": "[]"}
            for _ in range(MAX_BATCH_HITS + 5)
        ],
    )
    db.commit()
    hit = client.post("/api/v1/work/assignments", headers=worker_headers(worker["token"]))
    assert hit.status_code == 200
    hit.close()
    assert asked == []  # (a pool running low does ask: the tests above)


def test_refills_only_when_less_than_a_batch_is_left():
    params = CrowdParams(build_batch_hits=8)
    assert needs_refill(params, 7) and needs_refill(params, 0)
    assert not needs_refill(params, 8)


def test_a_busy_assignment_falls_back_and_waits(client, db, postgres, migrated_pg_url, monkeypatch):
    """A submission that finds its assignment row locked (a concurrent post of the same
    assignment) is served by the portable path, which waits for the lock."""
    world, _, worker = campaign_world(client, db, "busy")
    headers = worker_headers(worker["token"])
    portable_calls: list = []
    original = hits.record_answers

    def spy(*args, **kwargs):
        portable_calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr("service.api.work.record_answers", spy)
    hit = client.post("/api/v1/work/assignments", headers=headers).get_json()
    right = correct_answers(db, world, [q["id"] for q in hit["questions"]])
    answers = [
        {"question_id": q["id"], "value": right[q["id"]], "ms": 900} for q in hit["questions"]
    ]
    dsn = postgres.dsn(migrated_pg_url.rsplit("/", 1)[1])
    with psycopg.connect(dsn) as holder:
        holder.execute(
            "SELECT id FROM assignments WHERE public_id = %s FOR UPDATE", (hit["assignment_id"],)
        )
        done: list = []
        url = f"/api/v1/work/assignments/{hit['assignment_id']}/answers"
        poster = threading.Thread(
            target=lambda: done.append(
                client.application.test_client().post(
                    url, json={"answers": answers}, headers=headers
                )
            )
        )
        poster.start()
        time.sleep(0.3)
        assert not done  # waiting for the lock, not refused
        holder.rollback()
    poster.join(timeout=30)
    assert done and done[0].status_code == 200
    assert done[0].get_json() == {"accepted": 12, "duplicates": 0, "complete": True}
    assert portable_calls == [hit["assignment_id"]]
    assert stored_answers(db, hit["assignment_id"]) == 12


def test_concurrent_overlapping_posts_store_each_answer_once(client, db):
    """Without a unique index on answers, the assignment row lock is what keeps an answer from
    being stored twice: posts of overlapping parts of one HIT, sent at the same moment, together
    accept each answer once, store it once, and complete and pay the assignment once."""
    world, _, worker = campaign_world(client, db, "overlap")
    headers = worker_headers(worker["token"])
    hit = client.post("/api/v1/work/assignments", headers=headers).get_json()
    right = correct_answers(db, world, [q["id"] for q in hit["questions"]])
    answers = [
        {"question_id": q["id"], "value": right[q["id"]], "ms": 900} for q in hit["questions"]
    ]
    parts = [answers[:8], answers[4:], answers[2:10], answers]
    url = f"/api/v1/work/assignments/{hit['assignment_id']}/answers"
    start = threading.Barrier(len(parts))
    replies: list = []

    def post(part: list) -> None:
        poster = client.application.test_client()
        start.wait()
        replies.append(poster.post(url, json={"answers": part}, headers=headers))

    threads = [threading.Thread(target=post, args=(part,)) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [r.status_code for r in replies] == [200] * len(parts)
    bodies = [r.get_json() for r in replies]
    assert sum(b["accepted"] for b in bodies) == len(answers)
    assert sum(b["accepted"] + b["duplicates"] for b in bodies) == sum(map(len, parts))
    stored = hit_answers(db, Assignment.public_id == hit["assignment_id"])
    assert sorted(a.question_id for a in stored) == sorted(
        q.id for q in hit_questions(db, public_id=list(right))
    )
    assignment = db.scalar(select(Assignment).where(Assignment.public_id == hit["assignment_id"]))
    assert assignment.status == "approved"
    spends = db.scalar(
        select(func.count()).where(
            LedgerEntry.hit_id == assignment.hit_id, LedgerEntry.kind == "spend"
        )
    )
    db.rollback()
    assert spends == 1


def test_the_claim_payload_is_stored_once_and_sent_verbatim(client, db):
    _, _, worker = campaign_world(client, db, "payload")
    response = client.post("/api/v1/work/assignments", headers=worker_headers(worker["token"]))
    claim = response.get_json()
    assert list(claim) == ["answered", "assignment_id", "lease_expires_at", "questions"]
    assignment = db.scalar(select(Assignment).where(Assignment.public_id == claim["assignment_id"]))
    assert question_payload(db, assignment.hit_id) == claim["questions"]
    positions = [q.public_id for q in hit_questions(db, hit_id=assignment.hit_id)]
    db.rollback()
    assert [q["id"] for q in claim["questions"]] == list(positions)


def test_payload_encoding():
    ids = new_public_ids(3)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{24}", i) for i in [*ids, new_public_id()])
    assert len(set(ids)) == 3
    # One clock prefix for one call's ids; 96 random bits each after it.
    assert len({i[:8] for i in ids}) == 1 and len({i[8:] for i in ids}) == 3
    text = encode_payload([(ids[0], 'say "chair"'), (ids[1], "café"), (ids[2], 'say "chair"')])
    assert json.loads(text) == [
        {"class_name": 'say "chair"', "id": ids[0], "image_url": hits.image_url(ids[0])},
        {"class_name": "café", "id": ids[1], "image_url": hits.image_url(ids[1])},
        {"class_name": 'say "chair"', "id": ids[2], "image_url": hits.image_url(ids[2])},
    ]
    for bad in ['x", "gold": "1', "a,b", ""]:  # checked in one match, the comma too
        with pytest.raises(ValueError, match=f"not a public id: {re.escape(repr(bad))}"):
            encode_payload([(ids[0], "chair"), (bad, "chair"), (ids[1], "chair")])
    claim = Claim(ids[0], hits.utcnow(), text, [ids[1]])
    assert claim.to_json()["questions"] == json.loads(text)
    assert claim.to_json()["answered"] == [ids[1]]


def test_the_fast_path_is_postgres_only(db):
    assert fastpath.available(db)
