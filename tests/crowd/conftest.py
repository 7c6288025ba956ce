"""Fixtures shared by the crowd tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask

from service import migrate
from service.app import create_app
from service.db import get_database
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
