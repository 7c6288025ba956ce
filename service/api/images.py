"""Images of a project: registered by URI under the configured image root, or uploaded into storage."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from pydantic import Field
from sqlalchemy import func, select

from service.api.projects import owned_project
from service.api.validation import Body, accepts, parse
from service.app import get_settings
from service.auth import require_api_key
from service.db import get_session
from service.errors import ApiError, conflict, validation_error
from service.models import Image
from service.storage import StorageError, validate_key

bp = Blueprint("images", __name__, url_prefix="/api/v1/projects")

MAX_IMAGES_PER_REQUEST = 10_000


class ImageIn(Body):
    file_name: str = Field(min_length=1, max_length=1000)
    uri: str | None = Field(default=None, max_length=4000)
    width: int = Field(gt=0, le=100_000)
    height: int = Field(gt=0, le=100_000)


class ImagesIn(Body):
    images: list[ImageIn] = Field(min_length=1, max_length=MAX_IMAGES_PER_REQUEST)


def resolve_image_uri(image_root: str, uri: str | None, file_name: str, where: str) -> str:
    """A ``file://`` URI for an image under the image root; anything outside it is refused."""
    root = Path(image_root).expanduser().resolve()
    raw = uri if uri is not None else file_name
    path_text = raw.removeprefix("file://")
    if "://" in path_text:
        raise validation_error(f"{where}.uri: only file paths under the image root are accepted")
    path = Path(path_text)
    candidate = (path if path.is_absolute() else root / path).resolve()
    if not candidate.is_relative_to(root) or candidate == root:
        raise validation_error(f"{where}.uri: {raw!r} is outside the image root")
    return f"file://{candidate}"


def image_json(image: Image) -> dict[str, Any]:
    return {
        "id": image.id,
        "file_name": image.file_name,
        "width": image.width,
        "height": image.height,
        "uri": image.uri,
    }


def _refuse_duplicates(session, project_id: int, names: list[str]) -> None:
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise validation_error(f"duplicate file_name in the request: {', '.join(repeated[:5])}")
    existing = session.scalars(
        select(Image.file_name).where(Image.project_id == project_id, Image.file_name.in_(names))
    ).all()
    if existing:
        raise conflict(f"images already registered: {', '.join(sorted(existing)[:5])}")


@bp.post("/<int:project_id>/images")
@require_api_key
@accepts(ImagesIn)
def add_images(project_id: int):
    """Register images by path under the image root (JSON) or upload them (multipart 'files')."""
    project = owned_project(project_id)
    session = get_session()
    if request.mimetype == "multipart/form-data":
        images = _from_upload(project.id)
    else:
        body = parse(ImagesIn)
        settings = get_settings()
        images = [
            Image(
                project_id=project.id,
                file_name=item.file_name,
                uri=resolve_image_uri(settings.image_root, item.uri, item.file_name, f"images.{i}"),
                width=item.width,
                height=item.height,
            )
            for i, item in enumerate(body.images)
        ]
    _refuse_duplicates(session, project.id, [image.file_name for image in images])
    session.add_all(images)
    session.commit()
    return jsonify({"images": [image_json(image) for image in images]}), 201


def _from_upload(project_id: int) -> list[Image]:
    """Uploaded files go to storage under the project; their size is read from the file itself."""
    files = request.files.getlist("files") or list(request.files.values())
    if not files:
        raise ApiError(422, "validation_error", "multipart upload has no files (field 'files')")
    storage = current_app.extensions["maskmill.storage"]
    staged: list[tuple[str, bytes, int, int]] = []
    for upload in files:
        name = PurePosixPath(upload.filename or "").name
        if not name:
            raise validation_error("an uploaded file has no file name")
        try:
            validate_key(name)
        except StorageError as exc:
            raise validation_error(str(exc)) from None
        data = upload.read()
        try:
            with PILImage.open(io.BytesIO(data)) as picture:
                picture.verify()
            with PILImage.open(io.BytesIO(data)) as picture:
                width, height = picture.size
        except (UnidentifiedImageError, OSError, SyntaxError):
            raise validation_error(f"uploaded file {name!r} is not a readable image") from None
        staged.append((name, data, width, height))
    # Validate everything before writing anything.
    images = []
    for name, data, width, height in staged:
        uri = storage.put_bytes(f"projects/{project_id}/images/{name}", data)
        images.append(
            Image(project_id=project_id, file_name=name, uri=uri, width=width, height=height)
        )
    return images


@bp.get("/<int:project_id>/images")
@require_api_key
def list_images(project_id: int):
    """List a project's images (limit, offset)."""
    project = owned_project(project_id)
    try:
        limit = min(int(request.args.get("limit", 1000)), 10_000)
        offset = max(int(request.args.get("offset", 0)), 0)
    except ValueError:
        raise validation_error("limit and offset must be integers") from None
    session = get_session()
    total = session.scalar(select(func.count()).where(Image.project_id == project.id))
    images = session.scalars(
        select(Image)
        .where(Image.project_id == project.id)
        .order_by(Image.id)
        .limit(limit)
        .offset(offset)
    )
    return jsonify({"total": total, "images": [image_json(image) for image in images]})
