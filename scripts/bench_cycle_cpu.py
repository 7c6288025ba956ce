"""CPU per HIT cycle, one worker at a time, in process: what a change of schema or code costs
PostgreSQL and Python without the noise of a loaded server.

    python scripts/bench_cycle_cpu.py --json
    python scripts/bench_cycle_cpu.py --json --variant "as migrated=" \\
        --variant "fillfactor 50=ALTER TABLE clusters SET (fillfactor = 50)"

A cycle is the crowd hot path of issue 4: claim a HIT (50 samples + 5 hidden gold) and submit its
55 answers, both through the service's Flask app (its test client, so no HTTP server and no
concurrency), on a throwaway PostgreSQL with the real schema, the project seeded as
``scripts/bench_service.py`` seeds it and HITs built on demand as in the service. Python CPU is
this process's (the test client's own work included, so compare it between variants, not with a
deployment); PostgreSQL CPU is the server's, from ``/proc``.

Each ``--variant NAME=SQL`` runs its SQL (``;``-separated, may be empty) after the migrations and
before the seeding, on a fresh database; variants alternate, ``--repeat`` times each, so a drift
of the machine's speed hits them alike. Reported per variant: medians over all rounds, and the
share of each hot table's updates that PostgreSQL made in place (HOT, no index entries), and
PostgreSQL's CPU as a multiple of Python's per round: when the variants differ in schema only,
Python does the same work in each, so the ratio compares them across the machine's drift.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_service import seed_project, tree_cpu  # noqa: E402

HOT_TABLES = ("hits", "assignments", "clusters", "workers", "campaigns")
CLUSTERS = 20_000
QUESTIONS_PER_HIT = 50
GOLD_PER_HIT = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=60, help="HIT cycles per measured round")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per run")
    parser.add_argument("--warmup", type=int, default=40, help="cycles before measuring")
    parser.add_argument("--repeat", type=int, default=2, help="runs per variant (alternating)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=SQL",
        help="a named schema variant (SQL run before seeding; empty SQL: as migrated)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    variants = []
    for spec in args.variant or ["as migrated="]:
        name, sep, sql = spec.partition("=")
        if not sep or not name.strip():
            parser.error(f"--variant must be NAME=SQL, got {spec!r}")
        variants.append((name.strip(), [s.strip() for s in sql.split(";") if s.strip()]))
    if len({name for name, _ in variants}) != len(variants):
        parser.error("variant names must differ")
    for flag in ("cycles", "rounds", "repeat"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    args.variants = variants
    return args


def run_variant(server: Any, dbname: str, ddl: list[str], args: argparse.Namespace) -> dict:
    """One fresh database: migrate, run ``ddl``, seed, then measure ``args.rounds`` rounds."""
    import psycopg
    from sqlalchemy import create_engine, text

    from service import migrate
    from service.app import create_app
    from service.db import get_database
    from service.settings import Settings

    url = server.create_database(dbname)
    try:
        migrate.upgrade(url)
        if ddl:
            with psycopg.connect(server.dsn(dbname), autocommit=True) as conn:
                for statement in ddl:
                    try:
                        conn.execute(statement)
                    except psycopg.Error as exc:
                        raise SystemExit(f"variant SQL {statement!r} failed: {exc}") from None
        seeded = seed_project(url, CLUSTERS)
        with tempfile.TemporaryDirectory(prefix="maskmill-cycle-cpu-") as storage:
            settings = Settings.from_env(
                {}, database_url=url, storage_url=f"file://{storage}", testing=True
            )
            app = create_app(settings)
            client = app.test_client()
            token = _campaign_and_worker(client, seeded)
            engine = create_engine(url)
            with engine.begin() as conn:
                conn.execute(text("UPDATE workers SET qualified = true, qualified_at = now()"))
            engine.dispose()
            for _ in range(args.warmup):
                _cycle(client, token)
            rounds = []
            for _ in range(args.rounds):
                pg_before = tree_cpu({"pg": server.process.pid})["pg"]
                py_before = time.process_time()
                for _ in range(args.cycles):
                    _cycle(client, token)
                python_ms = (time.process_time() - py_before) / args.cycles * 1000
                pg_ms = (tree_cpu({"pg": server.process.pid})["pg"] - pg_before) / args.cycles
                rounds.append((python_ms, pg_ms * 1000))
            get_database(app).dispose()
        with psycopg.connect(server.dsn(dbname), autocommit=True) as conn:
            _wait_for_other_backends(conn)
            hot = {
                name: (round(hot_updates / updates, 3) if updates else None)
                for name, updates, hot_updates in conn.execute(
                    "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                    " WHERE relname = ANY(%s)",
                    [list(HOT_TABLES)],
                )
            }
        return {"rounds": rounds, "hot_update_share": hot}
    finally:
        server.drop_database(dbname)


def _wait_for_other_backends(conn: Any, timeout: float = 10.0) -> None:
    """Wait until this connection is the database's only backend. PostgreSQL's table statistics
    are flushed by each backend at most once a second, and at the latest as it exits, which
    happens after its client has closed the connection: read before that, a short run's updates
    may not be counted yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        others = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]
        if not others:
            return
        time.sleep(0.05)
    raise RuntimeError(
        f"the app's connections to the benchmark database did not close in {timeout} s"
    )


def _campaign_and_worker(client: Any, seeded: Any) -> str:
    auth = {"Authorization": f"Bearer {seeded.api_key}"}
    response = client.post(
        f"/api/v1/projects/{seeded.project_id}/campaigns",
        json={
            "budget_usd": 1_000_000,
            "backend": "local",
            "reward_per_hit_usd": 0.05,
            "questions_per_hit": QUESTIONS_PER_HIT,
            "gold_per_hit": GOLD_PER_HIT,
        },
        headers=auth,
    )
    if response.status_code != 201:
        raise RuntimeError(f"creating the campaign failed: {response.status_code} {response.json}")
    invite = client.post(f"/api/v1/projects/{seeded.project_id}/workers", json={}, headers=auth)
    if invite.status_code != 201:
        raise RuntimeError(f"inviting a worker failed: {invite.status_code} {invite.json}")
    return invite.json["token"]


def _cycle(client: Any, token: str) -> None:
    headers = {"X-Worker-Token": token}
    claim = client.post("/api/v1/work/assignments", headers=headers)
    if claim.status_code != 200:
        raise RuntimeError(f"claim failed: {claim.status_code} {claim.json}")
    body = claim.json
    answers = [{"question_id": q["id"], "value": True, "ms": 1500} for q in body["questions"]]
    submit = client.post(
        f"/api/v1/work/assignments/{body['assignment_id']}/answers",
        json={"answers": answers},
        headers=headers,
    )
    if submit.status_code != 200:
        raise RuntimeError(f"submit failed: {submit.status_code} {submit.json}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from service.devservers import PostgresServer

    results: dict[str, dict[str, Any]] = {
        name: {"rounds": [], "hot_update_share": []} for name, _ in args.variants
    }
    server = PostgresServer().start()
    try:
        for repeat in range(args.repeat):
            for index, (name, ddl) in enumerate(args.variants):
                run = run_variant(server, f"cycle_{repeat}_{index}", ddl, args)
                results[name]["rounds"].extend(run["rounds"])
                results[name]["hot_update_share"].append(run["hot_update_share"])
    finally:
        server.stop()
    summary = {
        "benchmark": "CPU per HIT cycle (claim 50+5 questions, submit 55 answers), in process",
        "variants": {
            name: {
                "python_ms_per_cycle": round(statistics.median(r[0] for r in data["rounds"]), 3),
                "postgres_ms_per_cycle": round(statistics.median(r[1] for r in data["rounds"]), 3),
                # Both variants run the same Python per cycle, so its CPU time tracks the
                # machine's speed in that round: PostgreSQL's CPU over it compares variants
                # across the drift (this machine's speed moves by tens of percent in minutes).
                "postgres_per_python": round(
                    statistics.median(r[1] / r[0] for r in data["rounds"]), 3
                ),
                "rounds": [[round(a, 3), round(b, 3)] for a, b in data["rounds"]],
                "hot_update_share": data["hot_update_share"],
            }
            for name, data in results.items()
        },
        "config": {
            "cycles_per_round": args.cycles,
            "rounds": args.rounds,
            "warmup_cycles": args.warmup,
            "repeat": args.repeat,
            "sql": {name: ddl for name, ddl in args.variants},
        },
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for name, data in summary["variants"].items():
            print(
                f"{name}: Python {data['python_ms_per_cycle']} ms, "
                f"PostgreSQL {data['postgres_ms_per_cycle']} ms per cycle "
                f"({data['postgres_per_python']} of Python's)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
