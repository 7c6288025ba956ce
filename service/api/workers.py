"""Local crowd workers: invites (a token shown once, only its hash stored) and the dashboard's list."""

from __future__ import annotations

import secrets
from typing import Any

from flask import Blueprint, jsonify, request
from sqlalchemy import case, func, or_, select

from service.api.projects import owned_project
from service.api.validation import Body, accepts, parse
from service.app import get_settings
from service.auth import hash_secret, require_api_key
from service.db import get_session
from service.models import (
    Assignment,
    AssignmentStatus,
    Backend,
    Campaign,
    Hit,
    Worker,
)

bp = Blueprint("workers", __name__, url_prefix="/api/v1/projects")


class WorkerCreate(Body):
    """No fields yet; an empty object (or no body) invites one worker."""


def invite_url(token: str) -> str:
    return f"{get_settings().public_url.rstrip('/')}/hit?token={token}"


@bp.post("/<int:project_id>/workers")
@require_api_key
@accepts(WorkerCreate)
def create_worker(project_id: int):
    """Invite a local worker: returns its id, its token (shown once) and its invite URL."""
    if request.get_data(cache=True):
        parse(WorkerCreate)
    project = owned_project(project_id)
    token = secrets.token_urlsafe(32)
    worker = Worker(
        backend=Backend.LOCAL,
        external_id=f"local-{secrets.token_hex(8)}",
        project_id=project.id,
        token_hash=hash_secret(token),
        qualified=False,
        qualification_attempts=0,
        gold_correct=0,
        gold_total=0,
        blocked=False,
    )
    session = get_session()
    session.add(worker)
    session.commit()
    return jsonify({"worker_id": worker.id, "token": token, "url": invite_url(token)}), 201


def _worker_json(row: Any) -> dict[str, Any]:
    worker: Worker = row[0]
    accuracy = worker.gold_correct / worker.gold_total if worker.gold_total else None
    return {
        "id": worker.id,
        "backend": str(worker.backend),
        "external_id": worker.external_id,
        "qualified": worker.qualified,
        "qualification_attempts": worker.qualification_attempts,
        "gold_correct": worker.gold_correct,
        "gold_total": worker.gold_total,
        "gold_accuracy": accuracy,
        "blocked": worker.blocked,
        "blocked_reason": worker.blocked_reason,
        "blocked_at": worker.blocked_at.isoformat() if worker.blocked_at else None,
        "assignments": {"approved": int(row[1]), "rejected": int(row[2])},
        "created_at": worker.created_at.isoformat() if worker.created_at else None,
    }


@bp.get("/<int:project_id>/workers")
@require_api_key
def list_workers(project_id: int):
    """The project's workers (invited ones, and any who worked on its campaigns) with gold
    accuracy, blocks and their reasons, and assignment counts from one aggregate."""
    project = owned_project(project_id)
    per_worker = (
        select(
            Assignment.worker_id.label("worker_id"),
            func.count(case((Assignment.status == AssignmentStatus.APPROVED, 1))).label("ok"),
            func.count(case((Assignment.status == AssignmentStatus.REJECTED, 1))).label("bad"),
        )
        .join(Hit, Hit.id == Assignment.hit_id)
        .join(Campaign, Campaign.id == Hit.campaign_id)
        .where(Campaign.project_id == project.id)
        .group_by(Assignment.worker_id)
        .subquery()
    )
    rows = (
        get_session()
        .execute(
            select(
                Worker,
                func.coalesce(per_worker.c.ok, 0),
                func.coalesce(per_worker.c.bad, 0),
            )
            .outerjoin(per_worker, per_worker.c.worker_id == Worker.id)
            .where(or_(Worker.project_id == project.id, per_worker.c.worker_id.is_not(None)))
            .order_by(Worker.id)
        )
        .all()
    )
    return jsonify({"workers": [_worker_json(r) for r in rows]})
