"""Projects: a requester's unit of work (classes, policy parameters, images, rounds, campaigns)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify
from pydantic import Field, field_validator
from sqlalchemy import select

from service.api.validation import Body, accepts, parse
from service.auth import require_api_key
from service.db import get_session
from service.engine.policy import PolicyParams
from service.errors import not_found, validation_error
from service.models import Project, ProjectClass

bp = Blueprint("projects", __name__, url_prefix="/api/v1/projects")


class ProjectCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    classes: list[str] = Field(min_length=1, max_length=1000)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, value: list[str]) -> list[str]:
        names = [name.strip() for name in value]
        if any(not name for name in names):
            raise ValueError("class names must be non-empty")
        if any(len(name) > 200 for name in names):
            raise ValueError("class names must be at most 200 characters")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate class names: {', '.join(duplicates)}")
        return names


def validate_params(raw: dict[str, Any]) -> dict[str, Any]:
    """Project params are the engine's policy parameters; store them complete and validated."""
    try:
        return PolicyParams.from_dict(raw).to_dict()
    except ValueError as exc:
        raise validation_error(f"params: {exc}") from None


def project_json(project: Project) -> dict[str, Any]:
    return {
        "id": project.id,
        "name": project.name,
        "classes": [{"id": c.id, "name": c.name} for c in project.classes],
        "params": project.params,
        "created_at": project.created_at.isoformat() if project.created_at else None,
    }


def owned_project(project_id: int) -> Project:
    """The caller's project, or 404 (another key's project is reported exactly like a missing one)."""
    project = Project.owned(get_session(), project_id, g.api_key.id)
    if project is None:
        raise not_found(f"project {project_id}")
    return project


@bp.post("")
@require_api_key
@accepts(ProjectCreate)
def create_project():
    """Create a project with its classes and (optional) policy parameters."""
    body = parse(ProjectCreate)
    params = validate_params(body.params)
    session = get_session()
    project = Project(name=body.name.strip(), params=params, api_key_id=g.api_key.id)
    project.classes = [ProjectClass(name=name) for name in body.classes]
    session.add(project)
    session.commit()
    return jsonify(project_json(project)), 201


@bp.get("")
@require_api_key
def list_projects():
    """List the caller's projects."""
    projects = get_session().scalars(
        select(Project).where(Project.api_key_id == g.api_key.id).order_by(Project.id)
    )
    return jsonify({"projects": [project_json(p) for p in projects]})


@bp.get("/<int:project_id>")
@require_api_key
def get_project(project_id: int):
    """One of the caller's projects."""
    return jsonify(project_json(owned_project(project_id)))
