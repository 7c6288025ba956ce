"""Engine and session handling shared by the web service, the CLI and the workers.

Nothing here connects at import time: :class:`Database` builds a lazy SQLAlchemy engine, and the Flask
integration opens one session per request on first use and closes it at teardown.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

from flask import Flask, current_app, g, has_request_context, request
from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

_EXTENSION_KEY = "maskmill.db"

#: Each process's PostgreSQL pool: this many connections kept, up to POOL_OVERFLOW more in bursts.
POOL_SIZE = 10
POOL_OVERFLOW = 20
#: A pooled connection unused for longer than this is tested before it is handed out.
IDLE_PING_SECONDS = 2.0
#: Execution option of a session that only reads (SQLite: its transactions begin deferred).
READS_ONLY = "maskmill_reads_only"

View = TypeVar("View", bound=Callable)

if TYPE_CHECKING:
    import psycopg


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Create an engine with the per-dialect settings the project relies on."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            echo=echo,
            # The embedded default serves requests from several threads (gunicorn gthread, the
            # in-process job runner); sqlite3 objects are safe to share with this flag off.
            connect_args={"check_same_thread": False, "timeout": 30},
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            # SQLite does not enforce foreign keys unless asked, per connection; WAL lets readers
            # proceed while a writer commits.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
            # Transactions are begun by the hook below, not by the driver (which would begin
            # one only before a write, leaving the reads before it outside the transaction).
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection) -> None:
            # A transaction that may write takes SQLite's one write lock when it begins, waiting
            # for it (busy_timeout) if another connection holds it. One that began deferred,
            # read, and then wrote would have to upgrade a snapshot another connection may have
            # written past meanwhile, which SQLite refuses at once ("database is locked")
            # instead of waiting. Sessions that only read (GET requests, see ``get_session``)
            # begin deferred: in WAL mode they read alongside a writer instead of waiting for it.
            if connection.get_execution_options().get(READS_ONLY):
                connection.exec_driver_sql("BEGIN")
            else:
                connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_engine(url, echo=echo, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)
    _ping_when_idle(engine, IDLE_PING_SECONDS)
    return engine


def connection_budget(processes: int, threads: int) -> int:
    """The most PostgreSQL connections a web tier of ``processes`` x ``threads`` opens: each
    process's whole pool, plus the autocommit connection each of its threads holds for fast
    claims (:meth:`Database.autocommit_connection`)."""
    return processes * (POOL_SIZE + POOL_OVERFLOW + threads)


def check_connection_budget(url: str, processes: int, threads: int) -> str | None:
    """Why PostgreSQL at ``url`` cannot take the web tier's :func:`connection_budget`, or
    ``None`` when it can (or the database is not PostgreSQL).

    Checked when the web server starts (``deploy/gunicorn.conf.py``, ``maskmill serve``): a tier
    sized past ``max_connections`` runs fine until a burst, when requests start failing with
    "too many clients". The server's own reserve for superusers is not available to the service.
    """
    if not url.startswith("postgresql"):
        return None
    # A few seconds at most: an unreachable server must not hold the web server's start.
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            allowed = int(connection.exec_driver_sql("SHOW max_connections").scalar_one())
            reserved = int(
                connection.exec_driver_sql("SHOW superuser_reserved_connections").scalar_one()
            )
    finally:
        engine.dispose()
    needed = connection_budget(processes, threads)
    available = allowed - reserved
    if needed <= available:
        return None
    return (
        f"the web tier may open {needed} PostgreSQL connections ({processes} processes x "
        f"({POOL_SIZE} pooled + {POOL_OVERFLOW} in bursts + {threads} threads' own)), but "
        f"max_connections = {allowed} leaves {available} after the superuser reserve, and the "
        f"job workers need theirs too: raise max_connections, or run fewer processes or threads"
    )


def _ping_when_idle(engine: Engine, idle_seconds: float) -> None:
    """Test a pooled connection before use only when it has sat idle for a while.

    ``pool_pre_ping`` would test every checkout: one extra round trip per request, which on the
    crowd hot path (two requests per HIT cycle, each a few statements) cost more CPU on both ends
    than any statement of the cycle. A connection that was used a moment ago is alive unless the
    server died in that moment, and that case is still handled: the failing statement invalidates
    the pool and the hot path retries once on a fresh connection (``service.api.work``). An idle
    connection is the one a restart, a failover or a firewall is likely to have cut, so it is
    pinged; a dead one raises ``DisconnectionError``, on which the pool discards it and checks
    out another.
    """

    @event.listens_for(engine, "checkin")
    def _mark(_dbapi_connection, record) -> None:
        record.info["maskmill_checkin"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection, record, _proxy) -> None:
        last = record.info.get("maskmill_checkin")
        if last is None or time.monotonic() - last < idle_seconds:
            return  # brand new, or in use a moment ago
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            dbapi_connection.rollback()  # end the transaction the ping began (no-op in autocommit)
        except Exception as exc:
            raise sa_exc.DisconnectionError(f"pooled connection is dead: {exc}") from exc


class Database:
    """An engine plus its session factory."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url, echo=echo)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        #: Sessions for requests that only read (the same pool).
        self.reading_sessionmaker = sessionmaker(
            self.engine.execution_options(**{READS_ONLY: True}), expire_on_commit=False
        )
        self._held = threading.local()
        self._held_lock = threading.Lock()
        self._held_all: list[tuple[int, Any]] = []

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session for scripts and jobs: rolled back on error, always closed; commit explicitly."""
        session = self.sessionmaker()
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def autocommit_connection(self) -> psycopg.Connection:
        """This thread's own psycopg connection in autocommit mode (PostgreSQL only), held for
        as long as the process lives: for the hot path's single-statement requests (the fast
        claim), which need no transaction and so no session.

        A session costs each request a pool checkout and checkin, the switch to autocommit and
        back, and the session's own bookkeeping: per one-statement write, 319 against 107 us of
        Python and 115 against 90 us of PostgreSQL (``scripts/bench_request_overhead.py``,
        ``claim``). The connection is made by the engine (same URL, arguments and connect
        hooks), then detached from its pool; one per thread that asks, and a process that forks
        starts afresh. After an error, :meth:`discard_autocommit_connection` drops it, and the
        next call connects again.
        """
        held = getattr(self._held, "connection", None)
        if held is not None:
            pid, _fairy, connection = held
            if pid == os.getpid() and not connection.closed and not connection.broken:
                return connection
            self._held.connection = None
        fairy = self.engine.raw_connection()
        connection = fairy.driver_connection
        fairy.detach()  # ours from now on: the pool neither reuses nor resets it
        connection.autocommit = True
        # The pool's wrapper is kept alongside: a detached one closes its connection when it is
        # garbage collected.
        self._held.connection = (os.getpid(), fairy, connection)
        with self._held_lock:
            self._held_all.append((os.getpid(), fairy))
        return connection

    def discard_autocommit_connection(self) -> None:
        """Close this thread's held connection (after it failed); the next use reconnects."""
        held = getattr(self._held, "connection", None)
        self._held.connection = None
        if held is not None and held[0] == os.getpid():
            with self._held_lock:
                self._held_all = [entry for entry in self._held_all if entry[1] is not held[1]]
            _close_quietly(held[1])

    def dispose(self) -> None:
        with self._held_lock:
            held, self._held_all = self._held_all, []
        for pid, fairy in held:
            if pid == os.getpid():  # a forked child must not close its parent's sockets
                _close_quietly(fairy)
        self._held = threading.local()
        self.engine.dispose()


def _close_quietly(fairy: Any) -> None:
    with suppress(Exception):  # already gone with the server: nothing else to release
        fairy.close()


def init_app(app: Flask, database: Database) -> None:
    app.extensions[_EXTENSION_KEY] = database

    @app.teardown_appcontext
    def _close_session(exc: BaseException | None) -> None:
        session: Session | None = g.pop("db_session", None)
        if session is not None:
            if exc is not None:
                session.rollback()
            session.close()


def get_database(app: Flask | None = None) -> Database:
    return (app or current_app).extensions[_EXTENSION_KEY]


def writes(view: View) -> View:
    """Mark a GET view that writes (put it right under the route decorator): its session
    begins its transactions as every writer's do. Other GET views get a reading session."""
    view.maskmill_writes = True
    return view


def _reads_only() -> bool:
    if not has_request_context() or request.method not in ("GET", "HEAD"):
        return False
    view = current_app.view_functions.get(request.endpoint or "")
    return not getattr(view, "maskmill_writes", False)


def get_session() -> Session:
    """The request's session, opened on first use."""
    session = g.get("db_session")
    if session is None:
        database = get_database()
        factory = database.reading_sessionmaker if _reads_only() else database.sessionmaker
        session = g.db_session = factory()
    return session
