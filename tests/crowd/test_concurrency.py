"""Sixteen workers claiming and answering at once on real PostgreSQL: no question is served twice,
no answer is counted twice, and the money never goes past the budget."""

from __future__ import annotations

import threading
import time
from collections import Counter

from sqlalchemy import func, select

from service.models import (
    Assignment,
    Campaign,
    Cluster,
    Hit,
    LedgerEntry,
    QuestionKind,
    QuestionStatus,
)
from tests.crowd.world import (
    add_gold,
    add_tree,
    block_world,
    correct_answers,
    invite,
    make_world,
    qualify_directly,
    worker_headers,
)
from tests.helpers import hit_answers, hit_questions

THREADS = 16
HIT_COST = 200_000  # 0.20 USD, local backend: no fee
AFFORDABLE_HITS = 60


def _work(app, world, token: str, served: list, errors: list) -> None:
    """One worker's loop, with its own test client (and so its own sessions)."""
    client = app.test_client()
    from service.db import get_database

    database = get_database(app)
    headers = worker_headers(token)
    idle = 0
    try:
        while idle < 3:  # "no work" can be momentary (every open HIT locked by another claim)
            claimed = client.post("/api/v1/work/assignments", headers=headers)
            if claimed.status_code == 409:
                assert claimed.get_json()["error"]["code"] == "no_work"
                idle += 1
                time.sleep(0.02)
                continue
            idle = 0
            assert claimed.status_code == 200, claimed.get_json()
            hit = claimed.get_json()
            served.append((hit["assignment_id"], [q["id"] for q in hit["questions"]]))
            with database.session() as session:
                right = correct_answers(session, world, [q["id"] for q in hit["questions"]])
            answers = [
                {"question_id": q["id"], "value": right[q["id"]], "ms": 800}
                for q in hit["questions"]
            ]
            url = f"/api/v1/work/assignments/{hit['assignment_id']}/answers"
            half = len(answers) // 2
            first = client.post(url, json={"answers": answers[:half]}, headers=headers)
            assert first.status_code == 200, first.get_json()
            done = client.post(url, json={"answers": answers}, headers=headers)
            assert done.status_code == 200, done.get_json()
            assert done.get_json() == {
                "accepted": len(answers) - half,
                "duplicates": half,
                "complete": True,
            }
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


def test_sixteen_threads_claiming_and_answering(app, client, db):
    world = make_world(client, db, name="crowd16")
    scores, truth = block_world("GL" * 32)  # 32 good clusters of 16 masks: 480 samples to ask
    add_tree(db, world, scores, truth)
    add_gold(db, world, [True, False, True])
    campaign = world.campaign(
        client,
        budget_usd=AFFORDABLE_HITS * HIT_COST / 1e6 + 0.1,
        reward_per_hit_usd=HIT_COST / 1e6,
        questions_per_hit=5,
        gold_per_hit=2,
    )
    tokens = []
    for _ in range(THREADS):
        worker = invite(client, world)
        qualify_directly(db, worker["worker_id"])
        tokens.append(worker["token"])

    served: list[tuple[str, list[str]]] = []
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_work, args=(app, world, t, served, errors)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]

    # No question was served to two assignments; every HIT that was paid for was done.
    per_question = Counter(q for _, questions in served for q in questions)
    assert per_question and max(per_question.values()) == 1
    assert len(served) == AFFORDABLE_HITS
    db.rollback()

    # No answer stored or counted twice.
    stored = Counter(a.question_id for a in hit_answers(db))
    assert [q for q, n in stored.items() if n > 1] == []
    assert sum(stored.values()) == sum(map(len, (q for _, q in served)))
    answered = Counter(
        q.cluster_id
        for q in hit_questions(db, status=QuestionStatus.ANSWERED, kind=QuestionKind.SAMPLE)
    )
    counts = dict(
        db.execute(
            select(Cluster.id, Cluster.yes_count + Cluster.no_count).where(
                Cluster.tree_id == world.tree_id, Cluster.yes_count + Cluster.no_count > 0
            )
        ).all()
    )
    assert answered and counts == dict(answered)
    # Every cluster's open-question counter agrees with its questions still out.
    still_open = Counter(
        q.cluster_id
        for q in hit_questions(db, status=QuestionStatus.OPEN, kind=QuestionKind.SAMPLE)
    )
    counters = dict(
        db.execute(
            select(Cluster.id, Cluster.open_questions).where(
                Cluster.tree_id == world.tree_id, Cluster.open_questions > 0
            )
        ).all()
    )
    assert counters == dict(still_open)

    # Money: every reservation accounted for, never past the budget.
    row = db.execute(
        select(
            Campaign.budget_micros, Campaign.reserved_micros, Campaign.spent_micros, Campaign.status
        ).where(Campaign.id == campaign["id"])
    ).one()
    budget, reserved, spent, status = row
    ledger = dict(
        db.execute(
            select(LedgerEntry.kind, func.sum(LedgerEntry.amount_micros))
            .where(LedgerEntry.campaign_id == campaign["id"])
            .group_by(LedgerEntry.kind)
        ).all()
    )
    assert ledger["reserve"] - ledger.get("release", 0) == reserved + spent <= budget
    assert ledger["spend"] == spent == AFFORDABLE_HITS * HIT_COST and reserved == 0
    assert status == "exhausted"
    approved = db.scalar(select(func.count()).where(Assignment.status == "approved"))
    assert approved == db.scalar(select(func.count()).select_from(Hit)) == AFFORDABLE_HITS
