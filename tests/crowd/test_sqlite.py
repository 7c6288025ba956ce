"""The embedded default: the whole crowd cycle also runs on SQLite (the demo and a laptop), where
``FOR UPDATE SKIP LOCKED`` is a no-op and writers are serialised by the database lock instead."""

from __future__ import annotations

from sqlalchemy import func, select

from service.crowd.hits import build_hits, load_campaign
from service.db import get_database
from service.models import Assignment, Cluster, ClusterState, QuestionKind, Worker
from tests.crowd.world import (
    add_gold,
    add_tree,
    block_world,
    campaign_world,
    check_built_hits,
    do_hit,
    invite,
    make_world,
    qualify_directly,
    ranges,
)
from tests.helpers import hit_answers, hit_questions


def test_a_campaign_runs_to_the_end_on_sqlite(sqlite_app):
    client = sqlite_app.test_client()
    with get_database(sqlite_app).session() as db:
        world, campaign, worker = campaign_world(client, db, "lite", "GLBL", gold=(True, False))
        while do_hit(client, db, world, worker["token"]) is not None:
            pass
        assert ranges(db, world, ClusterState.ACCEPTED) == {(0, 16)}
        assert ranges(db, world, ClusterState.REJECTED) == {(32, 48)}
    progress = client.get(f"/api/v1/campaigns/{campaign['id']}", headers=world.headers).get_json()
    assert progress["status"] == "finished"
    assert progress["questions"]["answered"] == 30
    assert progress["spent_usd"] == progress["hits"]["completed"] * 0.5


def test_a_build_stores_each_hit_with_its_own_questions_on_sqlite(sqlite_app):
    client = sqlite_app.test_client()
    with get_database(sqlite_app).session() as db:
        _, campaign, _ = campaign_world(
            client, db, "lite-batch", "GGGGGGGG", questions_per_hit=6, params={"hits_per_build": 5}
        )
        built = build_hits(db, load_campaign(db, campaign["id"]))
        db.commit()
        assert len(built) == 3  # the root's 15 samples, 6 to a HIT
        check_built_hits(db, built, gold_per_hit=2)


def test_rejections_and_blocks_discard_answers_on_sqlite(sqlite_app):
    """Discards rewrite an assignment's answer arrays (JSON lists on SQLite): a HIT failing gold
    loses its sample answers, and a worker blocked later loses the answers that still counted."""
    client = sqlite_app.test_client()
    with get_database(sqlite_app).session() as db:
        world = make_world(client, db, name="lite-quality")
        scores, truth = block_world("GL" * 8)
        add_tree(db, world, scores, truth)
        add_gold(db, world, [False] * 5)
        world.campaign(client, questions_per_hit=10, gold_per_hit=5)
        spammer, sloppy = invite(client, world), invite(client, world)
        for worker in (spammer, sloppy):
            qualify_directly(db, worker["worker_id"])

        # Every read ends its transaction: an open one would hold SQLite's lock against the
        # service's writes.
        def sample_ids(hit) -> set[int]:
            ids = [q["id"] for q in hit["questions"]]
            found = {q.id for q in hit_questions(db, public_id=ids, kind=QuestionKind.SAMPLE)}
            db.rollback()
            return found

        def reasons(worker, samples: set[int]) -> list[str | None]:
            answers = hit_answers(db, Assignment.worker_id == worker["worker_id"])
            db.rollback()
            return [a.discard_reason for a in answers if a.question_id in samples]

        spam = do_hit(client, db, world, spammer["token"], answerer=lambda _q, _right: True)
        spam_samples = sample_ids(spam)
        assert len(reasons(spammer, spam_samples)) == len(spam_samples) == 10
        assert all(r and "gold 0/5" in r for r in reasons(spammer, spam_samples))

        wrong = {"gold": 0}

        def two_wrong_gold(qid: str, right: bool) -> bool:
            (kind,) = [q.kind for q in hit_questions(db, public_id=qid)]
            db.rollback()
            if kind != "gold":
                return right
            wrong["gold"] += 1
            return not right if wrong["gold"] % 5 in (1, 2) else right

        first = do_hit(client, db, world, sloppy["token"], answerer=two_wrong_gold)
        second = do_hit(client, db, world, sloppy["token"], answerer=two_wrong_gold)
        blocked = db.get(Worker, sloppy["worker_id"])
        assert blocked.blocked and "6/10" in blocked.blocked_reason
        samples = sample_ids(first) | sample_ids(second)
        assert len(reasons(sloppy, samples)) == len(samples) == 20
        assert all(r and r.startswith("worker blocked") for r in reasons(sloppy, samples))
        counted = db.scalar(
            select(func.sum(Cluster.yes_count)).where(Cluster.tree_id == world.tree_id)
        )
        assert counted == 0
