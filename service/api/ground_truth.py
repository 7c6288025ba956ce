"""Ground truth as COCO JSON: the seed set (training) or the held-out set (calibration, gold,
qualification). The whole document is validated before anything is written."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
from flask import Blueprint, jsonify, request
from sqlalchemy import exists, select

from service.api.projects import owned_project
from service.api.validation import json_payload
from service.auth import require_api_key
from service.coco import CocoError, normalise_rle, require_int, require_list, require_str, rle_area
from service.db import get_session
from service.engine.policy import PolicyParams
from service.errors import conflict, validation_error
from service.gold import derive_gold, for_qualification
from service.models import GoldItem, GroundTruthMask, Image, Project, Split

bp = Blueprint("ground_truth", __name__, url_prefix="/api/v1/projects")


def parse_ground_truth(document: Any, project: Project, images_by_name: dict[str, Image]):
    """Map a COCO document onto the project's images (by file_name) and classes (by name)."""
    coco_images = require_list(document, "images")
    categories = require_list(document, "categories")
    annotations = require_list(document, "annotations")
    classes = {c.name: c for c in project.classes}
    category_map: dict[int, int] = {}
    for i, category in enumerate(categories):
        where = f"categories[{i}]"
        if not isinstance(category, dict):
            raise CocoError(f"{where}: must be an object")
        name = require_str(category, "name", where)
        if name not in classes:
            raise CocoError(
                f"{where}: unknown category {name!r}; the project's classes are "
                f"{', '.join(sorted(classes))}"
            )
        category_map[require_int(category, "id", where)] = classes[name].id
    image_map: dict[int, Image] = {}
    for i, entry in enumerate(coco_images):
        where = f"images[{i}]"
        if not isinstance(entry, dict):
            raise CocoError(f"{where}: must be an object")
        name = require_str(entry, "file_name", where)
        image = images_by_name.get(name)
        if image is None:
            raise CocoError(f"{where}: unknown image {name!r}; register it with POST .../images")
        width, height = entry.get("width"), entry.get("height")
        if (width, height) != (image.width, image.height):
            raise CocoError(
                f"{where}: size {width}x{height} differs from the registered "
                f"{image.width}x{image.height} of {name!r}"
            )
        image_map[require_int(entry, "id", where)] = image
    rows = []
    for i, annotation in enumerate(annotations):
        where = f"annotations[{i}]"
        if not isinstance(annotation, dict):
            raise CocoError(f"{where}: must be an object")
        image = image_map.get(require_int(annotation, "image_id", where))
        if image is None:
            raise CocoError(f"{where}: image_id {annotation['image_id']} is not in 'images'")
        class_id = category_map.get(require_int(annotation, "category_id", where))
        if class_id is None:
            raise CocoError(
                f"{where}: category_id {annotation['category_id']} is not in 'categories'"
            )
        if annotation.get("iscrowd", 0) not in (0, False):
            continue  # crowd regions are not instances
        rle = normalise_rle(annotation.get("segmentation"), image.height, image.width, where)
        rows.append((image, class_id, rle))
    return rows


@bp.post("/<int:project_id>/ground-truth")
@require_api_key
def upload_ground_truth(project_id: int):
    """Upload COCO ground truth (?split=seed|heldout); held-out masks become gold items."""
    project = owned_project(project_id)
    raw_split = request.args.get("split", "")
    try:
        split = Split(raw_split)
    except ValueError:
        raise validation_error("query parameter split must be 'seed' or 'heldout'") from None
    document = json_payload()
    session = get_session()
    if session.scalar(
        select(
            exists().where(GroundTruthMask.project_id == project.id, GroundTruthMask.split == split)
        )
    ):
        raise conflict(f"{split.value} ground truth was already uploaded for this project")
    images = {
        i.file_name: i for i in session.scalars(select(Image).where(Image.project_id == project.id))
    }
    try:
        rows = parse_ground_truth(document, project, images)
    except CocoError as exc:
        raise validation_error(str(exc)) from None
    masks = [
        GroundTruthMask(
            project_id=project.id,
            image_id=image.id,
            class_id=class_id,
            split=split,
            rle=rle,
            area=rle_area(rle),
        )
        for image, class_id, rle in rows
    ]
    session.add_all(masks)
    gold = _gold_items(project, rows) if split is Split.HELDOUT else []
    session.add_all(gold)
    session.commit()
    return jsonify(
        {
            "split": split.value,
            "annotations": len(masks),
            "images": len({image.id for image, _, _ in rows}),
            "gold_items": sum(not g.for_qualification for g in gold),
            "qualification_items": sum(g.for_qualification for g in gold),
        }
    ), 201


def _gold_items(project: Project, rows) -> list[GoldItem]:
    k_iou = PolicyParams.from_dict(project.params).k_iou
    # Seeded by the project so the same upload yields the same items.
    rng = np.random.default_rng(zlib.crc32(f"gold:{project.id}".encode()))
    items = []
    for index, (image, class_id, rle) in enumerate(rows):
        qualification = for_qualification(index)
        for derived in derive_gold(rle, rng):
            items.append(
                GoldItem(
                    project_id=project.id,
                    image_id=image.id,
                    class_id=class_id,
                    rle=derived.rle,
                    iou=round(derived.iou, 6),
                    expected=derived.iou >= k_iou,
                    for_qualification=qualification,
                )
            )
    return items
