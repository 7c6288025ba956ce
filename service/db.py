"""Engine and session handling shared by the web service, the CLI and the workers.

Nothing here connects at import time: :class:`Database` builds a lazy SQLAlchemy engine, and the Flask
integration opens one session per request on first use and closes it at teardown.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from flask import Flask, current_app, g, has_request_context, request
from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

_EXTENSION_KEY = "maskmill.db"

#: A pooled connection unused for longer than this is tested before it is handed out.
IDLE_PING_SECONDS = 2.0
#: Execution option of a session that only reads (SQLite: its transactions begin deferred).
READS_ONLY = "maskmill_reads_only"

View = TypeVar("View", bound=Callable)


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
    engine = create_engine(url, echo=echo, pool_size=10, max_overflow=20)
    _ping_when_idle(engine, IDLE_PING_SECONDS)
    return engine


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

    def dispose(self) -> None:
        self.engine.dispose()


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
