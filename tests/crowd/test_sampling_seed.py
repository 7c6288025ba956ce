"""Reproducible HIT building: a seed (:func:`service.crowd.hits.seeded_sampling`) fixes every random
choice of a build, and equal-scored candidates are taken in a fixed order, so the same state and
seed always give the same HITs. Without a seed each build draws from the operating system."""

from __future__ import annotations

import numpy as np
import pytest
from flask import Flask
from sqlalchemy import insert
from sqlalchemy.orm import Session

from service.crowd import hits
from service.crowd.hits import build_hits, load_campaign
from service.db import get_database
from service.models import Cluster, ClusterState
from service.storage import open_storage
from tests.helpers import hit_questions
from tests.pages import Seeded, seed_project


def _campaign(app: Flask, seeded: Seeded, **body) -> int:
    created = app.test_client().post(
        f"/api/v1/projects/{seeded.project_id}/campaigns",
        json={"budget_usd": 20.0, "backend": "local", "reward_per_hit_usd": 0.1, **body},
        headers=seeded.headers,
    )
    assert created.status_code == 201, created.get_json()
    return created.get_json()["id"]


@pytest.fixture()
def project(app: Flask, settings) -> tuple[Seeded, int]:
    """A fresh project (a candidate root of 24 masks) with a campaign of HITs of 5 + 2 gold."""
    with get_database(app).session() as session:
        seeded = seed_project(session, open_storage(settings.storage_url), settings)
    return seeded, _campaign(app, seeded, questions_per_hit=5, gold_per_hit=2)


def _drawn(session: Session, campaign_id: int, **kwargs) -> list[tuple]:
    """What one build asks, HIT by HIT and position by position; the build is rolled back."""
    built = build_hits(session, load_campaign(session, campaign_id), **kwargs)
    rows = [
        (q.hit_id, q.position, q.kind, q.cluster_id, q.leaf_pos, q.gold_item_id)
        for q in hit_questions(session, hit_id=list(built))
    ]
    session.rollback()
    index = {hit_id: i for i, hit_id in enumerate(built)}
    return [(index[row[0]], *row[1:]) for row in rows]


def test_a_seed_makes_building_reproducible(app, project):
    _, campaign_id = project
    with get_database(app).session() as session:
        with hits.seeded_sampling(7):
            first = _drawn(session, campaign_id)
        with hits.seeded_sampling(7):
            again = _drawn(session, campaign_id)
        with hits.seeded_sampling(8):
            other = _drawn(session, campaign_id)
        explicit = _drawn(session, campaign_id, rng=np.random.default_rng(7))
        unseeded = [_drawn(session, campaign_id) for _ in range(2)]
    assert first == again == explicit
    assert len(first) == 3 * (5 + 2)
    assert other != first
    # Without a seed every build draws afresh from the operating system.
    assert unseeded[0] != unseeded[1]
    assert hits._SEEDED_RNG.get() is None  # leaving the context restored the default


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True, None])
def test_a_sampling_seed_must_be_a_non_negative_integer(seed):
    with pytest.raises(ValueError, match="sampling seed"), hits.seeded_sampling(seed):
        pass


def test_equal_scored_candidates_are_taken_in_id_order(app, settings):
    """Leaves of equal score are common; the build takes ties by id, not in whatever order the
    database meets the rows (a backward index scan meets the newest first)."""
    with get_database(app).session() as session:
        seeded = seed_project(session, open_storage(settings.storage_url), settings)
        ids = session.scalars(
            insert(Cluster)
            .returning(Cluster.id)
            .values(
                [
                    {
                        "project_id": seeded.project_id,
                        "tree_id": seeded.tree_id,
                        "node": 1000 + k,
                        "lo": 5 * k,
                        "hi": 5 * k + 5,
                        "size": 5,
                        "score": 0.995,  # above the root: these are the best candidates
                        "state": ClusterState.CANDIDATE,
                        "yes_count": 0,
                        "no_count": 0,
                    }
                    for k in range(3)
                ]
            )
        ).all()
        session.commit()
    campaign_id = _campaign(app, seeded, questions_per_hit=5, gold_per_hit=0)
    with get_database(app).session() as session:
        drawn = _drawn(session, campaign_id, count=1)
    # One HIT of 5: exactly the five masks of the tied cluster with the lowest id.
    assert {row[3] for row in drawn} == {min(ids)}
    assert sorted(row[4] for row in drawn) == list(range(5))
