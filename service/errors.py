"""One error type and one JSON error body for every failure the service reports.

Every error leaves the service as ``{"error": {"code": str, "message": str}}`` with a 4xx/5xx status.
Handlers are installed for our :class:`ApiError`, for every werkzeug ``HTTPException`` (404, 405, 413,
malformed JSON's 400, ...) and for anything unexpected (a 500 that logs the traceback but never sends it).
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from flask import Flask, jsonify
from sqlalchemy.exc import DBAPIError
from werkzeug.exceptions import HTTPException

from service.db import get_database

log = logging.getLogger(__name__)

# Readable codes for werkzeug's exceptions; anything else falls back to a snake_case of its name.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
}


class ApiError(Exception):
    """Raise anywhere in a request to answer with a JSON error body."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


def bad_request(message: str, **details: Any) -> ApiError:
    return ApiError(400, "bad_request", message, **details)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def validation_error(message: str, **details: Any) -> ApiError:
    return ApiError(422, "validation_error", message, **details)


def conflict(message: str, **details: Any) -> ApiError:
    return ApiError(409, "conflict", message, **details)


def error_response(status: int, code: str, message: str):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def install(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        response = jsonify(exc.body())
        response.status_code = exc.status
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        code = _HTTP_CODES.get(status, type(exc).__name__.lower())
        message = exc.description or exc.name
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"request body is larger than the limit of {limit} bytes"
        response = error_response(status, code, message)
        valid_methods = getattr(exc, "valid_methods", None)
        if status == 405 and valid_methods:
            response.headers["Allow"] = ", ".join(sorted(valid_methods))
        return response

    @app.errorhandler(DBAPIError)
    def _database_error(exc: DBAPIError):
        if isinstance(exc.orig, sqlite3.OperationalError) and "database is locked" in str(exc.orig):
            # SQLite (the embedded default) runs one transaction at a time (service.db begins
            # each IMMEDIATE); one that waited out the busy timeout for another connection's
            # lock gets here. Nothing was written: ask the client to retry.
            log.warning("SQLite refused a write: %s", exc.orig)
            response = error_response(
                503, "database_busy", "the database is busy with another write; retry the request"
            )
            response.headers["Retry-After"] = "1"
            return response
        if not exc.connection_invalidated:
            return _unexpected(exc)
        # The server dropped the connection (restart, failover). Pooled connections are tested
        # only after sitting idle (service.db), so drop the pool's others too and ask the client
        # to retry; the worker API retries by itself (service.api.work).
        log.warning("database connection lost: %s", exc.orig)
        get_database(app).engine.dispose()
        response = error_response(
            503, "database_unavailable", "the database connection was lost; retry the request"
        )
        response.headers["Retry-After"] = "1"
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")
