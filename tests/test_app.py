"""The app factory, /healthz on both databases, and the one JSON error body for every error."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest
from flask import request
from sqlalchemy import text

from service import migrate
from service.app import create_app
from service.db import get_database, get_session, writes
from service.devservers import free_port
from service.settings import Settings
from tests.helpers import new_key


def _assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text
    return body["error"]


def test_create_app_touches_nothing(tmp_path):
    # An unreachable database must not matter until a request needs it.
    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/nothing"
    app = create_app({"database_url": url, "storage_url": str(tmp_path / "s")})
    assert not (tmp_path / "s").exists()
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["database"]["ok"] is False


def test_create_app_rejects_unknown_setting():
    with pytest.raises(ValueError, match="unknown setting"):
        create_app({"databse_url": "sqlite://"})


def test_boots_on_postgres(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["checks"]["database"]["ok"] is True


def test_boots_on_sqlite(sqlite_url, tmp_path):
    migrate.upgrade(sqlite_url)
    app = create_app(Settings(database_url=sqlite_url, storage_url=str(tmp_path / "s")))
    client = app.test_client()
    assert client.get("/healthz").get_json()["status"] == "ok"
    with get_database(app).session() as session:
        _, headers = new_key(session)
    created = client.post(
        "/api/v1/projects", json={"name": "p", "classes": ["a", "b"]}, headers=headers
    )
    assert created.status_code == 201, created.get_json()
    assert [c["name"] for c in created.get_json()["classes"]] == ["a", "b"]
    get_database(app).dispose()


def test_healthz_checks_redis(settings, redis_server):
    up = create_app(settings.replace(redis_url=redis_server.url)).test_client().get("/healthz")
    assert up.status_code == 200 and up.get_json()["checks"]["redis"]["ok"] is True
    dead = f"redis://127.0.0.1:{free_port()}/0"
    down = create_app(settings.replace(redis_url=dead)).test_client().get("/healthz")
    assert down.status_code == 503
    assert down.get_json()["checks"]["redis"]["ok"] is False


@pytest.fixture()
def headers(db):
    return new_key(db)[1]


def test_404_unknown_route(client):
    _assert_error(client.get("/no/such/route"), 404, "not_found")


def test_405_wrong_method(client):
    error = _assert_error(client.delete("/healthz"), 405, "method_not_allowed")
    assert "not allowed" in error["message"].lower()


def test_400_malformed_json(client, headers):
    response = client.post(
        "/api/v1/projects",
        data='{"name": "p", "classes": [',
        content_type="application/json",
        headers=headers,
    )
    error = _assert_error(response, 400, "bad_request")
    assert "malformed JSON" in error["message"]


def test_400_empty_body(client, headers):
    response = client.post(
        "/api/v1/projects", data="", content_type="application/json", headers=headers
    )
    _assert_error(response, 400, "bad_request")


def test_415_not_json(client, headers):
    response = client.post(
        "/api/v1/projects",
        data="name=p",
        headers=headers,
        content_type="application/x-www-form-urlencoded",
    )
    _assert_error(response, 415, "unsupported_media_type")


def test_413_body_too_large(client, headers, app):
    limit = app.config["MAX_CONTENT_LENGTH"]
    payload = json.dumps({"name": "p", "classes": ["x" * (limit + 10)]})
    response = client.post(
        "/api/v1/projects", data=payload, content_type="application/json", headers=headers
    )
    error = _assert_error(response, 413, "payload_too_large")
    assert str(limit) in error["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"classes": ["a"]}, "name"),
        ({"name": "p", "classes": "a"}, "classes"),
        ({"name": "p", "classes": []}, "classes"),
        ({"name": "p", "classes": ["a", "a"]}, "duplicate"),
        ({"name": 5, "classes": ["a"]}, "name"),
        ({"name": "p", "classes": ["a"], "colour": "red"}, "colour"),
        ({"name": "p", "classes": ["a"], "params": {"k_a": 2}}, "k_a"),
        ([1, 2], "object"),
    ],
)
def test_422_validation(client, headers, body, field):
    error = _assert_error(
        client.post("/api/v1/projects", json=body, headers=headers), 422, "validation_error"
    )
    assert field in error["message"]


def test_401_without_key(client):
    _assert_error(client.post("/api/v1/projects", json={}), 401, "unauthorized")
    bad = {"Authorization": "Bearer mm_nope_nope"}
    _assert_error(client.get("/api/v1/projects", headers=bad), 401, "unauthorized")


def test_500_never_leaks_a_traceback(settings):
    app = create_app(settings)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals")

    response = app.test_client().get("/boom")
    error = _assert_error(response, 500, "internal_error")
    assert "secret" not in error["message"]


def test_no_cookie_sessions(settings):
    """Nothing is kept in cookies: no Set-Cookie, and code that tried to would be told why."""
    from flask import session

    app = create_app(settings)

    @app.get("/remember")
    def remember():
        assert not session
        session["user"] = "x"
        return {}

    response = app.test_client().get("/remember", headers={"Cookie": "session=abc"})
    assert "Set-Cookie" not in response.headers
    _assert_error(response, 500, "internal_error")
    with app.test_request_context("/"), pytest.raises(RuntimeError, match="no cookie sessions"):
        session["user"] = "x"


def _sqlite_app_with_write_route(sqlite_url, tmp_path):
    """An embedded-default app with a route that reads, then writes, in one transaction; the
    route waits ``?wait_ms=`` for SQLite's write lock (the service waits 30 s)."""
    migrate.upgrade(sqlite_url)
    app = create_app(
        Settings(database_url=sqlite_url, storage_url=str(tmp_path / "s"), testing=True)
    )

    @app.post("/write-after-read")
    def write_after_read():
        with get_database(app).engine.connect() as connection:
            # Set on the driver's connection before the transaction (and its BEGIN) starts.
            driver = connection.connection.driver_connection
            driver.execute(f"PRAGMA busy_timeout = {int(request.args['wait_ms'])}")
            try:
                with connection.begin_nested():  # a savepoint, as a HIT build takes
                    connection.exec_driver_sql("SELECT count(*) FROM api_keys").scalar()
                    connection.exec_driver_sql(
                        "INSERT INTO api_keys (name, prefix, key_hash) VALUES ('x', 'x', 'x')"
                    )
                connection.commit()
            finally:
                driver.execute("PRAGMA busy_timeout = 30000")
        return {"ok": True}

    return app, sqlite_url.removeprefix("sqlite:///")


def test_sqlite_write_waits_for_another_writer(sqlite_url, tmp_path):
    """A transaction that reads and then writes waits for another connection's write lock
    (every SQLite transaction begins IMMEDIATE) instead of failing at the write: a deferred one
    would be refused its upgrade at once ("database is locked")."""
    app, path = _sqlite_app_with_write_route(sqlite_url, tmp_path)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO api_keys (name, prefix, key_hash) VALUES ('y', 'y', 'y')")
    released = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    released.start()
    try:
        response = app.test_client().post("/write-after-read?wait_ms=10000")
        assert response.status_code == 200, response.get_data(as_text=True)
    finally:
        released.join()
        other.close()
    keys = sqlite3.connect(path).execute("SELECT count(*) FROM api_keys").fetchone()[0]
    assert keys == 2


def test_sqlite_lock_refusal_is_a_503_not_a_500(sqlite_url, tmp_path):
    """A write lock held longer than the wait is a retryable 503 with Retry-After, never a 500.
    The lock is real: another connection holds SQLite's write lock throughout."""
    app, path = _sqlite_app_with_write_route(sqlite_url, tmp_path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        response = app.test_client().post("/write-after-read?wait_ms=100")
        error = _assert_error(response, 503, "database_busy")
        assert "retry" in error["message"]
        assert response.headers["Retry-After"] == "1"
    finally:
        other.execute("ROLLBACK")
        other.close()
        get_database(app).dispose()
    assert app.test_client().post("/write-after-read?wait_ms=1000").status_code == 200


def test_sqlite_reads_do_not_wait_for_a_writer(sqlite_url, tmp_path):
    """GET requests read alongside another connection's write (their transactions begin
    deferred); a GET marked as writing begins its transaction as every writer does (here it waits
    out a short busy timeout into the 503) and writes once the lock is free."""
    app, path = _sqlite_app_with_write_route(sqlite_url, tmp_path)

    @app.get("/read-then-write")
    @writes
    def read_then_write():
        session = get_session()
        session.connection().connection.driver_connection.execute("PRAGMA busy_timeout = 100")
        session.execute(text("SELECT count(*) FROM api_keys")).scalar()
        session.execute(
            text("INSERT INTO api_keys (name, prefix, key_hash) VALUES ('z', 'z', 'z')")
        )
        session.commit()
        return {"ok": True}

    with get_database(app).session() as session:
        _, headers = new_key(session, "reader")
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO api_keys (name, prefix, key_hash) VALUES ('y', 'y', 'y')")
        started = time.monotonic()
        response = app.test_client().get("/api/v1/projects", headers=headers)
        assert response.status_code == 200, response.get_data(as_text=True)
        assert time.monotonic() - started < 5  # the busy timeout is 30 s: it did not wait
        _assert_error(app.test_client().get("/read-then-write"), 503, "database_busy")
    finally:
        other.execute("ROLLBACK")
        other.close()
        get_database(app).dispose()
    assert app.test_client().get("/read-then-write").status_code == 200
    assert getattr(app.view_functions["work.get_qualification"], "maskmill_writes", False)


def test_key_sees_only_its_own_projects(client, db):
    _, alice = new_key(db, "alice")
    _, bob = new_key(db, "bob")
    created = client.post("/api/v1/projects", json={"name": "a", "classes": ["cat"]}, headers=alice)
    assert created.status_code == 201
    pid = created.get_json()["id"]
    assert client.get(f"/api/v1/projects/{pid}", headers=alice).status_code == 200
    _assert_error(client.get(f"/api/v1/projects/{pid}", headers=bob), 404, "not_found")
    assert client.get("/api/v1/projects", headers=bob).get_json()["projects"] == []
