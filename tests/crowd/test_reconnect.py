"""Losing the database connection: pooled connections are tested only after sitting idle
(:mod:`service.db`), so the worker API retries a request whose connection the server dropped."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text

from service import db as service_db
from service.app import create_app
from service.db import get_database, make_engine
from tests.crowd.world import campaign_world, do_hit
from tests.helpers import new_key


def _terminate_others(database_url: str) -> int:
    """Cut every other session of the database, as a server restart would."""
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


def test_worker_requests_survive_dropped_connections(client, db, settings):
    # The root and its parts must split: work for 3 HITs.
    world, _, worker = campaign_world(client, db, "reconnect", "GB" * 8, gold=(True, False))
    assert do_hit(client, db, world, worker["token"]) is not None
    db.close()

    # Connections the app used a moment ago are dead now: the claim (fast path, raw driver)
    # and then the submission find out on their first statement and retry on fresh ones.
    assert _terminate_others(settings.database_url) >= 1
    assert do_hit(client, db, world, worker["token"]) is not None


def test_requester_api_answers_503_once_then_recovers(settings, monkeypatch):
    """Requester routes do not retry by themselves: a request on a connection the server has
    just dropped gets a 503 asking to retry (never a 500), and the pool is refreshed for the
    next one."""
    monkeypatch.setattr(service_db, "IDLE_PING_SECONDS", 3600.0)  # never ping: deterministic
    app = create_app(settings)
    try:
        client = app.test_client()
        with get_database(app).session() as session:
            _, headers = new_key(session, "reconnect-requester")
        assert client.get("/api/v1/projects", headers=headers).status_code == 200
        assert _terminate_others(settings.database_url) >= 1
        lost = client.get("/api/v1/projects", headers=headers)
        assert lost.status_code == 503, lost.get_json()
        assert lost.get_json()["error"]["code"] == "database_unavailable"
        assert lost.headers["Retry-After"] == "1"
        assert client.get("/api/v1/projects", headers=headers).status_code == 200
    finally:
        get_database(app).dispose()


@pytest.mark.parametrize("idle_ping", [True, False])
def test_idle_connections_are_pinged_before_use(migrated_pg_url, monkeypatch, idle_ping):
    # Idle for "longer than the threshold" is every connection when the threshold is 0.
    monkeypatch.setattr(service_db, "IDLE_PING_SECONDS", 0.0 if idle_ping else 3600.0)
    engine = make_engine(migrated_pg_url)
    try:
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT 1")) == 1
        _terminate_others(migrated_pg_url)
        if idle_ping:
            # The ping finds the connection dead; the pool replaces it before handing it out.
            with engine.connect() as connection:
                assert connection.scalar(text("SELECT 2")) == 2
        else:
            # Without the ping (used a moment ago), the first statement is what finds out.
            with (
                pytest.raises(Exception, match=r"terminat|closed|server") as raised,
                engine.connect() as connection,
            ):
                connection.scalar(text("SELECT 2"))
            assert getattr(raised.value, "connection_invalidated", False)
    finally:
        engine.dispose()
