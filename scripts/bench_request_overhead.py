"""What the per-request machinery costs, measured one piece at a time (CPU, not wall time).

    python scripts/bench_request_overhead.py --json

The crowd hot path's choices that these figures back (issue 4):

* ``flask``: an empty route through the app's WSGI callable, with Flask's default cookie session
  interface and with :class:`service.app.NoCookieSessions` (what the app uses);
* ``claim``: one autocommitted write through a SQLAlchemy session switched to autocommit (what
  the fast claim did until session 6), on the thread's held autocommit connection
  (:meth:`service.db.Database.autocommit_connection`, what it does now), and as BEGIN + the
  write + COMMIT sent in one psycopg pipeline;
* ``read``: BEGIN + one read: pipelined (one round trip) against plain (two);
* ``set_local``: the cost of ``SET LOCAL plan_cache_mode`` in front of a statement;
* ``submit``: a transaction shaped like the fast submission's (lock a row, insert, update,
  commit, statements sent to the driver) in a request session under ``in_transaction`` (what the
  hot lane did until session 9), on a connection checked out of the pool under
  ``in_transaction`` (what it does now), and on a driver connection held outright.

Python CPU is this process's; PostgreSQL CPU is its backend's, from ``/proc`` (Linux). Each
figure is the median over ``--rounds`` rounds of ``--calls`` calls, the variants interleaved.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_service import tree_cpu  # noqa: E402


def _process_cpu(pid: int) -> float:
    return tree_cpu({"backend": pid})["backend"]


def _interleaved(
    variants: dict[str, Callable[[], None]],
    rounds: int,
    calls: int,
    backend: int | dict[str, int] | None,
) -> dict[str, dict[str, float]]:
    """Median microseconds per call of each variant: Python CPU, and the backend's if given
    (one backend process for all variants, or one per variant)."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    backends = backend if isinstance(backend, dict) else dict.fromkeys(variants, backend)
    for _ in range(rounds):
        for name, call in variants.items():
            backend = backends[name]
            for _ in range(calls // 10):  # warm: prepared statements, caches
                call()
            pg0 = _process_cpu(backend) if backend else 0.0
            py0 = time.process_time()
            for _ in range(calls):
                call()
            py = (time.process_time() - py0) / calls * 1e6
            pg = ((_process_cpu(backend) - pg0) / calls * 1e6) if backend else 0.0
            samples[name].append((py, pg))
    out = {}
    for name, values in samples.items():
        out[name] = {"python_us": round(statistics.median(v[0] for v in values), 1)}
        if backend:
            out[name]["postgres_us"] = round(statistics.median(v[1] for v in values), 1)
    return out


def flask_overhead(rounds: int, calls: int) -> dict[str, dict[str, float]]:
    from flask import Response
    from flask.sessions import SecureCookieSessionInterface
    from werkzeug.test import EnvironBuilder

    from service.app import NoCookieSessions, create_app

    workdir = Path(tempfile.mkdtemp(prefix="maskmill-overhead-"))
    apps = {}
    for name, interface in (("cookie_sessions", SecureCookieSessionInterface()),
                            ("no_cookie_sessions", NoCookieSessions())):  # fmt: skip
        app = create_app(
            {
                "database_url": f"sqlite:///{workdir / 'x.db'}",
                "storage_url": str(workdir / "storage"),
                "secret_key": "bench",
            }
        )
        app.session_interface = interface
        app.add_url_rule("/empty", "empty", lambda: Response("{}"), methods=["POST"])
        apps[name] = app
    environ = EnvironBuilder(path="/empty", method="POST", data=b"{}").get_environ()

    def call(app) -> Callable[[], None]:
        def run() -> None:
            env = dict(environ, **{"wsgi.input": io.BytesIO(b"{}")})
            body = app.wsgi_app(env, lambda status, headers, exc_info=None: None)
            b"".join(body)
            body.close()

        return run

    return _interleaved({k: call(a) for k, a in apps.items()}, rounds, calls, None)


def database_overhead(rounds: int, calls: int) -> dict[str, dict[str, dict[str, float]]]:
    import psycopg

    from service.db import Database
    from service.devservers import PostgresServer

    server = PostgresServer().start()
    try:
        url = server.create_database("overhead")
        database = Database(url)
        with database.engine.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE t (id serial PRIMARY KEY, v integer)")
            conn.exec_driver_sql("INSERT INTO t (v) VALUES (0)")  # the row ``submit`` locks
            conn.commit()
        write = "INSERT INTO t (v) VALUES (1) RETURNING id"
        read = "SELECT count(*) FROM t WHERE id < 100"
        # The held connection first: it is detached from the pool, so the session's pooled
        # connection, whose backend is measured below, is another one.
        held = database.autocommit_connection()
        backend_held = held.execute("SELECT pg_backend_pid()").fetchone()[0]
        with database.session() as session:
            backend = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
            session.commit()

        def autocommit() -> None:
            with database.session() as session:
                options = {"isolation_level": "AUTOCOMMIT"}
                conn = session.connection(execution_options=options).connection.driver_connection
                conn.execute(write, prepare=True, binary=True).fetchone()

        def held_autocommit() -> None:
            # What the fast claim does: the thread's own autocommit connection, no session.
            database.autocommit_connection().execute(write, prepare=True, binary=True).fetchone()

        def pipelined_commit() -> None:
            with database.session() as session:
                conn = session.connection().connection.driver_connection
                with conn.pipeline():
                    cursor = conn.execute(write, prepare=True, binary=True)
                    conn.commit()
                cursor.fetchone()

        # One connection for the rest, so the backend measured is the one doing the work.
        conn = psycopg.connect(server.dsn("overhead"))
        backend_raw = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.commit()

        def read_pipelined() -> None:
            with conn.pipeline():
                cursor = conn.execute(read, prepare=True, binary=True)
            cursor.fetchone()
            conn.commit()

        def read_plain() -> None:
            conn.execute(read, prepare=True, binary=True).fetchone()
            conn.commit()

        def with_set_local() -> None:
            conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            conn.execute(write, prepare=True, binary=True).fetchone()
            conn.commit()

        def without_set_local() -> None:
            conn.execute(write, prepare=True, binary=True).fetchone()
            conn.commit()

        claim = _interleaved(
            {
                "autocommit": autocommit,
                "held_autocommit": held_autocommit,
                "pipelined_commit": pipelined_commit,
            },
            rounds,
            calls,
            {"autocommit": backend, "held_autocommit": backend_held, "pipelined_commit": backend},
        )
        rest = _interleaved(
            {
                "read_pipelined": read_pipelined,
                "read_plain": read_plain,
                "with_set_local": with_set_local,
                "without_set_local": without_set_local,
            },
            rounds,
            calls,
            backend_raw,
        )
        submit = _submit_shaped(database, conn, rounds, calls, backend, backend_raw)
        conn.close()
        database.dispose()
    finally:
        server.stop()
    return {
        "claim": claim,
        "read": {k: rest[k] for k in ("read_pipelined", "read_plain")},
        "set_local": {k: rest[k] for k in ("with_set_local", "without_set_local")},
        "submit": submit,
    }


def _submit_shaped(
    database: Any, held: Any, rounds: int, calls: int, pooled_backend: int, held_backend: int
) -> dict[str, dict[str, float]]:
    """The ``submit`` figures: one transaction shaped like the fast submission's, three ways."""
    from service.api.work import in_transaction
    from service.crowd.fastpath import _transaction_connection  # the lane's own begin
    from service.crowd.hits import driver_connection

    statements = (
        "SELECT id FROM t WHERE id = 1 FOR UPDATE",
        "INSERT INTO t (v) VALUES (1) RETURNING id",
        "UPDATE t SET v = v + 1 WHERE id = 1",
    )

    def work(conn: Any) -> None:
        for statement in statements:
            conn.execute(statement, prepare=True, binary=True)
        conn.commit()

    def session() -> None:
        with database.session() as owner:
            in_transaction(lambda s: work(driver_connection(s)), owner)

    def pool_connection() -> None:
        with database.engine.connect() as owner:
            in_transaction(
                lambda c: work(_transaction_connection(c).connection.driver_connection), owner
            )

    def held_driver() -> None:
        work(held)

    return _interleaved(
        {"session": session, "pool_connection": pool_connection, "held_driver": held_driver},
        rounds,
        calls,
        {"session": pooled_backend, "pool_connection": pooled_backend, "held_driver": held_backend},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 10:
        raise SystemExit("--rounds must be >= 1 and --calls >= 10")
    report = {
        "flask": flask_overhead(args.rounds, args.calls),
        **database_overhead(args.rounds, args.calls),
        "config": {"rounds": args.rounds, "calls": args.calls},
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for part, variants in report.items():
            if part != "config":
                print(part, variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
