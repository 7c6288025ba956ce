"""On SQLite (the embedded default), a worker request that finds another connection writing --
the in-process job runner, another request thread -- waits (and, past the busy timeout, retries)
instead of failing with "database is locked"."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from sqlalchemy.exc import OperationalError

from service.api.work import _retryable
from service.db import get_database
from tests.crowd.world import campaign_world, do_hit


def test_sqlite_lock_errors_are_retryable_and_others_are_not():
    locked = OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
    broken = OperationalError("INSERT", {}, sqlite3.OperationalError("no such table: hits"))
    assert _retryable(locked)
    assert not _retryable(broken)


def test_a_claim_waits_out_another_writer(sqlite_app):
    path = get_database(sqlite_app).url.removeprefix("sqlite:///")
    client = sqlite_app.test_client()
    with get_database(sqlite_app).session() as db:
        world, _, worker = campaign_world(client, db, "locked", "GBGB", gold=(True, False))

        holding = threading.Event()

        def writer() -> None:
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # the write lock, as a job runner's commit holds
            holding.set()
            time.sleep(0.15)
            other.execute("COMMIT")
            other.close()

        thread = threading.Thread(target=writer)
        thread.start()
        assert holding.wait(5)
        # The request's transaction waits for the other connection's write lock (it begins
        # IMMEDIATE), then reads and writes.
        assert do_hit(client, db, world, worker["token"]) is not None
        thread.join(5)


def test_the_message_sqlite_uses_is_the_one_matched(tmp_path):
    # Guard against the matched text drifting from what sqlite3 actually raises.
    path = tmp_path / "lock.db"
    first = sqlite3.connect(path, isolation_level=None, timeout=0)
    second = sqlite3.connect(path, isolation_level=None, timeout=0)
    first.execute("CREATE TABLE t (x)")
    first.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        second.execute("BEGIN IMMEDIATE")
    first.execute("ROLLBACK")
