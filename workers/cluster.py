"""The ``cluster`` job: predictions of a round → one tree file per class + the reachable cluster rows.

Predictions on held-out images become gold items (their true IoU against the held-out ground truth is
known, so they are the most realistic hidden gold); predictions on seed images are dropped (those
images are annotated already); the rest form the pool that is clustered.

The session is closed while trees are built (long numeric work), and everything the job writes to the
database -- trees, cluster rows, gold items and the round's ``ready`` status -- lands in one
transaction at the end, after the tree files are in storage. That makes the job idempotent:

* a retry after a crash before the commit starts clean (nothing of the failed attempt is in the
  database);
* every attempt writes its tree files under keys of its own (:func:`tree_key`), and the rows
  that commit name the files of the attempt that committed them. An attempt racing a committed
  one therefore cannot overwrite the files the crowd's cluster ranges refer to (leaf order is
  seeded, but not proven bit-identical across machines and BLAS builds); an attempt that fails
  or loses the race deletes the files it wrote (one killed outright leaves them behind,
  unreferenced);
* a retry after the commit (the worker died before the job was recorded finished, a reconciler
  re-enqueued it, a late duplicate) finds the round ``ready`` and changes nothing. Rebuilding would
  replace cluster rows the crowd may already be answering about, so it is never done;
* gold items are inserted only if the project does not hold the same mask already (gold rows carry
  no round, so a content key is what identifies them), so not even two racing attempts duplicate
  gold. Gold is never deleted here: answered gold questions reference it.
"""

from __future__ import annotations

import gzip
import json
import logging
import secrets
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from sqlalchemy import delete, func, insert, select, update

from service.coco import rle_for_pycocotools
from service.engine.policy import PolicyParams
from service.engine.reachable import reachable_plan
from service.engine.tree import build_tree
from service.engine.treefile import TreeFile, write_tree_file
from service.gold import best_iou_against, for_qualification
from service.jobs import JobContext
from service.models import (
    Cluster,
    ClusterState,
    GoldItem,
    GroundTruthMask,
    Project,
    Round,
    RoundStatus,
    Split,
    Tree,
)

log = logging.getLogger(__name__)

GEOMETRY_FEATURES = ("log_area", "aspect", "fill", "cx", "cy")


@dataclass
class ClassTree:
    class_id: int
    key: str
    uri: str
    tree: Any
    mask_count: int


def geometry_features(rles: list[dict[str, Any]]) -> np.ndarray:
    """A small descriptor used when the predictions carry no features: shape and placement of the
    mask (log area, box aspect, box fill ratio, normalised centre)."""
    if not rles:
        return np.zeros((0, len(GEOMETRY_FEATURES)), dtype=np.float32)
    coco = [rle_for_pycocotools(r) for r in rles]
    areas = np.asarray(mask_utils.area(coco), dtype=np.float64)
    boxes = np.asarray(mask_utils.toBbox(coco), dtype=np.float64).reshape(-1, 4)
    heights = np.array([r["size"][0] for r in rles], dtype=np.float64)
    widths = np.array([r["size"][1] for r in rles], dtype=np.float64)
    box_w = np.maximum(boxes[:, 2], 1.0)
    box_h = np.maximum(boxes[:, 3], 1.0)
    return np.column_stack(
        [
            np.log1p(areas),
            np.log(box_w / box_h),
            areas / (box_w * box_h),
            (boxes[:, 0] + box_w / 2) / widths,
            (boxes[:, 1] + box_h / 2) / heights,
        ]
    ).astype(np.float32)


def tree_key(project_id: int, round_number: int, class_id: int, attempt: str) -> str:
    """Where one attempt of a round's cluster job writes a class's tree file."""
    return f"projects/{project_id}/rounds/{round_number}/trees/class-{class_id}-{attempt}.npz"


def _delete_quietly(ctx: JobContext, keys: list[str]) -> None:
    """Remove an attempt's unreferenced tree files; a failure to do so must not mask the outcome
    (or the error) of the job itself."""
    for key in keys:
        try:
            ctx.storage.delete(key)
        except Exception:
            log.warning("could not delete the unreferenced tree file %s", key, exc_info=True)


def built_summary(session: Any, round_id: int) -> dict[str, Any] | None:
    """What an earlier, committed attempt of the round's cluster job wrote; None if none did.

    The round turns ``ready`` in the transaction that writes its trees, so ``ready`` means the
    rows are complete.
    """
    status = session.scalar(select(Round.status).where(Round.id == round_id))
    if status is not RoundStatus.READY:
        return None
    trees, masks = session.execute(
        select(func.count(), func.coalesce(func.sum(Tree.mask_count), 0)).where(
            Tree.round_id == round_id
        )
    ).one()
    clusters = session.scalar(
        select(func.count())
        .select_from(Cluster)
        .join(Tree, Tree.id == Cluster.tree_id)
        .where(Tree.round_id == round_id)
    )
    return {
        "trees": int(trees),
        "masks": int(masks),
        "clusters": int(clusters or 0),
        "gold_items": 0,
        "skipped": "the round's trees were already built by an earlier attempt",
    }


def build_trees(ctx: JobContext, *, round_id: int, predictions_key: str) -> dict[str, Any]:
    """Cluster the round's predictions into one tree per class and write its rows (idempotent)."""
    with ctx.database.session() as session:
        rnd = session.get(Round, round_id)
        if rnd is None:
            raise ValueError(f"round {round_id} does not exist")
        done = built_summary(session, round_id)
        if done is not None:
            return done
        project_id = rnd.project_id
        project = session.get(Project, project_id)
        params = PolicyParams.from_dict(project.params)
        class_names = {c.id: c.name for c in project.classes}
        round_number = rnd.number
        truths = session.execute(
            select(
                GroundTruthMask.image_id,
                GroundTruthMask.class_id,
                GroundTruthMask.split,
                GroundTruthMask.rle,
            ).where(GroundTruthMask.project_id == project_id)
        ).all()
    heldout_truth: dict[tuple[int, int], list[dict]] = defaultdict(list)
    annotated_images: dict[int, Split] = {}
    for image_id, class_id, split, rle in truths:
        annotated_images[image_id] = split
        if split is Split.HELDOUT:
            heldout_truth[(image_id, class_id)].append(rle)

    ctx.progress(0.02, "reading predictions")
    with ctx.storage.open_read(predictions_key) as handle:
        predictions: list[dict[str, Any]] = json.loads(gzip.decompress(handle.read()))

    pool: dict[int, list[int]] = defaultdict(list)
    gold_rows: list[dict[str, Any]] = []
    for index, item in enumerate(predictions):
        split = annotated_images.get(item["image_id"])
        if split is None:
            pool[item["category_id"]].append(index)
        elif split is Split.HELDOUT:
            iou = best_iou_against(
                item["segmentation"], heldout_truth.get((item["image_id"], item["category_id"]), [])
            )
            gold_rows.append(
                {
                    "project_id": project_id,
                    "image_id": item["image_id"],
                    "class_id": item["category_id"],
                    "rle": item["segmentation"],
                    "iou": round(iou, 6),
                    "expected": iou >= params.k_iou,
                    "for_qualification": for_qualification(len(gold_rows)),
                }
            )

    attempt = secrets.token_hex(8)
    built: list[ClassTree] = []
    try:
        classes = sorted(pool)
        for done, class_id in enumerate(classes):
            indices = pool[class_id]
            ctx.progress(0.05 + 0.85 * done / max(len(classes), 1), f"class {class_id}: tree")
            built.append(
                _build_class_tree(
                    ctx,
                    predictions,
                    indices,
                    class_id,
                    class_names.get(class_id, str(class_id)),
                    project_id,
                    round_number,
                    params,
                    attempt=attempt,
                )
            )

        ctx.progress(0.92, "writing cluster rows")
        written = _write_rows(ctx, project_id, round_id, params, built, gold_rows)
    except BaseException:
        _delete_quietly(ctx, [item.key for item in built])
        raise
    if written is None:  # an attempt running alongside committed first: its files are in use
        _delete_quietly(ctx, [item.key for item in built])
        with ctx.database.session() as session:
            return built_summary(session, round_id) or {}
    clusters, gold = written
    return {
        "trees": len(built),
        "masks": int(sum(t.mask_count for t in built)),
        "clusters": clusters,
        "gold_items": gold,
    }


def _build_class_tree(
    ctx: JobContext,
    predictions: list[dict[str, Any]],
    indices: list[int],
    class_id: int,
    class_name: str,
    project_id: int,
    round_number: int,
    params: PolicyParams,
    *,
    attempt: str,
) -> ClassTree:
    items = [predictions[i] for i in indices]
    rles = [item["segmentation"] for item in items]
    scores = np.array([item["score"] for item in items], dtype=np.float64)
    if items and "feature" in items[0]:
        features = np.array([item["feature"] for item in items], dtype=np.float32)
        feature_source = "predictions"
    else:
        features = geometry_features(rles)
        feature_source = "geometry"
    tree = build_tree(features, scores, seed=class_id)
    tree_file = TreeFile.from_tree(
        tree,
        rles=rles,
        image_ids=np.array([item["image_id"] for item in items], dtype=np.int64),
        mask_ids=np.asarray(indices, dtype=np.int64),
        scores=scores,
        features=features,
        class_id=class_id,
        class_name=class_name,
        params={
            "project_id": project_id,
            "round": round_number,
            "feature_source": feature_source,
            "policy": params.to_dict(),
        },
    )
    key = tree_key(project_id, round_number, class_id, attempt)
    with ctx.storage.open_write(key) as handle:
        write_tree_file(handle, tree_file)
    return ClassTree(class_id, key, ctx.storage.uri(key), tree, len(items))


def _write_rows(
    ctx: JobContext,
    project_id: int,
    round_id: int,
    params: PolicyParams,
    built: list[ClassTree],
    gold_rows: list[dict[str, Any]],
) -> tuple[int, int] | None:
    """Trees, clusters, new gold and the ``ready`` status in one transaction.

    Returns ``(cluster rows, gold rows)`` written, or None when another attempt of the same job
    committed first (the round row is locked, then re-read, so two attempts cannot both write).
    """
    total = 0
    with ctx.database.session() as session:
        status = session.scalar(select(Round.status).where(Round.id == round_id).with_for_update())
        if status is RoundStatus.READY:
            session.rollback()
            return None
        # Nothing committed can be here (rows and ``ready`` commit together); this clears what a
        # job of an older version may have left.
        session.execute(delete(Tree).where(Tree.round_id == round_id))
        for item in built:
            tree_row = Tree(
                project_id=project_id,
                round_id=round_id,
                class_id=item.class_id,
                uri=item.uri,
                mask_count=item.mask_count,
            )
            session.add(tree_row)
            session.flush()
            total += _insert_clusters(session, project_id, tree_row.id, item.tree, params)
        new_gold = _new_gold(session, project_id, gold_rows)
        if new_gold:
            session.execute(insert(GoldItem), new_gold)
        session.execute(update(Round).where(Round.id == round_id).values(status=RoundStatus.READY))
        session.commit()
    return total, len(new_gold)


def _gold_identity(image_id: int, class_id: int, rle: dict[str, Any]) -> tuple[int, int, str]:
    return image_id, class_id, json.dumps(rle, sort_keys=True, separators=(",", ":"))


def _new_gold(session: Any, project_id: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The gold rows whose mask (image, class, RLE) the project does not hold yet."""
    if not rows:
        return []
    image_ids = sorted({row["image_id"] for row in rows})
    seen = {
        _gold_identity(image_id, class_id, rle)
        for image_id, class_id, rle in session.execute(
            select(GoldItem.image_id, GoldItem.class_id, GoldItem.rle).where(
                GoldItem.project_id == project_id, GoldItem.image_id.in_(image_ids)
            )
        )
    }
    fresh = []
    for row in rows:
        identity = _gold_identity(row["image_id"], row["class_id"], row["rle"])
        if identity not in seen:
            seen.add(identity)
            fresh.append(row)
    return fresh


def _insert_clusters(session, project_id: int, tree_id: int, tree, params: PolicyParams) -> int:
    plan = reachable_plan(tree, params)
    if not len(plan):
        return 0
    scores = tree.node_scores()
    rows = [
        {
            "project_id": project_id,
            "tree_id": tree_id,
            "node": int(node),
            "lo": int(tree.lo[node]),
            "hi": int(tree.hi[node]),
            "size": int(tree.size[node]),
            "score": float(scores[node]),
            "state": ClusterState(state),
        }
        for node, state in zip(plan.nodes.tolist(), plan.state, strict=True)
    ]
    ids = session.scalars(
        insert(Cluster).returning(Cluster.id, sort_by_parameter_order=True), rows
    ).all()
    parent_updates = [
        {"id": ids[i], "parent_id": ids[p]} for i, p in enumerate(plan.parent.tolist()) if p >= 0
    ]
    if parent_updates:
        session.execute(update(Cluster), parent_updates)
    return len(rows)
