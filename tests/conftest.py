"""Shared fixtures: one throwaway PostgreSQL and one Redis per test session (started here, on free
loopback ports, stopped even when tests fail), a fresh migrated database per test module, and the
``app`` / ``client`` / ``db`` fixtures of DESIGN.md."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from service import migrate
from service.app import create_app
from service.db import get_database
from service.devservers import PostgresServer, RedisServer
from service.settings import Settings


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def _database_name(request: pytest.FixtureRequest) -> str:
    module = request.module.__name__.rsplit(".", 1)[-1]
    return "t_" + re.sub(r"[^a-z0-9_]", "_", module.lower())[:50]


@pytest.fixture(scope="module")
def pg_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test module."""
    name = _database_name(request)
    url = postgres.create_database(name)
    try:
        yield url
    finally:
        postgres.drop_database(name)


@pytest.fixture(scope="module")
def migrated_pg_url(pg_url: str) -> str:
    migrate.upgrade(pg_url)
    return pg_url


@pytest.fixture(scope="module")
def settings(migrated_pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("maskmill")
    return Settings(
        database_url=migrated_pg_url,
        storage_url=str(root / "storage"),
        image_root=str(root / "images"),
        max_body_bytes=1024 * 1024,
        secret_key="test-secret",
        testing=True,
    )


@pytest.fixture(scope="module")
def app(settings: Settings) -> Iterator[Flask]:
    application = create_app(settings)
    yield application
    get_database(application).dispose()


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture()
def db(app: Flask) -> Iterator[Session]:
    with get_database(app).session() as session:
        yield session


@pytest.fixture()
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'maskmill.db'}"
