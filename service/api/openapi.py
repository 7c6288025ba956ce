"""``GET /api/v1/openapi.json``: an OpenAPI 3.1 document generated from the registered routes.

Generated, not hand-written, so it cannot forget a route: every ``/api/v1`` rule of the URL map is
described, with its summary from the view's docstring and, where the view declares one with
:func:`service.api.validation.accepts`, the JSON schema of its request body (from the pydantic model).
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, current_app, jsonify

bp = Blueprint("openapi", __name__, url_prefix="/api/v1")

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
_PARAM = re.compile(r"<(?:(\w+):)?(\w+)>")


def _path_and_params(rule: str) -> tuple[str, list[dict[str, Any]]]:
    params = []
    for converter, name in _PARAM.findall(rule):
        kind = "integer" if converter == "int" else "string"
        params.append({"name": name, "in": "path", "required": True, "schema": {"type": kind}})
    return _PARAM.sub(lambda m: "{" + m.group(2) + "}", rule), params


def build_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(current_app.url_map.iter_rules(), key=lambda r: r.rule):
        if not rule.rule.startswith("/api/v1"):
            continue
        view = current_app.view_functions[rule.endpoint]
        path, params = _path_and_params(rule.rule)
        doc = (view.__doc__ or rule.endpoint).strip().splitlines()[0]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operation: dict[str, Any] = {
                "operationId": f"{rule.endpoint}.{method.lower()}",
                "summary": doc,
                "parameters": params,
                "responses": {
                    "default": {
                        "description": "error",
                        "content": {"application/json": {"schema": _ERROR_SCHEMA}},
                    },
                    "2XX": {"description": "success (JSON)"},
                },
            }
            body_model = getattr(view, "body_model", None)
            if body_model is not None:
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": body_model.model_json_schema()}},
                }
            if not rule.rule.startswith(("/api/v1/work", "/api/v1/openapi")):
                operation["security"] = [{"bearer": []}]
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "maskmill", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI document of this API."""
    return jsonify(build_document())
