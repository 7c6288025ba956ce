"""The schema comes only from Alembic: one head, upgrade from empty and back down, on both databases,
and the migrated schema equals the models (no drift)."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from service import migrate
from service.db import make_engine
from service.models import Assignment, Base

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


def test_0005_moves_hit_answers_onto_their_assignments_and_back(empty_url):
    """Existing HIT answers become their assignment's arrays in insertion order (discards with
    their reasons), qualification answers stay rows, and the downgrade restores the rows."""
    migrate.upgrade(empty_url, "0004")
    engine = make_engine(empty_url)
    rows = [  # (assignment, question, value, ms, discard reason), in insertion order
        (1, 30, True, 900, None),
        (1, 10, False, 800, "gold 0/1 correct"),
        (1, 20, True, 700, None),
        (2, 10, True, 600, None),
    ]
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO workers (id, backend, external_id, qualified, "
                "qualification_attempts, gold_correct, gold_total, blocked) "
                "VALUES (1, 'local', 'w1', true, 1, 0, 0, false)"
            )
            conn.exec_driver_sql(
                "INSERT INTO qualification_attempts (id, worker_id, correct, total) "
                "VALUES (1, 1, 1, 1)"
            )
            for aid in (1, 2, 3):
                conn.exec_driver_sql(
                    "INSERT INTO assignments (id, hit_id, worker_id, public_id, status, "
                    "lease_expires_at, gold_correct, gold_total) "
                    f"VALUES ({aid}, {aid}, 1, 'a{aid}', 'claimed', '2030-01-01', 0, 0)"
                )
            for aid, qid, value, ms, reason in rows:
                conn.exec_driver_sql(
                    "INSERT INTO answers (question_id, assignment_id, worker_id, value, ms, "
                    "discarded, discard_reason) VALUES (%s, %s, 1, %s, %s, %s, %s)"
                    if empty_url.startswith("postgresql")
                    else "INSERT INTO answers (question_id, assignment_id, worker_id, value, ms, "
                    "discarded, discard_reason) VALUES (?, ?, 1, ?, ?, ?, ?)",
                    (qid, aid, value, ms, reason is not None, reason),
                )
            conn.exec_driver_sql(
                "INSERT INTO answers (question_id, qualification_attempt_id, worker_id, value, "
                "ms, discarded) VALUES (99, 1, 1, true, 500, false)"
            )
        migrate.upgrade(empty_url, "0005")
        with engine.connect() as conn:
            arrays = conn.execute(
                select(
                    Assignment.id,
                    Assignment.answer_question_ids,
                    Assignment.answer_values,
                    Assignment.answer_ms,
                    Assignment.answer_discard_reasons,
                ).order_by(Assignment.id)
            ).all()
            qualification = conn.exec_driver_sql(
                "SELECT question_id, qualification_attempt_id, value, ms FROM answers"
            ).all()
        assert [tuple(r) for r in arrays] == [
            (
                1,
                [30, 10, 20],
                [True, False, True],
                [900, 800, 700],
                [None, "gold 0/1 correct", None],
            ),
            (2, [10], [True], [600], None),
            (3, None, None, None, None),
        ]
        assert [tuple(r) for r in qualification] == [(99, 1, True, 500)]
        migrate.downgrade(empty_url, "0004")
        with engine.connect() as conn:
            back = conn.exec_driver_sql(
                "SELECT assignment_id, question_id, value, ms, discard_reason FROM answers "
                "WHERE assignment_id IS NOT NULL ORDER BY id"
            ).all()
        assert [(a, q, bool(v), m, r) for a, q, v, m, r in back] == rows
    finally:
        # The rows above break the foreign keys that 0004's downgrade puts back.
        with engine.begin() as conn:
            for table in ("answers", "assignments", "qualification_attempts", "workers"):
                conn.exec_driver_sql(f"DELETE FROM {table}")
        engine.dispose()
        migrate.downgrade(empty_url, "base")
