"""Fixtures shared by the crowd tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from sqlalchemy.orm import Session

from service import migrate
from service.app import create_app
from service.db import get_database, make_engine
from service.settings import Settings


@pytest.fixture(scope="module")
def sqlite_app(tmp_path_factory) -> Iterator[Flask]:
    root = tmp_path_factory.mktemp("crowd-sqlite")
    url = f"sqlite:///{root / 'maskmill.db'}"
    migrate.upgrade(url)
    app = create_app(
        Settings(
            database_url=url,
            storage_url=str(root / "storage"),
            image_root=str(root / "images"),
            secret_key="test",
            testing=True,
        )
    )
    yield app
    get_database(app).dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def session(request, sqlite_url) -> Iterator[Session]:
    """A session on each database in turn (a migrated PostgreSQL of the module, a fresh SQLite
    file), rolled back afterwards: for round trips of what the two store differently (arrays
    are JSON lists on SQLite)."""
    url = sqlite_url if request.param == "sqlite" else request.getfixturevalue("migrated_pg_url")
    if request.param == "sqlite":
        migrate.upgrade(url)
    engine = make_engine(url)
    with Session(engine) as session:
        yield session
        session.rollback()
    engine.dispose()
