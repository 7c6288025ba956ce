"""Data in over HTTP on real PostgreSQL: images, ground truth, predictions → cluster job → trees and
cluster rows, job status, COCO export, and the OpenAPI document. Bad input → 4xx naming the problem,
and nothing written."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from sqlalchemy import func, select, update

from service.engine.policy import PolicyParams, auto_action
from service.engine.treefile import read_tree_file
from service.models import (
    Cluster,
    ClusterState,
    GoldItem,
    GroundTruthMask,
    Image,
    Job,
    Round,
    RoundStatus,
    Tree,
)
from tests.data_factory import coco_ground_truth, predictions_for, rect_mask, rle, write_images
from tests.helpers import new_key


@pytest.fixture(scope="module")
def owner(app):
    from service.db import get_database

    with get_database(app).session() as session:
        return new_key(session, "owner")[1]


@pytest.fixture(scope="module")
def project(app, owner, settings):
    client = app.test_client()
    created = client.post(
        "/api/v1/projects",
        json={"name": "data", "classes": ["cat", "dog"], "params": {"n_s": 3}},
        headers=owner,
    )
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    entries = write_images(Path(settings.image_root), 12)
    registered = client.post(
        f"/api/v1/projects/{body['id']}/images", json={"images": entries}, headers=owner
    )
    assert registered.status_code == 201, registered.get_json()
    body["images"] = registered.get_json()["images"]
    return body


def _count(db, model, **where) -> int:
    query = select(func.count()).select_from(model)
    for key, value in where.items():
        query = query.where(getattr(model, key) == value)
    return db.scalar(query)


# ------------------------------------------------------------------------------------ images


def test_images_outside_root_refused(client, owner, project, db):
    before = _count(db, Image, project_id=project["id"])
    for uri in ("/etc/passwd", "../../escape.png", "file:///etc/hosts", "http://x/y.png"):
        response = client.post(
            f"/api/v1/projects/{project['id']}/images",
            json={"images": [{"file_name": "x.png", "uri": uri, "width": 5, "height": 5}]},
            headers=owner,
        )
        assert response.status_code == 422, uri
        assert "images.0.uri" in response.get_json()["error"]["message"]
    assert _count(db, Image, project_id=project["id"]) == before


def test_images_duplicates_and_types(client, owner, project):
    url = f"/api/v1/projects/{project['id']}/images"
    again = client.post(
        url, json={"images": [{"file_name": "img0.png", "width": 64, "height": 48}]}, headers=owner
    )
    assert again.status_code == 409
    wrong = client.post(
        url, json={"images": [{"file_name": "z.png", "width": "64", "height": 48}]}, headers=owner
    )
    assert wrong.status_code == 422
    assert "width" in wrong.get_json()["error"]["message"]


def test_image_upload(client, owner, project, settings):
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("RGB", (30, 20), "red").save(buffer, format="PNG")
    response = client.post(
        f"/api/v1/projects/{project['id']}/images",
        data={"files": (io.BytesIO(buffer.getvalue()), "upload.png")},
        content_type="multipart/form-data",
        headers=owner,
    )
    assert response.status_code == 201, response.get_json()
    image = response.get_json()["images"][0]
    assert (image["width"], image["height"]) == (30, 20)
    assert image["uri"].startswith("file://" + str(Path(settings.storage_url).resolve()))
    bad = client.post(
        f"/api/v1/projects/{project['id']}/images",
        data={"files": (io.BytesIO(b"not an image"), "fake.png")},
        content_type="multipart/form-data",
        headers=owner,
    )
    assert bad.status_code == 422
    assert "fake.png" in bad.get_json()["error"]["message"]


# ------------------------------------------------------------------------------ ground truth


def _gt_url(project, split):
    return f"/api/v1/projects/{project['id']}/ground-truth?split={split}"


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.update(annotations="nope"), "'annotations' must be a list"),
        (lambda d: d["categories"][0].update(name="horse"), "unknown category 'horse'"),
        (lambda d: d["images"][0].update(file_name="ghost.png"), "unknown image 'ghost.png'"),
        (
            lambda d: d["annotations"][0].update(segmentation=rle(rect_mask(10, 10, 0, 0, 5, 5))),
            "annotations[0]: RLE size [10, 10]",
        ),
        (lambda d: d["annotations"][1].update(image_id=424242), "annotations[1]: image_id"),
        (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]), "polygon 0"),
        (
            lambda d: d["annotations"][0].update(segmentation={"size": [48, 64], "counts": 5}),
            "counts",
        ),
    ],
)
def test_ground_truth_rejects_bad_coco(client, owner, project, db, mutate, needle):
    document = coco_ground_truth(project["images"][:4], ["cat", "dog"])
    mutate(document)
    response = client.post(_gt_url(project, "seed"), json=document, headers=owner)
    assert response.status_code == 422, response.get_json()
    assert needle in response.get_json()["error"]["message"]
    assert _count(db, GroundTruthMask, project_id=project["id"]) == 0


def test_ground_truth_bad_split(client, owner, project):
    response = client.post(_gt_url(project, "train"), json={}, headers=owner)
    assert response.status_code == 422
    assert "split" in response.get_json()["error"]["message"]


def test_ground_truth_seed_and_heldout(client, owner, project, db):
    seed = coco_ground_truth(project["images"][:2], ["cat", "dog"])
    response = client.post(_gt_url(project, "seed"), json=seed, headers=owner)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["annotations"] == 4
    assert client.post(_gt_url(project, "seed"), json=seed, headers=owner).status_code == 409

    heldout = coco_ground_truth(project["images"][2:6], ["cat", "dog"])
    # one polygon annotation, converted to RLE
    heldout["annotations"][0]["segmentation"] = [[4, 6, 20, 6, 20, 24, 4, 24]]
    response = client.post(_gt_url(project, "heldout"), json=heldout, headers=owner)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["annotations"] == 8
    assert body["gold_items"] > 0 and body["qualification_items"] > 0
    items = db.scalars(select(GoldItem).where(GoldItem.project_id == project["id"])).all()
    assert {item.expected for item in items} == {True, False}  # both answers occur
    k_iou = PolicyParams().k_iou
    assert all(item.expected == (item.iou >= k_iou) for item in items)


# ------------------------------------------------------------------------------- predictions


def _wait_for_job(client, owner, job_id, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/jobs/{job_id}", headers=owner).get_json()
        if body["status"] in ("finished", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {body}")


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda p: p[0].update(image_id=987654), "[0]: unknown image_id"),
        (lambda p: p[1].update(category_id=987654), "[1]: unknown category_id"),
        (
            lambda p: p[2].update(segmentation=rle(rect_mask(10, 10, 0, 0, 5, 5))),
            "[2]: RLE size",
        ),
        (lambda p: p[0].update(score=1.5), "[0]: 'score'"),
        (lambda p: p[0].update(score="high"), "[0]: 'score'"),
        (lambda p: p[1].update(feature=[1.0, 2.0]), "[1]: either every prediction"),
        (lambda p: p.clear(), "empty"),
    ],
)
def test_predictions_reject_bad_input(client, owner, project, db, mutate, needle):
    predictions = predictions_for(project["images"][6:8], [c["id"] for c in project["classes"]], 3)
    mutate(predictions)
    response = client.post(
        f"/api/v1/projects/{project['id']}/predictions", json=predictions, headers=owner
    )
    assert response.status_code == 422, response.get_json()
    assert needle in response.get_json()["error"]["message"]
    assert _count(db, Round, project_id=project["id"]) == 0
    assert _count(db, Job, project_id=project["id"]) == 0


def test_predictions_must_be_a_list(client, owner, project):
    response = client.post(
        f"/api/v1/projects/{project['id']}/predictions", json={"a": 1}, headers=owner
    )
    assert response.status_code == 422
    assert "COCO results list" in response.get_json()["error"]["message"]


@pytest.fixture(scope="module")
def clustered(app, owner, project):
    """Predictions over pool and held-out images, clustered by the in-process job runner."""
    client = app.test_client()
    class_ids = [c["id"] for c in project["classes"]]
    pool = predictions_for(project["images"][6:], class_ids, per_image=12, seed=1, feature_dim=6)
    heldout = predictions_for(project["images"][2:6], class_ids, per_image=3, seed=2, feature_dim=6)
    response = client.post(
        f"/api/v1/projects/{project['id']}/predictions", json=pool + heldout, headers=owner
    )
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    job = _wait_for_job(client, owner, body["job_id"])
    return {"pool": pool, "heldout": heldout, "job": job, **body}


def test_cluster_job_builds_trees_and_rows(clustered, db, project, settings):
    assert clustered["job"]["status"] == "finished", clustered["job"]
    result = clustered["job"]["progress"]["result"]
    assert result["masks"] == len(clustered["pool"])
    rnd = db.scalar(select(Round).where(Round.project_id == project["id"]))
    assert rnd.status is RoundStatus.READY and rnd.number == clustered["round"]
    trees = db.scalars(select(Tree).where(Tree.round_id == rnd.id)).all()
    assert sorted(t.class_id for t in trees) == sorted(
        {p["category_id"] for p in clustered["pool"]}
    )
    params = PolicyParams.from_dict({"n_s": 3})
    from service.storage import open_storage

    storage = open_storage(settings.storage_url)
    for tree in trees:
        with storage.open_read(storage.key_from_uri(tree.uri)) as handle:
            tree_file = read_tree_file(handle)
        engine_tree = tree_file.tree()
        assert engine_tree.n == tree.mask_count
        rows = db.scalars(select(Cluster).where(Cluster.tree_id == tree.id)).all()
        by_node = {row.node: row for row in rows}
        root = by_node[engine_tree.root]
        assert (root.lo, root.hi) == (0, tree.mask_count)
        scores = engine_tree.node_scores()
        for row in rows:
            assert (row.lo, row.hi) == (engine_tree.lo[row.node], engine_tree.hi[row.node])
            assert row.score == pytest.approx(scores[row.node])
            action = auto_action(row.score, row.size, params)
            parent = db.get(Cluster, row.parent_id) if row.parent_id else None
            if parent is None:
                assert row.node == engine_tree.root
            else:
                assert engine_tree.parent[row.node] == parent.node
            if row.state is ClusterState.PENDING:
                assert parent is not None and parent.state in (
                    ClusterState.CANDIDATE,
                    ClusterState.PENDING,
                )
            elif row.state is ClusterState.CANDIDATE:
                assert action is None
        # the masks stored in leaf order are the predictions, permuted by the tree
        for pos in range(tree.mask_count):
            source = clustered["pool"][int(tree_file.mask_ids[pos])]
            assert tree_file.rle(pos)["counts"] == source["segmentation"]["counts"]


def test_heldout_predictions_become_gold(clustered, db, project):
    derived = db.scalar(
        select(func.count()).where(GoldItem.project_id == project["id"], GoldItem.iou < 1.0)
    )
    assert derived >= len(clustered["heldout"])


def test_job_status_is_private(client, clustered, db):
    _, other = new_key(db, "intruder")
    response = client.get(f"/api/v1/jobs/{clustered['job_id']}", headers=other)
    assert response.status_code == 404
    assert client.get("/api/v1/jobs/nope", headers=other).status_code == 404


def test_export_is_the_accepted_ranges(client, owner, clustered, db, project):
    tree = db.scalars(select(Tree).where(Tree.project_id == project["id"])).first()
    rows = db.scalars(
        select(Cluster).where(Cluster.tree_id == tree.id).order_by(Cluster.size)
    ).all()
    accepted = [r for r in rows if r.size >= 2][:2]
    db.execute(
        update(Cluster)
        .where(Cluster.id.in_([r.id for r in accepted]))
        .values(state=ClusterState.ACCEPTED)
    )
    db.commit()
    response = client.get(f"/api/v1/projects/{project['id']}/export?format=coco", headers=owner)
    assert response.status_code == 200
    document = response.get_json()
    coco = COCO()
    coco.dataset = document
    coco.createIndex()
    positions = sorted({p for r in accepted for p in range(r.lo, r.hi)})
    assert 0 < len(coco.getAnnIds()) <= len(positions)
    for annotation in coco.loadAnns(coco.getAnnIds()):
        assert annotation["maskmill"]["leaf"] in positions
        decoded = coco.annToMask(annotation)
        assert decoded.sum() == annotation["area"] > 0
    # every exported mask is one of the accepted predictions, pixel for pixel
    pool = {p["segmentation"]["counts"]: p for p in clustered["pool"]}
    for annotation in document["annotations"]:
        source = pool[annotation["segmentation"]["counts"]]
        assert np.array_equal(
            mask_utils.decode(
                {**source["segmentation"], "counts": source["segmentation"]["counts"].encode()}
            ),
            coco.annToMask(annotation),
        )
    bad = client.get(f"/api/v1/projects/{project['id']}/export?format=voc", headers=owner)
    assert bad.status_code == 422


def test_openapi_describes_every_route(client, app):
    document = client.get("/api/v1/openapi.json").get_json()
    assert document["openapi"].startswith("3.")
    described = {
        (path, method) for path, operations in document["paths"].items() for method in operations
    }
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1"):
            continue
        path = (
            rule.rule.replace("<int:", "{")
            .replace("<string:", "{")
            .replace("<", "{")
            .replace(">", "}")
        )
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in described, (path, method)
    create = document["paths"]["/api/v1/projects"]["post"]
    assert "classes" in create["requestBody"]["content"]["application/json"]["schema"]["properties"]
