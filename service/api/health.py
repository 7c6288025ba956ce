"""``/healthz``: is the database reachable, and Redis when one is configured?"""

from __future__ import annotations

import time

from flask import Blueprint, jsonify
from sqlalchemy import text

from service.app import get_settings
from service.db import get_database

bp = Blueprint("health", __name__)


def _check_database() -> dict:
    started = time.perf_counter()
    try:
        with get_database().engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "down"; the message says which
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 2)}


def _check_redis(url: str) -> dict:
    import redis

    started = time.perf_counter()
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        client.ping()
        client.close()
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 2)}


@bp.get("/healthz")
def healthz():
    settings = get_settings()
    checks = {"database": _check_database()}
    if settings.redis_url:
        checks["redis"] = _check_redis(settings.redis_url)
    healthy = all(check["ok"] for check in checks.values())
    body = {"status": "ok" if healthy else "unavailable", "checks": checks}
    return jsonify(body), 200 if healthy else 503
