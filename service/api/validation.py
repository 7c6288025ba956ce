"""Request bodies are parsed and validated here, in one place.

Bodies are pydantic models (strict about types, no unknown fields), so a wrong type or a missing field
becomes a 422 whose message names the field, and malformed JSON becomes a 400 naming the position.
The same models feed the OpenAPI document.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from flask import request
from pydantic import BaseModel, ConfigDict, ValidationError

from service.errors import ApiError, bad_request

M = TypeVar("M", bound=BaseModel)


class Body(BaseModel):
    """Base for request bodies: unknown fields are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def json_payload() -> Any:
    """The request's JSON, or a 400 that says what is wrong with it."""
    if not request.mimetype or not request.is_json:
        raise ApiError(
            415, "unsupported_media_type", "send the body as JSON (Content-Type: application/json)"
        )
    raw = request.get_data(cache=True)
    if not raw:
        raise bad_request("the request body is empty; expected a JSON document")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise bad_request("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise bad_request(
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def describe(error: ValidationError) -> str:
    """One line per problem, each naming the field path, e.g. ``classes.2: must be a string``."""
    parts = []
    for item in error.errors(include_url=False):
        location = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)


def accepts(model: type[BaseModel]):
    """Declare a view's request body model (the OpenAPI document reads it)."""

    def mark(view):
        view.body_model = model
        return view

    return mark


def parse(model: type[M], payload: Any | None = None) -> M:
    data = json_payload() if payload is None else payload
    if not isinstance(data, dict):
        raise ApiError(422, "validation_error", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "validation_error", describe(exc)) from None
