"""Training rounds: ``POST /projects/{pid}/rounds`` starts train → detect → cluster; ``GET`` lists them.

The service only records the round and enqueues ``workers.rounds.run_round`` by dotted name (it never
imports torch). The pipeline runs as one job per stage with deterministic ids (see
:mod:`workers.rounds`): ``round-p{pid}-r{n}`` (the entry, returned here), ``train-p{pid}-r{n}``,
``detect-p{pid}-r{n}-s{k}`` per shard and ``cluster-p{pid}-r{n}``. A round's ``status`` follows the
whole pipeline, and ``GET .../rounds`` lists every stage's job with its progress and error.

One round at a time per project: a second ``POST`` while a round is pending, training, detecting or
clustering is a 409 (the next round must train on what this one produces).

``checkpoint`` replaces training with the requester's own weights: an object of the project in
storage (a key such as ``projects/{pid}/rounds/1/model.pt``, or its URI) or a file under the
configured image root (a path, relative to the root or absolute, or a ``file://`` URI: the rule
image URIs follow, :func:`service.api.images.resolve_image_uri`). The service checks only that it
exists (it never imports torch); the train stage loads it and fails the round with a clear error
if it is not a usable checkpoint.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from flask import Blueprint, current_app, jsonify
from pydantic import Field, field_validator
from sqlalchemy import exists, func, select
from sqlalchemy.exc import IntegrityError

from service.api.images import resolve_image_uri
from service.api.predictions import next_round_number
from service.api.projects import owned_project
from service.api.validation import Body, accepts, parse
from service.app import get_settings
from service.auth import require_api_key
from service.db import get_session
from service.errors import ApiError, conflict, not_found, validation_error
from service.jobs import DuplicateJobError, enqueue
from service.models import (
    Cluster,
    ClusterState,
    GroundTruthMask,
    Image,
    Job,
    JobStatus,
    Project,
    Round,
    RoundStatus,
    Split,
    Tree,
)
from service.settings import Settings
from service.storage import Storage, StorageError, validate_key

bp = Blueprint("rounds", __name__, url_prefix="/api/v1/projects")

ROUND_JOB = "workers.rounds.run_round"
RUNNING = (
    RoundStatus.PENDING,
    RoundStatus.TRAINING,
    RoundStatus.DETECTING,
    RoundStatus.CLUSTERING,
)
MAX_SHARDS = 4096
#: What ``GET .../rounds`` shows of the train job's result.
TRAINING_KEYS = (
    "steps",
    "init",
    "lr",
    "loss_first",
    "loss",
    "train_images",
    "seed_masks",
    "accepted_masks",
    "seconds",
    "resumed_from_step",
    "resume_discarded",
    "checkpoint",
    "class_map",
)
#: Body fields that only matter when the round trains (refused together with ``checkpoint``).
TRAINING_FIELDS = ("steps", "batch_size", "learning_rate", "checkpoint_every", "seed", "model")


def round_job_id(project_id: int, number: int) -> str:
    return f"round-p{project_id}-r{number}"


def train_job_id(project_id: int, number: int) -> str:
    return f"train-p{project_id}-r{number}"


def detect_job_id(project_id: int, number: int, shard: int) -> str:
    return f"detect-p{project_id}-r{number}-s{shard}"


def cluster_job_id(project_id: int, number: int) -> str:
    """The same id ``POST .../predictions`` gives its cluster job: one cluster job per round."""
    return f"cluster-p{project_id}-r{number}"


_STAGE_ORDER = {"round": 0, "train": 1, "detect": 2, "cluster": 3}


def _parse_job_id(project_id: int, job_id: str) -> tuple[int, str, int] | None:
    """``(round number, stage, shard)`` of one of the project's pipeline job ids."""
    match = re.fullmatch(rf"(round|train|detect|cluster)-p{project_id}-r(\d+)(?:-s(\d+))?", job_id)
    if match is None:
        return None
    return int(match.group(2)), match.group(1), int(match.group(3) or 0)


# --------------------------------------------------------------------------------- the body


class ModelOptions(Body):
    """Overrides of the detector's configuration (``workers.model.ModelConfig``; round 1 only:
    later rounds continue from the previous round's model, architecture included). Unset fields
    are sized by the worker from the project's images."""

    backbone: Literal["resnet18_fpn", "resnet34_fpn", "resnet50_fpn"] | None = None
    norm: Literal["group", "batch", "frozen"] | None = None
    min_size: int | None = Field(default=None, ge=32, le=2048)
    max_size: int | None = Field(default=None, ge=32, le=4096)
    anchor_sizes: list[int] | None = Field(default=None, min_length=5, max_length=5)
    fpn_channels: int | None = Field(default=None, ge=8, le=512)
    box_head_dim: int | None = Field(default=None, ge=8, le=4096)
    score_threshold: float | None = Field(default=None, ge=0, lt=1)
    min_box_area: float | None = Field(default=None, ge=0)
    nms_threshold: float | None = Field(default=None, gt=0, le=1)
    detections_per_img: int | None = Field(default=None, ge=1, le=1000)
    rpn_pre_nms_top_n_train: int | None = Field(default=None, ge=1, le=100_000)
    rpn_post_nms_top_n_train: int | None = Field(default=None, ge=1, le=100_000)
    rpn_pre_nms_top_n_test: int | None = Field(default=None, ge=1, le=100_000)
    rpn_post_nms_top_n_test: int | None = Field(default=None, ge=1, le=100_000)
    box_batch_size_per_image: int | None = Field(default=None, ge=1, le=4096)
    feature_pool: int | None = Field(default=None, ge=1, le=14)
    feature_dim: int | None = Field(default=None, ge=2, le=4096)
    iou_head_channels: int | None = Field(default=None, ge=1, le=1024)
    iou_head_fc_dim: int | None = Field(default=None, ge=1, le=4096)
    iou_loss_weight: float | None = Field(default=None, ge=0, le=100)

    @field_validator("anchor_sizes")
    @classmethod
    def _anchors(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(size < 1 or size > 4096 for size in value):
            raise ValueError("anchor sizes must be 5 integers in [1, 4096]")
        return value


class RoundCreate(Body):
    detect: bool
    steps: int | None = Field(default=None, ge=1, le=1_000_000)
    shards: int = Field(default=1, ge=1, le=MAX_SHARDS)
    batch_size: int | None = Field(default=None, ge=1, le=64)
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    checkpoint_every: int | None = Field(default=None, ge=1, le=1_000_000)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    model: ModelOptions = Field(default_factory=ModelOptions)
    checkpoint: str | None = Field(
        default=None,
        min_length=1,
        max_length=4000,
        description="Detect with these weights instead of training: a storage key (or URI) of "
        "this project's objects, or a path under the image root. Excludes training options.",
    )


def _train_options(body: RoundCreate) -> dict[str, Any]:
    """Only what the requester set: the worker owns the defaults."""
    options: dict[str, Any] = {"seed": body.seed}
    for field, name in (
        ("steps", "steps"),
        ("batch_size", "batch_size"),
        ("learning_rate", "lr"),
        ("checkpoint_every", "checkpoint_every"),
    ):
        value = getattr(body, field)
        if value is not None:
            options[name] = value
    model = body.model.model_dump(exclude_none=True)
    if model:
        if "min_size" in model and "max_size" in model and model["max_size"] < model["min_size"]:
            raise validation_error("model.max_size must be >= model.min_size")
        options["model"] = model
    return options


def resolve_checkpoint(value: str, project_id: int, settings: Settings, storage: Storage) -> str:
    """The URI of a requester's checkpoint, after checking that it exists where it may be read.

    Storage holds every project's objects, so a key must lie under this project's prefix (a
    requester sees only its own projects; other projects' keys are refused before their existence
    is looked at); the image root is the operator's shared folder, read under the rule image URIs
    follow. A path under the image root that leads into a local storage root counts as storage.
    Nothing is opened: the service never imports torch, the worker judges the content.
    """
    prefix = f"projects/{project_id}/"
    refused = validation_error(
        f"checkpoint: {value!r} is neither an object of this project in storage (keys under "
        f"{prefix!r}) nor a file under the image root"
    )

    def stored(key: str | None) -> str | None:
        if key is not None and key.startswith(prefix) and storage.exists(key):
            return storage.uri(key)
        return None

    key = _storage_key(value, storage)
    found = stored(key)
    if found is not None:
        return found
    try:
        uri = resolve_image_uri(settings.image_root, value, value, "checkpoint")
    except ApiError:
        raise refused from None
    inner = _storage_key(uri, storage)
    if inner is not None:  # the image root contains the storage root
        found = stored(inner)
        if found is None:
            raise refused
        return found
    if not Path(uri.removeprefix("file://")).is_file():
        raise refused
    return uri


def _storage_key(value: str, storage: Storage) -> str | None:
    """The storage key ``value`` would name: a URI of this storage, or a well-formed relative
    key; None otherwise. Says nothing about whether an object exists there."""
    try:
        return storage.key_from_uri(value) if "://" in value else validate_key(value)
    except StorageError:
        return None


# ------------------------------------------------------------------------------ status views


def _jobs_by_round(session, project_id: int) -> dict[int, list[Job]]:
    jobs: dict[int, list[tuple[tuple[int, int], Job]]] = defaultdict(list)
    for job in session.scalars(select(Job).where(Job.project_id == project_id)):
        parsed = _parse_job_id(project_id, job.id)
        if parsed is not None:
            number, stage, shard = parsed
            jobs[number].append(((_STAGE_ORDER[stage], shard), job))
    return {n: [job for _, job in sorted(items, key=lambda x: x[0])] for n, items in jobs.items()}


def _stage_json(job: Job) -> dict[str, Any]:
    progress = job.progress or {}
    out: dict[str, Any] = {
        "id": job.id,
        "status": job.status.value,
        "fraction": progress.get("fraction", 0.0),
        "message": progress.get("message", ""),
        "attempts": job.attempts,
    }
    if job.error:
        out["error"] = job.error
    return out


def effective_status(rnd: Round, jobs: list[Job]) -> tuple[RoundStatus, str | None]:
    """The round's status, failed if a stage's job failed (also when the job died before it could
    mark the round), and the first failure's error."""
    failed = [j for j in jobs if j.status is JobStatus.FAILED]
    error = failed[0].error if failed else None
    if rnd.status in RUNNING and failed:
        return RoundStatus.FAILED, error
    return rnd.status, error if rnd.status is RoundStatus.FAILED else None


def _counts(session, project_id: int) -> dict[int, dict[str, Any]]:
    counts: dict[int, dict[str, Any]] = defaultdict(
        lambda: {"trees": 0, "masks": 0, "clusters": {}, "accepted_masks": 0}
    )
    for round_id, trees, masks in session.execute(
        select(Tree.round_id, func.count(), func.coalesce(func.sum(Tree.mask_count), 0))
        .where(Tree.project_id == project_id)
        .group_by(Tree.round_id)
    ):
        counts[round_id].update(trees=int(trees), masks=int(masks))
    for round_id, state, n, size in session.execute(
        select(Tree.round_id, Cluster.state, func.count(), func.coalesce(func.sum(Cluster.size), 0))
        .join(Tree, Tree.id == Cluster.tree_id)
        .where(Cluster.project_id == project_id)
        .group_by(Tree.round_id, Cluster.state)
    ):
        entry = counts[round_id]
        entry["clusters"][ClusterState(state).value] = int(n)
        if ClusterState(state) is ClusterState.ACCEPTED:
            entry["accepted_masks"] = int(size)
    return counts


def round_json(rnd: Round, jobs: list[Job], counts: dict[str, Any] | None) -> dict[str, Any]:
    status, error = effective_status(rnd, jobs)
    train = next((j for j in jobs if j.id.startswith("train-")), None)
    trained = ((train.progress or {}).get("result") or {}) if train is not None else {}
    out: dict[str, Any] = {
        "id": rnd.id,
        "number": rnd.number,
        "status": status.value,
        "job_id": rnd.job_id,
        "checkpoint_uri": rnd.checkpoint_uri,
        "ap": trained.get("ap"),
        "training": {key: trained[key] for key in TRAINING_KEYS if key in trained},
        "counts": counts or {"trees": 0, "masks": 0, "clusters": {}, "accepted_masks": 0},
        "jobs": [_stage_json(job) for job in jobs],
        "created_at": rnd.created_at.isoformat() if rnd.created_at else None,
    }
    if error:
        out["error"] = error
    return out


def _rounds(session, project: Project) -> list[tuple[Round, list[Job]]]:
    rounds = session.scalars(
        select(Round).where(Round.project_id == project.id).order_by(Round.number)
    ).all()
    jobs = _jobs_by_round(session, project.id)
    return [(rnd, jobs.get(rnd.number, [])) for rnd in rounds]


# ------------------------------------------------------------------------------------ views


@bp.post("/<int:project_id>/rounds")
@require_api_key
@accepts(RoundCreate)
def create_round(project_id: int):
    """Start a round: train on seed + accepted masks, then (detect: true) detect and cluster."""
    body = parse(RoundCreate)
    project = owned_project(project_id)
    checkpoint: str | None = None
    if body.checkpoint is not None:
        clashing = [name for name in TRAINING_FIELDS if name in body.model_fields_set]
        if clashing:
            raise validation_error(
                f"{', '.join(clashing)}: training options cannot be combined with checkpoint "
                "(the round detects with the given weights instead of training)"
            )
        checkpoint = resolve_checkpoint(
            body.checkpoint,
            project.id,
            get_settings(),
            current_app.extensions["maskmill.storage"],
        )
        options: dict[str, Any] = {}
    else:
        options = _train_options(body)
    session = get_session()
    for rnd, jobs in _rounds(session, project):
        status, _ = effective_status(rnd, jobs)
        if status in RUNNING:
            raise conflict(
                f"round {rnd.number} is still {status.value}; wait until it is ready or failed",
                round=rnd.number,
            )
    seeded = session.scalar(
        select(
            exists().where(
                GroundTruthMask.project_id == project.id, GroundTruthMask.split == Split.SEED
            )
        )
    )
    if not seeded and checkpoint is None:  # given weights need no training set
        raise validation_error(
            "the project has no seed ground truth to train on: upload it first with "
            f"POST /api/v1/projects/{project.id}/ground-truth?split=seed, or give a checkpoint"
        )
    if body.detect:
        seed_images = select(GroundTruthMask.image_id).where(
            GroundTruthMask.project_id == project.id, GroundTruthMask.split == Split.SEED
        )
        unlabelled = session.scalar(
            select(func.count()).where(Image.project_id == project.id, Image.id.not_in(seed_images))
        )
        if not unlabelled:
            raise validation_error(
                "the project has no unlabelled images to detect on (every image is in the seed "
                "set); register pool images or start the round with detect: false"
            )
    number = next_round_number(session, project.id)
    job_id = round_job_id(project.id, number)
    rnd = Round(project_id=project.id, number=number, status=RoundStatus.PENDING, job_id=job_id)
    session.add(rnd)
    try:
        session.flush()
        enqueue(
            session,
            get_settings(),
            ROUND_JOB,
            job_id=job_id,
            queue="cpu",
            project_id=project.id,
            round_id=rnd.id,
            detect=body.detect,
            shards=body.shards,
            train_options=options,
            **({"checkpoint": checkpoint} if checkpoint is not None else {}),
        )
    except (IntegrityError, DuplicateJobError):
        # A concurrent POST took this round number first.
        session.rollback()
        raise conflict("another round was started at the same time; try again") from None
    return jsonify({"round": number, "round_id": rnd.id, "job_id": job_id}), 202


@bp.get("/<int:project_id>/rounds")
@require_api_key
def list_rounds(project_id: int):
    """The project's rounds, oldest first: status, error, held-out mask AP, counts, stage jobs."""
    project = owned_project(project_id)
    session = get_session()
    counts = _counts(session, project.id)
    return jsonify(
        {
            "rounds": [
                round_json(rnd, jobs, counts.get(rnd.id)) for rnd, jobs in _rounds(session, project)
            ]
        }
    )


@bp.get("/<int:project_id>/rounds/<int:number>")
@require_api_key
def get_round(project_id: int, number: int):
    """One round of the project by its number."""
    project = owned_project(project_id)
    session = get_session()
    for rnd, jobs in _rounds(session, project):
        if rnd.number == number:
            return jsonify(round_json(rnd, jobs, _counts(session, project.id).get(rnd.id)))
    raise not_found(f"round {number} of project {project.id}")
