"""The floor under the crowd hot path: what a HIT cycle costs this machine's stack before maskmill
does any of its own work.

    python scripts/bench_floor.py --json
    python scripts/bench_floor.py --json --repeat 3 --storage both

Why: ``scripts/bench_service.py`` measures the service's CPU per HIT cycle, and issue 4's target
(300 cycles/s on 2 cores) allows at most 2 cores / 300 = 6.7 ms of it, the load generator
included. This measures how much of that budget the stack alone takes -- gunicorn, psycopg,
PostgreSQL on loopback and the benchmark's own load process -- doing the least a cycle must do,
so the remainder says what maskmill's own work (building HITs, quality control, counting,
decisions, money) may cost.

The floor is a raw WSGI app in this file (no Flask, SQLAlchemy or pydantic), served by gunicorn in
the benchmark's default shape (``sync`` workers, cores + 1, started as ``bench_service.py`` starts
the service) and driven by the same load process (``bench_service.run_load``: 16 virtual workers
by default, each reconnecting after every response, as sync workers close the connection) on the
same kind of throwaway PostgreSQL. A cycle is:

* **claim**: one autocommitted statement takes the oldest open HIT (``FOR UPDATE SKIP LOCKED``)
  and returns its stored payload: 50 + 5 questions in the service's own format and size
  (:func:`service.crowd.hits.encode_payload`, random public ids);
* **submit**: the JSON answers are parsed, stored and their HIT closed in one transaction.

``--storage rows`` stores one row per answer, keyed by (HIT, question), as the service stored
answers until migration 0005 (with an id and two more indexes); ``arrays`` stores a submission as
one row of arrays (the service appends them to the assignment row, which it updates anyway).
Both are idempotent (``ON CONFLICT DO NOTHING``). Left out, deliberately: building HITs, gold,
quality control, cluster counts, decisions, money and the worker's token. After each run every
acknowledged answer is counted back from the database, and no question may have been served twice.

``--service`` also runs ``scripts/bench_service.py`` (same duration, load and gunicorn shape) next
to each repeat's floor runs, alternating which goes first, and reports the service over the floor
per pair: this machine's speed drifts by tens of percent within minutes and moves both alike, so
the ratio, and the service's CPU per cycle above the floor's (maskmill's own work), compare
sessions better than either figure alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Only the standard library and psycopg at module level: gunicorn imports this file as the app,
# and the floor must not carry the service's imports.
import psycopg

REPO = Path(__file__).resolve().parents[1]

QUESTIONS_PER_HIT = 55
STORAGES = ("rows", "arrays")
#: HITs seeded per second of load: above any rate this stack reaches on a small machine, so a run
#: never runs out of work (a run that does is refused, its rate would be the seed's, not the stack's).
#: 900 was not: on a day this machine ran twice as fast, the floor made 934.5 cycles/s (session 12)
#: and a short run of the test suite ran out.
HITS_PER_SECOND = 2000

# ---------------------------------------------------------------------------------- the app

_CLAIM = """
UPDATE floor_hits SET status = 'assigned'
WHERE id = (SELECT id FROM floor_hits WHERE status = 'open' ORDER BY id LIMIT 1
            FOR UPDATE SKIP LOCKED)
RETURNING id, payload
"""
_STORE = {
    "rows": """
INSERT INTO floor_answers (hit_id, question_id, value, ms)
SELECT %(hit)s::integer, q, v, m
FROM unnest(string_to_array(%(qids)s, ','), string_to_array(%(vals)s, ',')::boolean[],
            string_to_array(%(ms)s, ',')::integer[]) AS t(q, v, m)
ON CONFLICT DO NOTHING
""",
    "arrays": """
INSERT INTO floor_answer_sets (hit_id, question_ids, vals, ms)
VALUES (%(hit)s::integer, string_to_array(%(qids)s, ','), string_to_array(%(vals)s, ',')::boolean[],
        string_to_array(%(ms)s, ',')::integer[])
ON CONFLICT DO NOTHING
""",
}
_CLOSE = "UPDATE floor_hits SET status = 'done' WHERE id = %(hit)s::integer"

_THREAD = threading.local()


def _connections() -> tuple[psycopg.Connection, psycopg.Connection]:
    """This thread's autocommit connection (claims) and transaction connection (submissions),
    opened on first use and kept: the service holds its connections the same way."""
    held = getattr(_THREAD, "connections", None)
    if held is None:
        dsn = os.environ["BENCH_FLOOR_DSN"]
        held = _THREAD.connections = (psycopg.connect(dsn, autocommit=True), psycopg.connect(dsn))
    return held


def _respond(start_response: Any, status: str, body: bytes) -> list[bytes]:
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The floor's WSGI callable (``gunicorn bench_floor:app``)."""
    path = environ.get("PATH_INFO", "")
    method = environ.get("REQUEST_METHOD", "GET")
    if method == "POST" and path == "/api/v1/work/assignments":
        return _claim(start_response)
    if (
        method == "POST"
        and path.startswith("/api/v1/work/assignments/")
        and path.endswith("/answers")
    ):
        return _submit(environ, start_response, path)
    if path == "/healthz":
        return _respond(start_response, "200 OK", b'{"status":"ok"}')
    return _respond(start_response, "404 NOT FOUND", b'{"error":{"code":"not_found"}}')


def _claim(start_response: Any) -> list[bytes]:
    claims, _ = _connections()
    row = claims.execute(_CLAIM, prepare=True).fetchone()
    if row is None:
        body = b'{"error":{"code":"no_work","message":"no open HIT"}}'
        return _respond(start_response, "409 CONFLICT", body)
    body = b'{"assignment_id":"%d","questions":%s}' % (row[0], row[1].encode())
    return _respond(start_response, "200 OK", body)


def _submit(environ: dict[str, Any], start_response: Any, path: str) -> list[bytes]:
    try:
        hit = int(path.split("/")[-2])
        size = int(environ.get("CONTENT_LENGTH") or 0)
        answers = json.loads(environ["wsgi.input"].read(size))["answers"]
        params = {
            "hit": hit,
            "qids": ",".join(str(a["question_id"]) for a in answers),
            "vals": ",".join("t" if a["value"] else "f" for a in answers),
            "ms": ",".join(str(int(a["ms"])) for a in answers),
        }
    except (ValueError, KeyError, TypeError) as exc:
        message = json.dumps({"error": {"code": "bad_request", "message": str(exc)}})
        return _respond(start_response, "400 BAD REQUEST", message.encode())
    _, writes = _connections()
    writes.execute(_STORE[os.environ.get("BENCH_FLOOR_STORAGE", "rows")], params, prepare=True)
    writes.execute(_CLOSE, params, prepare=True)
    writes.commit()
    return _respond(start_response, "200 OK", b'{"accepted":%d,"duplicates":0}' % len(answers))


# ------------------------------------------------------------------------------- the runner

_SCHEMA = (
    "CREATE TABLE floor_hits (id serial PRIMARY KEY, status varchar(16) NOT NULL,"
    " payload text NOT NULL)",
    "CREATE INDEX ON floor_hits (id) WHERE status = 'open'",
    "CREATE TABLE floor_answers (hit_id integer NOT NULL, question_id text NOT NULL,"
    " value boolean NOT NULL, ms integer NOT NULL, PRIMARY KEY (hit_id, question_id))",
    "CREATE TABLE floor_answer_sets (hit_id integer PRIMARY KEY, question_ids text[] NOT NULL,"
    " vals boolean[] NOT NULL, ms integer[] NOT NULL)",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    parser.add_argument("--virtual-workers", type=int, default=16)
    parser.add_argument("--gunicorn-workers", type=int, help="default: cores + 1 (sync)")
    parser.add_argument(
        "--storage",
        choices=(*STORAGES, "both"),
        default="both",
        help="answers as one row each, as one row of arrays per submission, or both (alternating)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per storage")
    parser.add_argument(
        "--service",
        action="store_true",
        help="also run bench_service.py in each repeat and report the service over the floor",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    for name in ("duration", "warmup"):
        if getattr(args, name) < 0 or (name == "duration" and args.duration == 0):
            parser.error(f"--{name} must be positive")
    for name in ("virtual_workers", "gunicorn_workers", "repeat"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.gunicorn_workers = args.gunicorn_workers or (os.cpu_count() or 1) + 1
    args.storages = STORAGES if args.storage == "both" else (args.storage,)
    return args


def seed_hits(dsn: str, count: int) -> None:
    """The floor's tables and ``count`` open HITs, each with its own 55 random public ids."""
    from service.crowd.hits import encode_payload, new_public_ids

    names = ["person"] * (QUESTIONS_PER_HIT - 5) + ["car"] * 5
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in _SCHEMA:
            conn.execute(statement)
        with conn.cursor().copy("COPY floor_hits (status, payload) FROM STDIN") as copy:
            for _ in range(count):
                ids = new_public_ids(QUESTIONS_PER_HIT)
                copy.write_row(("open", encode_payload(list(zip(ids, names, strict=True)))))
        conn.execute("ANALYZE floor_hits")


def stored_answers(dsn: str, storage: str) -> int:
    query = {
        "rows": "SELECT count(*) FROM floor_answers",
        "arrays": "SELECT coalesce(sum(cardinality(vals)), 0) FROM floor_answer_sets",
    }[storage]
    with psycopg.connect(dsn) as conn:
        return int(conn.execute(query).fetchone()[0])


def start_floor(dsn: str, storage: str, workdir: Path, workers: int) -> tuple[Any, int]:
    """gunicorn serving :func:`app` in the benchmark's shape; returns the process and its port."""
    from bench_service import launch_gunicorn

    from service.devservers import free_port

    port = free_port()
    env = dict(os.environ, BENCH_FLOOR_DSN=dsn, BENCH_FLOOR_STORAGE=storage)
    args = [
        "--workers", str(workers),
        "--worker-class", "sync",
        "--bind", f"127.0.0.1:{port}",
        "--log-level", "warning",
        "--control-socket", str(workdir / "gunicorn.ctl"),
        "--chdir", str(REPO / "scripts"),
        "bench_floor:app",
    ]  # fmt: skip
    return launch_gunicorn(args, port, workdir, env, timeout=30), port


def run_once(server: Any, dbname: str, storage: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run on a fresh database: seed, serve, load, measure, count the answers back."""
    from bench_service import load_and_measure, scratch_dir, summarize

    from service.devservers import stop_process_group

    server.create_database(dbname)
    dsn = server.dsn(dbname)
    try:
        seed_hits(dsn, int((args.warmup + args.duration + 2) * HITS_PER_SECOND))
        with scratch_dir("maskmill-floor-", "the floor benchmark") as workdir:
            process, port = start_floor(dsn, storage, workdir, args.gunicorn_workers)
            try:
                start = time.monotonic() + args.warmup
                window = (start, start + args.duration)
                load, cpu, machine = load_and_measure(
                    port,
                    ["floor"] * args.virtual_workers,
                    window,
                    {"postgres": server.process.pid, "gunicorn": process.pid},
                )
            finally:
                stop_process_group(process)
        acknowledged = sum(cycle[3] for cycle in load.cycles)
        stored = stored_answers(dsn, storage)
    finally:
        server.drop_database(dbname)
    summary = summarize(load, window, cpu, machine)
    problems = load.errors[:5] + (
        [f"... {len(load.errors) - 5} more"] if len(load.errors) > 5 else []
    )
    if load.no_work:
        problems.append(f"ran out of HITs ({load.no_work} claims found none)")
    if load.served_twice:
        problems.append(f"{load.served_twice} questions served twice")
    if stored != acknowledged:
        problems.append(f"{acknowledged} answers acknowledged, {stored} stored")
    if not summary["cycles"]:
        problems.append("no HIT cycle completed in the measured window")
    return {**summary, "storage": storage, "answers_stored": stored, "problems": problems}


#: The rate issue 4 asks of the service; the budget per cycle is the machine's cores over it.
TARGET_CYCLES_PER_S = 300
_PARTS = ("postgres", "gunicorn", "load", "total")


def run_service(args: argparse.Namespace) -> dict[str, Any]:
    """One ``bench_service.py`` run in the floor's shape; its JSON report, with ``problems``."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_service.py"),
            "--json",
            "--duration",
            str(args.duration),
            "--warmup",
            str(args.warmup),
            "--virtual-workers",
            str(args.virtual_workers),
            "--gunicorn-workers",
            str(args.gunicorn_workers),
            "--pgbench-seconds",
            "1",
            "--pgbench-clients",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench_service.py failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout)
    problems = list(report["errors"])
    if (
        report["duplicates"]["questions_served_twice"]
        or report["duplicates"]["answers_counted_twice"]
    ):
        problems.append(f"duplicates: {report['duplicates']}")
    return {**report, "problems": problems}


def against_service(
    floors: list[dict[str, Any]], services: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """The service against the floor with answers as rows (as the service stores them), pair by
    pair (one pair per repeat), then the median of each pair's figure."""
    rows = [run for run in floors if run["storage"] == args.storages[0]]
    pairs = list(zip(rows, services, strict=True))
    cycles = [s["hit_cycles_per_s"] / f["cycles_per_s"] for f, s in pairs]
    ratio = {
        part: [s["cpu_ms_per_cycle"][part] / f["cpu_ms_per_cycle"][part] for f, s in pairs]
        for part in _PARTS
    }
    above = {
        part: [s["cpu_ms_per_cycle"][part] - f["cpu_ms_per_cycle"][part] for f, s in pairs]
        for part in _PARTS
    }
    budget = (os.cpu_count() or 1) * 1000 / TARGET_CYCLES_PER_S
    floor_total = statistics.median(f["cpu_ms_per_cycle"]["total"] for f, _ in pairs)
    return {
        "service": _medians(services, "hit_cycles_per_s"),
        "service_over_floor": {
            "floor_storage": args.storages[0],
            "hit_cycles_per_s": round(statistics.median(cycles), 3),
            "cpu_ms_per_cycle": {p: round(statistics.median(v), 3) for p, v in ratio.items()},
            "pairs": [round(c, 3) for c in cycles],
        },
        # The service's CPU per cycle above the floor's: what maskmill's own work costs.
        "maskmill_ms_per_cycle": {p: round(statistics.median(v), 2) for p, v in above.items()},
        "budget": {
            "target_cycles_per_s": TARGET_CYCLES_PER_S,
            "ms_per_cycle": round(budget, 2),
            "floor_ms_per_cycle": round(floor_total, 2),
            "left_for_maskmill_ms": round(budget - floor_total, 2),
        },
    }


def _medians(runs: list[dict[str, Any]], rate: str) -> dict[str, Any]:
    """Medians of the figures both reports carry (floor runs name their rate ``cycles_per_s``,
    ``bench_service.py`` ``hit_cycles_per_s``)."""
    return {
        "runs": len(runs),
        "hit_cycles_per_s": _median(runs, rate),
        "p99_request_ms": _median(runs, "latency_ms", "request", "p99"),
        "cpu_ms_per_cycle": {part: _median(runs, "cpu_ms_per_cycle", part) for part in _PARTS},
    }


def _median(runs: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key]
        if value is not None:
            values.append(value)
    return round(statistics.median(values), 2) if values else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "scripts")]
    from service.devservers import PostgresServer

    server = PostgresServer().start()
    runs: list[dict[str, Any]] = []
    services: list[dict[str, Any]] = []
    try:
        for repeat in range(args.repeat):
            # Odd repeats run the service first, so neither side always gets the later minutes.
            if args.service and repeat % 2:
                services.append(run_service(args))
            for storage in args.storages:
                runs.append(run_once(server, f"floor_{repeat}_{storage}", storage, args))
            if args.service and not repeat % 2:
                services.append(run_service(args))
    finally:
        server.stop()
    by_storage = {
        storage: {
            **_medians(mine, "cycles_per_s"),
            "cpu_bound_cycles_per_s": _median(mine, "cpu_bound_cycles_per_s"),
        }
        for storage in args.storages
        if (mine := [run for run in runs if run["storage"] == storage])
    }
    report = {
        "benchmark": "the stack's floor per HIT cycle (claim 55 questions, submit 55 answers)",
        "medians": by_storage,
        **(against_service(runs, services, args) if args.service else {}),
        "runs": runs,
        "config": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "virtual_workers": args.virtual_workers,
            "gunicorn": f"{args.gunicorn_workers} workers x 1 thread (sync)",
            "repeat": args.repeat,
            "cpus": os.cpu_count(),
        },
    }
    failed = [problem for run in runs for problem in run["problems"]]
    failed += [f"bench_service: {problem}" for run in services for problem in run["problems"]]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for storage, medians in by_storage.items():
            cpu = medians["cpu_ms_per_cycle"]
            print(
                f"{storage}: {medians['hit_cycles_per_s']} HIT cycles/s, p99 "
                f"{medians['p99_request_ms']} ms; CPU per cycle {cpu['total']} ms "
                f"(PostgreSQL {cpu['postgres']}, gunicorn {cpu['gunicorn']}, load {cpu['load']})"
            )
        if args.service:
            over = report["service_over_floor"]
            print(
                f"service: {report['service']['hit_cycles_per_s']} HIT cycles/s; over the floor "
                f"{over['hit_cycles_per_s']}x cycles/s, {over['cpu_ms_per_cycle']['total']}x CPU "
                f"per cycle; maskmill's own work {report['maskmill_ms_per_cycle']['total']} ms per "
                f"cycle, {report['budget']['left_for_maskmill_ms']} ms left for it at the target"
            )
    for problem in failed:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
