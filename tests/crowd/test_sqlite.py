"""The embedded default: the whole crowd cycle also runs on SQLite (the demo and a laptop), where
``FOR UPDATE SKIP LOCKED`` is a no-op and writers are serialised by the database lock instead."""

from __future__ import annotations

from service.crowd.hits import build_hits, load_campaign
from service.db import get_database
from service.models import ClusterState
from tests.crowd.world import (
    campaign_world,
    check_built_hits,
    do_hit,
    ranges,
)


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
