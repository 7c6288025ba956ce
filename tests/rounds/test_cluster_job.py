"""The cluster job is idempotent: a retry -- after a crash, after the commit, or racing the first
attempt -- leaves exactly the rows one clean run leaves (gold items, trees, clusters), and never
touches a round whose clusters the crowd may already be deciding.

The predictions are made from the synthetic ground truth (each object's exact mask, and the mask
shifted by a few pixels), so the job runs without a detector.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from sqlalchemy import select, update

from service.api.predictions import store_predictions
from service.coco import rle_for_pycocotools
from service.db import get_database
from service.jobs import JobContext, job_context_for_tests
from service.models import (
    Cluster,
    ClusterState,
    GoldItem,
    Image,
    ProjectClass,
    Round,
    RoundStatus,
    Tree,
)
from tests.helpers import new_key
from tests.rounds.helpers import make_project
from workers import cluster as cluster_job
from workers.detect import finish_round


def _encode(mask: np.ndarray) -> dict[str, Any]:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode()}


def ground_truth_predictions(files: dict[str, Path], session, pid: int) -> list[dict[str, Any]]:
    """Two predictions per held-out and pool object: its exact mask and a shifted copy."""
    ids = {
        name: image_id
        for name, image_id in session.execute(
            select(Image.file_name, Image.id).where(Image.project_id == pid)
        )
    }
    classes = {
        name: class_id
        for name, class_id in session.execute(
            select(ProjectClass.name, ProjectClass.id).where(ProjectClass.project_id == pid)
        )
    }
    predictions = []
    for path in (files["heldout"], files["pool"].parent / "pool_gt.json"):
        document = json.loads(path.read_text())
        names = {i["id"]: i["file_name"] for i in document["images"]}
        categories = {c["id"]: c["name"] for c in document["categories"]}
        for k, ann in enumerate(document["annotations"]):
            mask = mask_utils.decode(rle_for_pycocotools(ann["segmentation"]))
            for rle, score in ((ann["segmentation"], 0.9), (_encode(np.roll(mask, 3, 1)), 0.4)):
                predictions.append(
                    {
                        "image_id": ids[names[ann["image_id"]]],
                        "category_id": classes[categories[ann["category_id"]]],
                        "segmentation": rle,
                        "score": round(score - 0.001 * (k % 7), 4),
                    }
                )
    return predictions


def snapshot(session, pid: int) -> dict[str, Any]:
    """Every row the cluster job writes for the project, ids included."""
    gold = session.execute(
        select(
            GoldItem.id,
            GoldItem.image_id,
            GoldItem.class_id,
            GoldItem.rle,
            GoldItem.iou,
            GoldItem.expected,
            GoldItem.for_qualification,
        )
        .where(GoldItem.project_id == pid)
        .order_by(GoldItem.id)
    ).all()
    trees = session.execute(
        select(Tree.id, Tree.round_id, Tree.class_id, Tree.uri, Tree.mask_count)
        .where(Tree.project_id == pid)
        .order_by(Tree.id)
    ).all()
    clusters = session.execute(
        select(
            Cluster.id,
            Cluster.tree_id,
            Cluster.node,
            Cluster.lo,
            Cluster.hi,
            Cluster.size,
            Cluster.score,
            Cluster.state,
            Cluster.parent_id,
        )
        .where(Cluster.project_id == pid)
        .order_by(Cluster.id)
    ).all()
    return {
        "gold": [tuple(r) for r in gold],
        "trees": [tuple(r) for r in trees],
        "clusters": [tuple(r) for r in clusters],
    }


@pytest.fixture()
def clustering_round(local_app, synthetic_data, fast) -> dict[str, Any]:
    """A project with ground truth and a round whose predictions are stored, not yet clustered."""
    client = local_app.test_client()
    database = get_database(local_app)
    with database.session() as session:
        _, headers = new_key(session, "cluster-job")
    pid = make_project(client, headers, synthetic_data)
    with job_context_for_tests(fast) as ctx, ctx.database.session() as session:
        rnd = Round(project_id=pid, number=1, status=RoundStatus.CLUSTERING)
        session.add(rnd)
        session.commit()
        predictions = ground_truth_predictions(synthetic_data, session, pid)
        key = store_predictions(ctx.storage, pid, 1, predictions)
        before = snapshot(session, pid)
    return {"pid": pid, "round_id": rnd.id, "key": key, "before": before, "database": database}


def _build(fast, setup: dict[str, Any], ctx: JobContext | None = None) -> dict[str, Any]:
    if ctx is not None:
        return cluster_job.build_trees(
            ctx, round_id=setup["round_id"], predictions_key=setup["key"]
        )
    with job_context_for_tests(fast) as fresh:
        return cluster_job.build_trees(
            fresh, round_id=setup["round_id"], predictions_key=setup["key"]
        )


def _rows(setup: dict[str, Any]) -> dict[str, Any]:
    with setup["database"].session() as session:
        return snapshot(session, setup["pid"])


def test_the_same_job_twice_writes_the_same_rows(clustering_round, fast):
    first = _build(fast, clustering_round)
    rows = _rows(clustering_round)
    # The upload's own gold (ground truth and its wrong variants) plus the held-out predictions.
    assert first["gold_items"] > 0
    assert len(rows["gold"]) == len(clustering_round["before"]["gold"]) + first["gold_items"]
    assert len(rows["trees"]) == first["trees"] == 2 and first["clusters"] > 0

    again = _build(fast, clustering_round)
    assert _rows(clustering_round) == rows  # no duplicated gold, same trees and clusters (ids too)
    assert again["skipped"] and again["gold_items"] == 0
    assert {k: again[k] for k in ("trees", "masks", "clusters")} == {
        k: first[k] for k in ("trees", "masks", "clusters")
    }


def test_a_crash_before_the_commit_leaves_nothing_and_the_retry_writes_it_all(
    clustering_round, fast, monkeypatch
):
    real = cluster_job._insert_clusters
    calls: list[int] = []

    def crash_on_the_second_tree(session, project_id, tree_id, tree, params):
        calls.append(tree_id)
        if len(calls) == 2:
            raise ConnectionError("database connection lost")
        return real(session, project_id, tree_id, tree, params)

    monkeypatch.setattr(cluster_job, "_insert_clusters", crash_on_the_second_tree)
    with pytest.raises(ConnectionError):
        _build(fast, clustering_round)
    assert _rows(clustering_round) == clustering_round["before"]  # not one row of the attempt
    with job_context_for_tests(fast) as ctx:  # nor one of its tree files
        assert _tree_files(ctx, clustering_round["pid"]) == {}
    with clustering_round["database"].session() as session:
        status = session.scalar(
            select(Round.status).where(Round.id == clustering_round["round_id"])
        )
    assert status is RoundStatus.CLUSTERING

    monkeypatch.setattr(cluster_job, "_insert_clusters", real)
    result = _build(fast, clustering_round)
    rows = _rows(clustering_round)
    assert len(rows["gold"]) == len(clustering_round["before"]["gold"]) + result["gold_items"]
    assert len(rows["trees"]) == 2 and len(rows["clusters"]) == result["clusters"]
    assert _build(fast, clustering_round)["skipped"]
    assert _rows(clustering_round) == rows


def test_an_attempt_racing_a_committed_one_writes_nothing(clustering_round, fast):
    """The second attempt reaches its write after the first committed: the locked re-read of the
    round sees ``ready`` and it rolls back."""
    with job_context_for_tests(fast) as outer:
        raced = False

        def progress(payload: dict[str, Any]) -> None:
            nonlocal raced
            if payload["message"] == "writing cluster rows" and not raced:
                raced = True
                _build(fast, clustering_round)  # the other attempt, start to commit

        ctx = JobContext(outer.job_id, outer.settings, outer.database, outer.storage, progress)
        result = _build(fast, clustering_round, ctx)
    assert raced and result["skipped"]
    rows = _rows(clustering_round)
    new_gold = len(rows["gold"]) - len(clustering_round["before"]["gold"])
    assert new_gold > 0
    # Each held-out prediction became gold once.
    identities = [(g[1], g[2], json.dumps(g[3], sort_keys=True)) for g in rows["gold"]]
    assert len(identities) == len(set(identities))


def _tree_files(ctx: JobContext, pid: int) -> dict[str, bytes]:
    """Every tree file the project's round 1 has in storage, by file name."""
    folder = ctx.storage.path(f"projects/{pid}/rounds/1/trees/x").parent
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.npz"))}


def test_an_attempt_losing_the_race_leaves_the_committed_tree_files_alone(
    clustering_round, fast, monkeypatch
):
    """The other attempt commits before this one has written a single tree file. This one's
    trees differ (here: on purpose), yet the files the committed rows name keep the committed
    content, and this attempt's own files are gone once it sees it lost."""
    real_write = cluster_job.write_tree_file
    inner = False

    def write(handle, tree_file, **kwargs):
        real_write(handle, tree_file, **kwargs)
        if not inner:
            handle.write(b"-- a different build of the same tree --")

    monkeypatch.setattr(cluster_job, "write_tree_file", write)
    committed: dict[str, bytes] = {}
    with job_context_for_tests(fast) as outer:

        def progress(payload: dict[str, Any]) -> None:
            nonlocal inner
            if payload["message"].endswith(": tree") and not committed:
                inner = True
                _build(fast, clustering_round)  # the other attempt, start to commit
                inner = False
                committed.update(_tree_files(outer, clustering_round["pid"]))

        ctx = JobContext(outer.job_id, outer.settings, outer.database, outer.storage, progress)
        result = _build(fast, clustering_round, ctx)
        assert result["skipped"] and len(committed) == 2
        with clustering_round["database"].session() as session:
            uris = session.scalars(
                select(Tree.uri).where(Tree.round_id == clustering_round["round_id"])
            ).all()
        named = {outer.storage.key_from_uri(uri).rsplit("/", 1)[1] for uri in uris}
        assert named == set(committed)
        assert _tree_files(outer, clustering_round["pid"]) == committed


def test_a_late_retry_keeps_the_crowds_decisions(clustering_round, fast):
    _build(fast, clustering_round)
    with clustering_round["database"].session() as session:
        decided = session.scalar(
            select(Cluster.id)
            .where(Cluster.project_id == clustering_round["pid"])
            .order_by(Cluster.size.desc())
        )
        session.execute(
            update(Cluster).where(Cluster.id == decided).values(state=ClusterState.ACCEPTED)
        )
        session.commit()
    rows = _rows(clustering_round)
    storage_key = clustering_round["key"]
    with job_context_for_tests(fast) as ctx:
        stored = ctx.storage.get_bytes(storage_key)
        # The pipeline's cluster stage: no shard objects exist any more, the round is built.
        merged = finish_round(ctx, round_id=clustering_round["round_id"], n_shards=3)
        assert merged["skipped"]
        assert ctx.storage.get_bytes(storage_key) == stored  # the predictions were not rewritten
    assert _build(fast, clustering_round)["skipped"]
    after = _rows(clustering_round)
    assert after == rows
    assert next(c for c in after["clusters"] if c[0] == decided)[7] is ClusterState.ACCEPTED
