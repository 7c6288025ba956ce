"""``GET /api/v1/jobs/{id}``: a background job's status, progress and error, from the database."""

from __future__ import annotations

from flask import Blueprint, g, jsonify

from service.auth import require_api_key
from service.db import get_session
from service.errors import not_found
from service.jobs import job_json
from service.models import Job, Project

bp = Blueprint("jobs", __name__, url_prefix="/api/v1/jobs")


@bp.get("/<string:job_id>")
@require_api_key
def get_job(job_id: str):
    session = get_session()
    job = session.get(Job, job_id)
    # A job is visible only through a project the caller owns.
    if job is None or job.project_id is None:
        raise not_found(f"job {job_id}")
    if Project.owned(session, job.project_id, g.api_key.id) is None:
        raise not_found(f"job {job_id}")
    return jsonify(job_json(job))
