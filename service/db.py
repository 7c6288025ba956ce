"""Engine and session handling shared by the web service, the CLI and the workers.

Nothing here connects at import time: :class:`Database` builds a lazy SQLAlchemy engine, and the Flask
integration opens one session per request on first use and closes it at teardown.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app, g
from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

_EXTENSION_KEY = "maskmill.db"

#: A pooled connection unused for longer than this is tested before it is handed out.
IDLE_PING_SECONDS = 2.0


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
            # Every transaction takes SQLite's one write lock when it begins, waiting for it
            # (busy_timeout) if another connection holds it. A transaction that began deferred,
            # read, and then wrote would have to upgrade a snapshot another connection may have
            # written past meanwhile, which SQLite refuses at once ("database is locked")
            # instead of waiting. The price: a read-only transaction waits for a writer too
            # (WAL would have let it read alongside); the embedded default serves a demo or a
            # laptop, where consistent reads before writes matter more than concurrent reads.
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


def get_session() -> Session:
    """The request's session, opened on first use."""
    session = g.get("db_session")
    if session is None:
        session = get_database().sessionmaker()
        g.db_session = session
    return session
