"""The held autocommit connections of :class:`service.db.Database` (the fast claim's)."""

from __future__ import annotations

import threading

import pytest

from service import db as service_db
from service.db import Database


@pytest.fixture
def database(migrated_pg_url):
    database = Database(migrated_pg_url)
    try:
        yield database
    finally:
        database.dispose()


def _backend(connection) -> int:
    return connection.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_one_held_connection_per_thread_in_autocommit(database):
    first = database.autocommit_connection()
    assert database.autocommit_connection() is first
    assert first.autocommit
    # Autocommit: no transaction stays open after a statement.
    first.execute("SELECT 1")
    assert first.info.transaction_status.name == "IDLE"

    other: list = []
    thread = threading.Thread(target=lambda: other.append(database.autocommit_connection()))
    thread.start()
    thread.join()
    assert other[0] is not first and _backend(other[0]) != _backend(first)
    # Not the pool's: the session's connections are others.
    with database.session() as session:
        pooled = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
    assert pooled not in {_backend(first), _backend(other[0])}


def test_a_discarded_or_broken_connection_is_replaced(database):
    first = database.autocommit_connection()
    database.discard_autocommit_connection()
    assert first.closed
    assert database._held_all == []  # forgotten, not only closed (restarts must not pile up)
    second = database.autocommit_connection()
    assert second is not first and not second.closed
    second.close()  # e.g. the server cut it: the next call notices
    third = database.autocommit_connection()
    assert third is not second and _backend(third) > 0


def test_a_forked_process_connects_afresh_and_leaves_the_parents_alone(database, monkeypatch):
    parent = database.autocommit_connection()
    monkeypatch.setattr(service_db.os, "getpid", lambda: -1)  # "after fork"
    child = database.autocommit_connection()
    assert child is not parent
    database.dispose()  # in the "child": closes its own, never the parent's socket
    assert child.closed and not parent.closed
    monkeypatch.undo()
    parent.close()


def test_dispose_closes_every_threads_connection(database):
    connections = [database.autocommit_connection()]
    thread = threading.Thread(target=lambda: connections.append(database.autocommit_connection()))
    thread.start()
    thread.join()
    database.dispose()
    assert all(c.closed for c in connections)
    assert not database.autocommit_connection().closed  # usable again afterwards
