"""The dataset a project has produced: the masks inside accepted ranges, as COCO.

Export streams each tree file once and keeps the leaf positions inside accepted ranges; masks never pass
through the database. Across rounds the model re-detects objects it found before, so overlapping
accepted masks of one object (same image and class, IoU above ``DUPLICATE_IOU``) are collapsed to the
highest-scoring one: at most one mask per object, as the paper keeps between rounds.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.coco import rle_area, rle_bbox, rle_for_pycocotools
from service.engine.treefile import read_tree_file
from service.models import Cluster, ClusterState, Image, Project, Round, Tree
from service.storage import Storage

DUPLICATE_IOU = 0.5


@dataclass(frozen=True)
class AcceptedMask:
    image_id: int
    class_id: int
    rle: dict[str, Any]
    score: float
    round_number: int
    tree_id: int
    leaf_pos: int


def accepted_ranges(session: Session, tree_id: int) -> list[tuple[int, int]]:
    return [
        (lo, hi)
        for lo, hi in session.execute(
            select(Cluster.lo, Cluster.hi)
            .where(Cluster.tree_id == tree_id, Cluster.state == ClusterState.ACCEPTED)
            .order_by(Cluster.lo)
        )
    ]


def accepted_masks(session: Session, storage: Storage, project_id: int) -> list[AcceptedMask]:
    trees = session.execute(
        select(Tree, Round.number)
        .join(Round, Round.id == Tree.round_id)
        .where(Tree.project_id == project_id)
        .order_by(Round.number, Tree.class_id)
    ).all()
    masks: list[AcceptedMask] = []
    for tree, round_number in trees:
        ranges = accepted_ranges(session, tree.id)
        if not ranges:
            continue
        with storage.open_read(storage.key_from_uri(tree.uri)) as handle:
            tree_file = read_tree_file(handle)
        for lo, hi in ranges:
            for pos in range(lo, hi):
                masks.append(
                    AcceptedMask(
                        image_id=int(tree_file.image_ids[pos]),
                        class_id=tree.class_id,
                        rle=tree_file.rle(pos),
                        score=float(tree_file.scores[pos]),
                        round_number=round_number,
                        tree_id=tree.id,
                        leaf_pos=pos,
                    )
                )
    return masks


def one_mask_per_object(masks: list[AcceptedMask], threshold: float = DUPLICATE_IOU):
    """Greedy by score within each (image, class): drop a mask overlapping a kept one above
    ``threshold`` IoU."""
    groups: dict[tuple[int, int], list[AcceptedMask]] = defaultdict(list)
    for mask in masks:
        groups[(mask.image_id, mask.class_id)].append(mask)
    kept: list[AcceptedMask] = []
    for group in groups.values():
        group.sort(key=lambda m: -m.score)
        if len(group) == 1:
            kept.extend(group)
            continue
        rles = [rle_for_pycocotools(m.rle) for m in group]
        ious = np.asarray(mask_utils.iou(rles, rles, [0] * len(rles))).reshape(len(rles), -1)
        chosen: list[int] = []
        for i in range(len(group)):
            if all(ious[i, j] <= threshold for j in chosen):
                chosen.append(i)
        kept.extend(group[i] for i in chosen)
    kept.sort(key=lambda m: (m.image_id, m.class_id, -m.score))
    return kept


def coco_export(session: Session, storage: Storage, project: Project) -> dict[str, Any]:
    masks = one_mask_per_object(accepted_masks(session, storage, project.id))
    image_ids = sorted({m.image_id for m in masks})
    images = (
        session.scalars(select(Image).where(Image.id.in_(image_ids)).order_by(Image.id)).all()
        if image_ids
        else []
    )
    annotations = [
        {
            "id": index + 1,
            "image_id": mask.image_id,
            "category_id": mask.class_id,
            "segmentation": mask.rle,
            "area": rle_area(mask.rle),
            "bbox": rle_bbox(mask.rle),
            "iscrowd": 0,
            "score": round(mask.score, 6),
            "maskmill": {"round": mask.round_number, "tree": mask.tree_id, "leaf": mask.leaf_pos},
        }
        for index, mask in enumerate(masks)
    ]
    return {
        "info": {"description": f"maskmill export of project {project.name!r}", "version": "1"},
        "images": [
            {"id": i.id, "file_name": i.file_name, "width": i.width, "height": i.height}
            for i in images
        ],
        "categories": [{"id": c.id, "name": c.name} for c in project.classes],
        "annotations": annotations,
    }
