"""``GET /api/v1/projects/{pid}/export?format=coco``: the accepted masks as a COCO document."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from service.api.projects import owned_project
from service.auth import require_api_key
from service.db import get_session
from service.errors import validation_error
from service.export import coco_export

bp = Blueprint("export", __name__, url_prefix="/api/v1/projects")


@bp.get("/<int:project_id>/export")
@require_api_key
def export_project(project_id: int):
    """Export the accepted masks (one per object) as COCO JSON that pycocotools loads."""
    project = owned_project(project_id)
    fmt = request.args.get("format", "coco")
    if fmt != "coco":
        raise validation_error(f"unsupported export format {fmt!r}; use format=coco")
    document = coco_export(get_session(), current_app.extensions["maskmill.storage"], project)
    response = jsonify(document)
    response.headers["Content-Disposition"] = (
        f'attachment; filename="project-{project.id}-coco.json"'
    )
    return response
