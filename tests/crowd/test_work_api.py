"""The campaign and worker APIs over HTTP: validation, isolation between keys, claiming and
answering (idempotency, ownership, unknown questions), gold stays hidden, leases, budget, stop."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update

from service.crowd.hits import build_hit, build_hits, load_campaign, sweep
from service.models import (
    Assignment,
    Campaign,
    Cluster,
    ClusterState,
    Hit,
    HitStatus,
    LedgerEntry,
)
from tests.crowd.world import (
    add_gold,
    add_tree,
    block_world,
    check_built_hits,
    correct_answers,
    do_hit,
    invite,
    make_world,
    qualify_directly,
    stored_answers,
    worker_headers,
)
from tests.helpers import hit_answers, hit_questions, new_key


def _world_with_work(client, db, name, blocks="GLGLGLGL", gold=(True, False, True)):
    world = make_world(client, db, name=name)
    scores, truth = block_world(blocks)
    add_tree(db, world, scores, truth)
    add_gold(db, world, list(gold))
    return world


def _qualified_worker(client, db, world):
    worker = invite(client, world)
    qualify_directly(db, worker["worker_id"])
    return worker


# ---------------------------------------------------------------------------------- campaigns


def test_create_campaign_validates_and_reports(client, db):
    world = make_world(client, db, name="create")
    url = f"/api/v1/projects/{world.project_id}/campaigns"
    bad = client.post(url, json={"budget_usd": "ten", "backend": "local"}, headers=world.headers)
    assert bad.status_code == 422
    message = bad.get_json()["error"]["message"]
    assert "budget_usd" in message and "reward_per_hit_usd" in message
    bad = client.post(
        url,
        json={"budget_usd": 1, "backend": "paper", "reward_per_hit_usd": 0.1},
        headers=world.headers,
    )
    assert bad.status_code == 422 and "backend" in bad.get_json()["error"]["message"]
    bad = client.post(
        url,
        json={
            "budget_usd": 1,
            "backend": "local",
            "reward_per_hit_usd": 0.1,
            "params": {"lease_secs": 5},
        },
        headers=world.headers,
    )
    assert bad.status_code == 422 and "lease_secs" in bad.get_json()["error"]["message"]

    campaign = world.campaign(client, budget_usd=12.5, reward_per_hit_usd=0.1)
    assert campaign["status"] == "running"
    assert campaign["questions_per_hit"] == 50 and campaign["gold_per_hit"] == 5
    assert campaign["budget_usd"] == 12.5 and campaign["hit_cost_usd"] == 0.1
    mturk = world.campaign(client, backend="mturk", reward_per_hit_usd=0.1)
    assert mturk["hit_cost_usd"] == 0.12  # MTurk's 20% fee
    progress = client.get(f"/api/v1/campaigns/{campaign['id']}", headers=world.headers).get_json()
    for key in ("status", "budget_usd", "spent_usd", "reserved_usd"):
        assert key in progress
    assert set(progress["questions"]) >= {"asked", "answered"}
    assert set(progress["clusters"]) >= {
        "candidate",
        "accepted",
        "rejected",
        "split",
        "auto_rejected",
        "auto_split",
    }
    assert set(progress["masks"]) >= {"accepted", "rejected", "pending"}
    assert set(progress["workers"]) == {"active", "blocked"}
    listed = client.get(url, headers=world.headers).get_json()["campaigns"]
    assert [c["id"] for c in listed] == [campaign["id"], mturk["id"]]


def test_a_key_cannot_see_another_keys_campaigns(client, db):
    world = make_world(client, db, name="owner")
    campaign = world.campaign(client)
    _, other = new_key(db, "intruder")
    assert client.get(f"/api/v1/campaigns/{campaign['id']}", headers=other).status_code == 404
    for action in ("pause", "resume", "stop"):
        response = client.post(f"/api/v1/campaigns/{campaign['id']}/{action}", headers=other)
        assert response.status_code == 404
    listing = client.get(f"/api/v1/projects/{world.project_id}/campaigns", headers=other)
    assert listing.status_code == 404
    created = client.post(
        f"/api/v1/projects/{world.project_id}/campaigns",
        json={"budget_usd": 1, "backend": "local", "reward_per_hit_usd": 0.1},
        headers=other,
    )
    assert created.status_code == 404
    assert (
        client.post(f"/api/v1/projects/{world.project_id}/workers", headers=other).status_code
        == 404
    )
    assert client.get(f"/api/v1/campaigns/{campaign['id']}").status_code == 401


def test_pause_resume_stop(client, db):
    world = _world_with_work(client, db, "lifecycle")
    worker = _qualified_worker(client, db, world)
    campaign = world.campaign(client)
    base = f"/api/v1/campaigns/{campaign['id']}"
    assert client.post(f"{base}/pause", headers=world.headers).get_json()["status"] == "paused"
    assert do_hit(client, db, world, worker["token"]) is None  # a paused campaign offers nothing
    assert client.post(f"{base}/pause", headers=world.headers).status_code == 409
    assert client.post(f"{base}/resume", headers=world.headers).get_json()["status"] == "running"
    assert do_hit(client, db, world, worker["token"]) is not None
    assert client.post(f"{base}/stop", headers=world.headers).get_json()["status"] == "stopped"
    assert client.post(f"{base}/resume", headers=world.headers).status_code == 409
    assert do_hit(client, db, world, worker["token"]) is None


def test_stop_releases_the_reservations_of_unclaimed_hits(client, db):
    world = _world_with_work(client, db, "stop")
    worker = _qualified_worker(client, db, world)
    campaign = world.campaign(client, questions_per_hit=20, gold_per_hit=1)
    info = load_campaign(db, campaign["id"])
    for _ in range(2):
        assert build_hit(db, info) is not None
    db.commit()
    claimed = client.post("/api/v1/work/assignments", headers=worker_headers(worker["token"]))
    assert claimed.status_code == 200
    stopped = client.post(f"/api/v1/campaigns/{campaign['id']}/stop", headers=world.headers)
    body = stopped.get_json()
    assert body["released_usd"] == 0.5
    assert body["reserved_usd"] == 0.5  # the claimed HIT stays reserved: its worker is paid
    db.rollback()
    statuses = db.scalars(
        select(Hit.status).where(Hit.campaign_id == campaign["id"]).order_by(Hit.id)
    ).all()
    assert statuses == [HitStatus.ASSIGNED, HitStatus.CANCELLED]
    cancelled = db.scalar(
        select(Hit.id).where(Hit.campaign_id == campaign["id"], Hit.status == HitStatus.CANCELLED)
    )
    about = {q.cluster_id for q in hit_questions(db, hit_id=cancelled) if q.cluster_id}
    back = db.scalars(select(Cluster.state).where(Cluster.id.in_(about))).all()
    assert back and set(back) == {ClusterState.CANDIDATE}


# ------------------------------------------------------------------------------ claim / answer


def test_claim_requires_a_valid_qualified_unblocked_worker(client, db):
    world = _world_with_work(client, db, "guards")
    world.campaign(client)
    response = client.post("/api/v1/work/assignments")
    assert response.status_code == 401
    response = client.post("/api/v1/work/assignments", headers=worker_headers("nope"))
    assert response.status_code == 401
    worker = invite(client, world)
    response = client.post("/api/v1/work/assignments", headers=worker_headers(worker["token"]))
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "not_qualified"
    qualify_directly(db, worker["worker_id"])
    from service.models import Worker

    db.execute(
        update(Worker)
        .where(Worker.id == worker["worker_id"])
        .values(blocked=True, blocked_reason="test block")
    )
    db.commit()
    response = client.post("/api/v1/work/assignments", headers=worker_headers(worker["token"]))
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "blocked"
    assert "test block" in response.get_json()["error"]["message"]


def test_answers_are_idempotent_and_owned(client, db):
    world = _world_with_work(client, db, "idem")
    world.campaign(client, questions_per_hit=10, gold_per_hit=2)
    alice, bob = _qualified_worker(client, db, world), _qualified_worker(client, db, world)
    hit = client.post("/api/v1/work/assignments", headers=worker_headers(alice["token"])).get_json()
    assert len(hit["questions"]) == 12
    url = f"/api/v1/work/assignments/{hit['assignment_id']}/answers"
    right = correct_answers(db, world, [q["id"] for q in hit["questions"]])
    first = [{"question_id": q["id"], "value": right[q["id"]], "ms": 900} for q in hit["questions"]]

    # Another worker's assignment is refused and nothing is stored.
    stolen = client.post(url, json={"answers": first[:2]}, headers=worker_headers(bob["token"]))
    assert stolen.status_code in (403, 404)
    # A question that is not in the assignment: 422 naming it, nothing stored.
    alien = client.post(
        url,
        json={"answers": [*first[:1], {"question_id": "not-a-question", "value": True, "ms": 5}]},
        headers=worker_headers(alice["token"]),
    )
    assert alien.status_code == 422 and "not-a-question" in alien.get_json()["error"]["message"]
    wrong_type = client.post(
        url,
        json={"answers": [{"question_id": first[0]["question_id"], "value": "yes", "ms": 5}]},
        headers=worker_headers(alice["token"]),
    )
    assert wrong_type.status_code == 422 and "value" in wrong_type.get_json()["error"]["message"]
    assert stored_answers(db, hit["assignment_id"]) == 0

    # Partial, then the same again, then the rest (with a repeat mixed in).
    one = client.post(url, json={"answers": first[:5]}, headers=worker_headers(alice["token"]))
    assert one.get_json() == {"accepted": 5, "duplicates": 0, "complete": False}
    again = client.post(url, json={"answers": first[:5]}, headers=worker_headers(alice["token"]))
    assert again.get_json() == {"accepted": 0, "duplicates": 5, "complete": False}
    rest = client.post(url, json={"answers": first[4:]}, headers=worker_headers(alice["token"]))
    assert rest.get_json() == {"accepted": 7, "duplicates": 1, "complete": True}
    after = client.post(url, json={"answers": first}, headers=worker_headers(alice["token"]))
    assert after.get_json() == {"accepted": 0, "duplicates": 12, "complete": True}
    assert stored_answers(db, hit["assignment_id"]) == 12
    assignment = db.scalar(select(Assignment).where(Assignment.public_id == hit["assignment_id"]))
    assert assignment.status == "approved" and assignment.gold_total == 2
    spent = db.scalar(select(Campaign.spent_micros).where(Campaign.project_id == world.project_id))
    db.rollback()
    assert spent == 500_000


def test_gold_is_indistinguishable_in_payloads(client, db):
    world = _world_with_work(client, db, "hidden", gold=[True, False, True, False, True])
    world.campaign(client, questions_per_hit=30, gold_per_hit=5)
    worker = _qualified_worker(client, db, world)
    response = client.post("/api/v1/work/assignments", headers=worker_headers(worker["token"]))
    raw = response.get_data(as_text=True)
    hit = response.get_json()
    assert "gold" not in raw.lower() and "sample" not in raw.lower()
    questions = hit["questions"]
    kinds = {
        q.public_id: q.kind.value for q in hit_questions(db, public_id=[q["id"] for q in questions])
    }
    assert sorted(kinds.values()).count("gold") == 5
    for q in questions:
        assert set(q) == {"id", "image_url", "class_name"}
        # The HIT's random public id and two characters for the position, gold or not.
        assert re.fullmatch(r"[A-Za-z0-9_-]{26}", q["id"])
        assert q["image_url"] == f"/media/q/{q['id']}.jpg"
        assert q["class_name"] == "chair"
    # Shuffled: gold does not sit in a fixed block at the end (or the start).
    positions = [i for i, q in enumerate(questions) if kinds[q["id"]] == "gold"]
    assert positions != list(range(30, 35)) and positions != list(range(5))
    # The answer acknowledgement reveals nothing either.
    answer = client.post(
        f"/api/v1/work/assignments/{hit['assignment_id']}/answers",
        json={
            "answers": [{"question_id": questions[positions[0]]["id"], "value": False, "ms": 800}]
        },
        headers=worker_headers(worker["token"]),
    )
    assert set(answer.get_json()) == {"accepted", "duplicates", "complete"}


def test_a_reloaded_page_resumes_the_same_assignment(client, db):
    world = _world_with_work(client, db, "resume")
    world.campaign(client, questions_per_hit=10, gold_per_hit=0)
    worker = _qualified_worker(client, db, world)
    headers = worker_headers(worker["token"])
    first = client.post("/api/v1/work/assignments", headers=headers).get_json()
    q = first["questions"][0]["id"]
    client.post(
        f"/api/v1/work/assignments/{first['assignment_id']}/answers",
        json={"answers": [{"question_id": q, "value": True, "ms": 700}]},
        headers=headers,
    )
    second = client.post("/api/v1/work/assignments", headers=headers).get_json()
    assert second["assignment_id"] == first["assignment_id"]
    assert second["questions"] == first["questions"] and second["answered"] == [q]


def test_an_expired_lease_returns_the_questions(client, db):
    world = _world_with_work(client, db, "lease")
    world.campaign(client, questions_per_hit=10, gold_per_hit=1)
    slow, quick = _qualified_worker(client, db, world), _qualified_worker(client, db, world)
    held = client.post("/api/v1/work/assignments", headers=worker_headers(slow["token"])).get_json()
    q = held["questions"][0]["id"]
    client.post(
        f"/api/v1/work/assignments/{held['assignment_id']}/answers",
        json={"answers": [{"question_id": q, "value": True, "ms": 700}]},
        headers=worker_headers(slow["token"]),
    )
    db.execute(
        update(Assignment)
        .where(Assignment.public_id == held["assignment_id"])
        .values(lease_expires_at=datetime.now(UTC) - timedelta(minutes=1))
    )
    db.commit()
    taken = client.post("/api/v1/work/assignments", headers=worker_headers(quick["token"]))
    assert taken.status_code == 200
    assert [x["id"] for x in taken.get_json()["questions"]] == [x["id"] for x in held["questions"]]
    late = client.post(
        f"/api/v1/work/assignments/{held['assignment_id']}/answers",
        json={"answers": [{"question_id": held["questions"][1]["id"], "value": True, "ms": 700}]},
        headers=worker_headers(slow["token"]),
    )
    assert late.status_code == 409 and late.get_json()["error"]["code"] == "lease_expired"
    db.rollback()
    expired = db.scalar(select(Assignment).where(Assignment.public_id == held["assignment_id"]))
    assert expired.status == "expired" and "lease expired" in expired.decision_reason
    (partial,) = hit_answers(db, Assignment.id == expired.id)
    assert partial.discarded and "lease expired" in partial.discard_reason


def test_the_campaign_stops_offering_work_when_the_budget_is_exhausted(client, db):
    world = _world_with_work(client, db, "budget")
    worker = _qualified_worker(client, db, world)
    campaign = world.campaign(
        client, budget_usd=1.25, reward_per_hit_usd=0.5, questions_per_hit=10, gold_per_hit=1
    )
    done = 0
    while do_hit(client, db, world, worker["token"]) is not None:
        done += 1
        assert done <= 2
    assert done == 2
    progress = client.get(f"/api/v1/campaigns/{campaign['id']}", headers=world.headers).get_json()
    assert progress["status"] == "exhausted"
    assert progress["spent_usd"] == 1.0 and progress["reserved_usd"] == 0.0
    assert progress["clusters"]["candidate"] > 0  # work remained; money did not
    db.rollback()
    ledger = db.execute(
        select(LedgerEntry.kind, func.sum(LedgerEntry.amount_micros))
        .where(LedgerEntry.campaign_id == campaign["id"])
        .group_by(LedgerEntry.kind)
    ).all()
    assert dict(ledger) == {"reserve": 1_000_000, "spend": 1_000_000}


def test_workers_list_for_the_dashboard(client, db):
    world = _world_with_work(client, db, "dash")
    world.campaign(client, questions_per_hit=10, gold_per_hit=2)
    worker = _qualified_worker(client, db, world)
    do_hit(client, db, world, worker["token"])
    listed = client.get(f"/api/v1/projects/{world.project_id}/workers", headers=world.headers)
    (row,) = listed.get_json()["workers"]
    assert row["id"] == worker["worker_id"]
    assert row["gold_total"] == 2 and row["gold_accuracy"] == 1.0
    assert row["blocked"] is False and row["assignments"] == {"approved": 1, "rejected": 0}
    assert worker["url"].endswith(f"/hit?token={worker['token']}")


def test_hits_past_their_lifetime_are_retired_and_their_money_released(client, db):
    world = _world_with_work(client, db, "lifetime")
    campaign = world.campaign(
        client,
        questions_per_hit=10,
        gold_per_hit=1,
        params={"hit_lifetime_seconds": 60, "hits_per_build": 2},
    )
    built = build_hits(db, load_campaign(db, campaign["id"]))
    db.commit()
    assert len(built) == 2
    assert sweep(db) == {"leases_expired": 0, "hits_expired": 0}  # not yet
    later = datetime.now(UTC) + timedelta(minutes=2)
    assert sweep(db, now=later) == {"leases_expired": 0, "hits_expired": 2}
    db.commit()
    progress = client.get(f"/api/v1/campaigns/{campaign['id']}", headers=world.headers).get_json()
    assert progress["hits"]["expired"] == 2 and progress["reserved_usd"] == 0
    assert progress["clusters"]["active"] == 0 and progress["clusters"]["candidate"] == 4


def test_a_build_stores_each_hit_with_its_own_questions(client, db):
    world = _world_with_work(client, db, "batch", blocks="GGGGGGGG")
    campaign = world.campaign(
        client, questions_per_hit=6, gold_per_hit=2, params={"hits_per_build": 5}
    )
    built = build_hits(db, load_campaign(db, campaign["id"]))
    db.commit()
    assert len(built) == 3  # the root's 15 samples, 6 to a HIT
    check_built_hits(db, built, gold_per_hit=2)
    db.rollback()
