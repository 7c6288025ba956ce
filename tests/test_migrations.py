"""The schema comes only from Alembic: one head, upgrade from empty and back down, on both databases,
and the migrated schema equals the models (no drift)."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service import migrate
from service.db import make_engine
from service.models import Base

EXPECTED_TABLES = {
    "api_keys",
    "projects",
    "project_classes",
    "images",
    "ground_truth_masks",
    "rounds",
    "trees",
    "clusters",
    "workers",
    "gold_items",
    "campaigns",
    "hits",
    "assignments",
    "qualification_attempts",
    "questions",
    "answers",
    "ledger_entries",
    "jobs",
}


def test_single_head():
    assert len(migrate.heads()) == 1


@pytest.fixture(params=["postgres", "sqlite"])
def empty_url(request, sqlite_url):
    if request.param == "sqlite":
        return sqlite_url
    return request.getfixturevalue("pg_url")


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_from_empty_then_downgrade(empty_url):
    assert _tables(empty_url) == set()
    migrate.upgrade(empty_url)
    assert _tables(empty_url) == EXPECTED_TABLES
    assert migrate.current(empty_url) == migrate.heads()[0]
    migrate.upgrade(empty_url)  # idempotent
    migrate.downgrade(empty_url, "base")
    assert _tables(empty_url) == set()
    assert migrate.current(empty_url) is None
    migrate.upgrade(empty_url)  # and up again after a full downgrade
    assert _tables(empty_url) == EXPECTED_TABLES
    migrate.downgrade(empty_url, "base")


def test_models_match_migrations(pg_url):
    migrate.upgrade(pg_url)
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
        migrate.downgrade(pg_url, "base")
    assert diff == [], f"models and migrations disagree: {diff}"


def test_storage_parameters_match_the_models(pg_url):
    """``compare_metadata`` does not look at storage parameters: the migrated tables' fillfactor
    must still be what the models declare (the hot path's HOT updates depend on it), and going
    down a revision must restore the old one."""
    declared = {
        table.name: table.dialect_options["postgresql"]["with"]
        for table in Base.metadata.sorted_tables
        if table.dialect_options["postgresql"]["with"]
    }
    assert declared == {"questions": {"fillfactor": 45}}

    def reloptions() -> dict[str, list[str] | None]:
        engine = make_engine(pg_url)
        try:
            with engine.connect() as conn:
                rows = conn.exec_driver_sql(
                    "SELECT relname, reloptions FROM pg_class WHERE relname = ANY(%(names)s)",
                    {"names": list(declared)},
                ).all()
        finally:
            engine.dispose()
        return dict(rows)

    try:
        migrate.upgrade(pg_url)
        assert reloptions() == {"questions": ["fillfactor=45"]}
        migrate.downgrade(pg_url, "0002")
        assert reloptions() == {"questions": ["fillfactor=80"]}
    finally:
        migrate.downgrade(pg_url, "base")
