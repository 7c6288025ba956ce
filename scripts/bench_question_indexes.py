"""What does PostgreSQL spend on a HIT batch's questions, as rows or as arrays of their HITs, how
much of the rows' cost is index upkeep, and what do clock-prefixed public ids save?

    python scripts/bench_question_indexes.py --json

Groundwork for the crowd hot path (issue 4). A build inserts its HITs' questions in one statement
(:data:`_UNNEST_QUESTIONS`, the statement the service ran until migration 0006 stored a HIT's
questions as arrays of its row: 16 HITs of 55 questions = 880 rows by default). On a throwaway
PostgreSQL with the real schema as migration 0006 left it (``SCHEMA``: the last with the rows'
columns) and a ``questions`` table already holding
``--prefill`` rows, this times that statement with its commit,
then again after dropping the table's secondary indexes one at a time (the unique ``public_id``
first, then ``cluster_id``, then ``(hit_id, position)``): the differences are what each index costs
per batch. Before that, with all indexes, batches with purely random 16-byte public ids (the
service's ids before they started with a millisecond clock) alternate with batches of the
service's ids (:func:`service.crowd.hits.new_public_ids`), so both see the same table and the
same machine; and the same batches as rows alternate with the service's statement today
(:data:`service.crowd.hits._UNNEST_HITS`: the batch's 16 HITs, each with its questions as
arrays). Wall time on loopback, one session; run on a quiet machine.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: (label, DDL run before timing the next step); cumulative.
STEPS = (
    ("all indexes", None),
    ("without unique public_id", "ALTER TABLE questions DROP CONSTRAINT uq_questions_public_id"),
    ("and without cluster_id", "DROP INDEX ix_questions_cluster_id"),
    ("and without (hit_id, position)", "DROP INDEX ix_questions_hit_id_position"),
)


#: The statement builds ran while a HIT's questions were rows of ``questions`` (until migration
#: 0006 made them arrays of the HIT row). The database is migrated to 0006 only (:data:`SCHEMA`).
_UNNEST_QUESTIONS = (
    "INSERT INTO questions "
    "(public_id, kind, status, hit_id, position, cluster_id, tree_id, leaf_pos, gold_item_id) "
    "SELECT * FROM unnest("
    "string_to_array(%(public_id)s, ','), string_to_array(%(kind)s, ','), "
    "string_to_array(%(status)s, ','), string_to_array(%(hit_id)s, ',')::integer[], "
    "string_to_array(%(position)s, ',')::integer[], "
    "string_to_array(%(cluster_id)s, ',', '')::integer[], "
    "string_to_array(%(tree_id)s, ',', '')::integer[], "
    "string_to_array(%(leaf_pos)s, ',', '')::bigint[], "
    "string_to_array(%(gold_item_id)s, ',', '')::integer[])"
)


def random_ids(count: int) -> list[str]:
    """Public ids of 16 random bytes: they land at random places in the unique index."""
    raw = secrets.token_bytes(16 * count)
    return [
        base64.urlsafe_b64encode(raw[i : i + 16]).rstrip(b"=").decode("ascii")
        for i in range(0, len(raw), 16)
    ]


def batch_params(
    first_hit: int, hits: int, per_hit: int, gold: int, ids: Callable[[int], list[str]]
) -> dict[str, str]:
    """One build's questions as the service sends them: a comma-separated string per column."""
    rows = hits * per_hit
    samples = per_hit - gold
    kinds, clusters, trees, leaves, golds = [], [], [], [], []
    for i in range(rows):
        sample = i % per_hit < samples
        kinds.append("sample" if sample else "gold")
        clusters.append(str(1 + (first_hit * 7 + i) % 5000) if sample else "")
        trees.append("1" if sample else "")
        leaves.append(str(i) if sample else "")
        golds.append("" if sample else "1")
    return {
        "public_id": ",".join(ids(rows)),
        "kind": ",".join(kinds),
        "status": ",".join(["open"] * rows),
        "hit_id": ",".join(str(first_hit + i // per_hit) for i in range(rows)),
        "position": ",".join(str(i % per_hit) for i in range(rows)),
        "cluster_id": ",".join(clusters),
        "tree_id": ",".join(trees),
        "leaf_pos": ",".join(leaves),
        "gold_item_id": ",".join(golds),
    }


def hits_params(rows: dict[str, str], hits: int) -> dict[str, Any]:
    """The same batch as the service inserts it now: its HITs, each with its questions as arrays
    (one comma-separated text per HIT and column, :data:`service.crowd.hits._UNNEST_HITS`)."""
    from service.crowd.hits import new_public_ids

    def per_hit(column: str) -> list[str]:
        values = rows[column].split(",")
        size = len(values) // hits
        return [",".join(values[i * size : (i + 1) * size]) for i in range(hits)]

    clusters = per_hit("cluster_id")
    return {
        "campaign_id": 1,
        "cost": 0,
        "assignments": 1,
        "lease": 900,
        "expires": None,
        "payloads": ["[]"] * hits,
        "public_ids": new_public_ids(hits),
        "sizes": [c.count(",") + 1 for c in clusters],
        "clusters": clusters,
        "trees": per_hit("tree_id"),
        "leaves": per_hit("leaf_pos"),
        "golds": per_hit("gold_item_id"),
    }


#: The last revision whose ``questions`` still has the columns of a HIT's questions (0007 drops
#: them) and whose ``hits`` already holds them as arrays, as the service's build writes them today
#: (0007 does not touch ``hits``): both statements run against the schema they were written for.
SCHEMA = "0006"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", type=int, default=400_000, help="questions stored first")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per step")
    parser.add_argument("--hits", type=int, default=16, help="HITs per batch")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.prefill < 0 or args.batches < 1 or args.hits < 1:
        raise SystemExit("--prefill must be >= 0, --batches and --hits >= 1")

    import psycopg

    from service import migrate
    from service.crowd.hits import _UNNEST_HITS, new_public_ids
    from service.devservers import PostgresServer

    def timed(conn: Any, params: dict[str, Any], statement: str = _UNNEST_QUESTIONS) -> float:
        start = time.perf_counter()
        conn.execute(statement, params, prepare=True)
        conn.commit()
        return time.perf_counter() - start

    per_hit, gold = 55, 5
    server = PostgresServer().start()
    try:
        migrate.upgrade(server.create_database("bench"), SCHEMA)
        with psycopg.connect(server.dsn("bench")) as conn:
            hit = 1
            per_batch = args.hits * per_hit
            for _ in range(args.prefill // per_batch):  # what a table of random ids holds
                params = batch_params(hit, args.hits, per_hit, gold, random_ids)
                conn.execute(_UNNEST_QUESTIONS, params)
                hit += args.hits
            conn.commit()
            conn.autocommit = True  # VACUUM runs outside a transaction
            conn.execute("VACUUM ANALYZE questions")
            conn.autocommit = False
            by_ids: dict[str, list[float]] = {"random": [], "service": []}
            for _ in range(args.batches):
                for scheme, make in (("random", random_ids), ("service", new_public_ids)):
                    by_ids[scheme].append(
                        timed(conn, batch_params(hit, args.hits, per_hit, gold, make))
                    )
                    hit += args.hits
            as_rows, as_arrays = [], []
            for _ in range(args.batches):
                params = batch_params(hit, args.hits, per_hit, gold, new_public_ids)
                as_rows.append(timed(conn, params))
                as_arrays.append(timed(conn, hits_params(params, args.hits), _UNNEST_HITS))
                hit += args.hits
            steps: list[dict[str, Any]] = []
            for label, ddl in STEPS:
                if ddl:
                    conn.execute(ddl)
                    conn.commit()
                times = []
                for _ in range(args.batches):
                    params = batch_params(hit, args.hits, per_hit, gold, new_public_ids)
                    hit += args.hits
                    times.append(timed(conn, params))
                median = statistics.median(times) * 1000
                steps.append(
                    {
                        "indexes": label,
                        "median_ms_per_batch": round(median, 2),
                        "us_per_question": round(median * 1000 / per_batch, 2),
                    }
                )
            stored = conn.execute("SELECT count(*) FROM questions").fetchone()[0]
            hits_stored = conn.execute(
                "SELECT count(*) FROM hits WHERE cardinality(question_statuses) > 0"
            ).fetchone()[0]
    finally:
        server.stop()
    report = {
        "benchmark": "a HIT batch's question INSERT, and what each secondary index adds",
        "questions_per_batch": args.hits * per_hit,
        "prefilled": args.prefill // (args.hits * per_hit) * args.hits * per_hit,
        "stored_at_end": stored,
        "hits_stored": hits_stored,
        "public_ids_ms_per_batch": {
            scheme: round(statistics.median(times) * 1000, 2) for scheme, times in by_ids.items()
        },
        "rows_or_arrays_ms_per_batch": {
            "rows": round(statistics.median(as_rows) * 1000, 2),
            "arrays_of_hits": round(statistics.median(as_arrays) * 1000, 2),
        },
        "steps": steps,
        "index_cost_ms_per_batch": {
            STEPS[i][0].removeprefix("and ").removeprefix("without "): round(
                steps[i - 1]["median_ms_per_batch"] - steps[i]["median_ms_per_batch"], 2
            )
            for i in range(1, len(steps))
        },
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for label, ms in report["rows_or_arrays_ms_per_batch"].items():
            print(f"{'as ' + label:32s} {ms:8.2f} ms per batch")
        for step in steps:
            print(f"{step['indexes']:32s} {step['median_ms_per_batch']:8.2f} ms per batch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
