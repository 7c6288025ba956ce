"""Model predictions as a COCO results list → a new round whose cluster job builds the trees.

The list is validated whole (image and category exist in the project, RLE size equals the image size,
score in [0, 1], features of one dimension) before anything is stored, then saved to storage as gzip
JSON for the job: bulk data does not pass through the database.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

from flask import Blueprint, jsonify
from sqlalchemy import func, select

from service.api.projects import owned_project
from service.api.validation import json_payload
from service.app import get_settings
from service.auth import require_api_key
from service.coco import CocoError, normalise_rle, require_feature, require_int, require_score
from service.db import get_session
from service.errors import conflict, validation_error
from service.jobs import DuplicateJobError, enqueue
from service.models import Image, Project, Round, RoundStatus

bp = Blueprint("predictions", __name__, url_prefix="/api/v1/projects")

CLUSTER_JOB = "workers.cluster.build_trees"


def parse_predictions(document: Any, project: Project, images: dict[int, Image]) -> list[dict]:
    if not isinstance(document, list):
        raise CocoError("body: predictions must be a COCO results list (a JSON array)")
    if not document:
        raise CocoError("body: the predictions list is empty")
    class_ids = {c.id for c in project.classes}
    out: list[dict] = []
    dim: int | None = None
    for i, item in enumerate(document):
        where = f"[{i}]"
        if not isinstance(item, dict):
            raise CocoError(f"{where}: must be an object")
        image = images.get(require_int(item, "image_id", where))
        if image is None:
            raise CocoError(f"{where}: unknown image_id {item['image_id']} in this project")
        category = require_int(item, "category_id", where)
        if category not in class_ids:
            raise CocoError(f"{where}: unknown category_id {category}; use the project's class ids")
        feature = require_feature(item, where, dim)
        if i == 0:
            dim = len(feature) if feature is not None else None
        elif (feature is None) != (dim is None):
            raise CocoError(f"{where}: either every prediction has a 'feature' or none has")
        out.append(
            {
                "image_id": image.id,
                "category_id": category,
                "segmentation": normalise_rle(
                    item.get("segmentation"), image.height, image.width, where
                ),
                "score": require_score(item, where),
                **({"feature": feature} if feature is not None else {}),
            }
        )
    return out


def store_predictions(storage, project_id: int, round_number: int, predictions: list[dict]) -> str:
    key = f"projects/{project_id}/rounds/{round_number}/predictions.json.gz"
    storage.put_bytes(key, gzip.compress(json.dumps(predictions).encode(), compresslevel=5))
    return key


def next_round_number(session, project_id: int) -> int:
    latest = session.scalar(select(func.max(Round.number)).where(Round.project_id == project_id))
    return (latest or 0) + 1


@bp.post("/<int:project_id>/predictions")
@require_api_key
def upload_predictions(project_id: int):
    """Upload COCO results (RLE masks, scores, optional features); 202 with the cluster job's id."""
    from flask import current_app

    project = owned_project(project_id)
    document = json_payload()
    session = get_session()
    images = {i.id: i for i in session.scalars(select(Image).where(Image.project_id == project.id))}
    try:
        predictions = parse_predictions(document, project, images)
    except CocoError as exc:
        raise validation_error(str(exc)) from None
    number = next_round_number(session, project.id)
    key = store_predictions(
        current_app.extensions["maskmill.storage"], project.id, number, predictions
    )
    job_id = f"cluster-p{project.id}-r{number}"
    rnd = Round(project_id=project.id, number=number, status=RoundStatus.CLUSTERING, job_id=job_id)
    session.add(rnd)
    session.flush()
    try:
        enqueue(
            session,
            get_settings(),
            CLUSTER_JOB,
            job_id=job_id,
            queue="cpu",
            project_id=project.id,
            round_id=rnd.id,
            predictions_key=key,
        )
    except DuplicateJobError as exc:
        session.rollback()
        raise conflict(str(exc)) from None
    return jsonify({"job_id": job_id, "round": number, "predictions": len(predictions)}), 202
