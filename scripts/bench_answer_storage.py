"""How much PostgreSQL work would storing a HIT's answers as one row of arrays save?

    python scripts/bench_answer_storage.py --json

Groundwork for the crowd hot path (issue 4): until migration 0005 a submission inserted one
``answers`` row per question (55 per HIT) and closed the HIT's 55 ``questions`` rows. This
measures, on a throwaway PostgreSQL with the real schema as migration 0006 left it (``SCHEMA``:
the last whose ``questions`` has the columns of a HIT's questions) plus a table of answer rows
shaped as ``answers`` was before 0005 (``answer_rows``), in one session with prepared statements,
the median time of that against inserting the same answers as one row of arrays, each followed by
its commit. Wall time on loopback, so it includes one round trip per statement; run on a quiet
machine. (The service now appends the arrays to the assignment row it updates anyway.)
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

QUESTIONS = 55
#: The last revision whose ``questions`` still has the columns of a HIT's questions, which the
#: rows being measured close (0007 drops them).
SCHEMA = "0006"

_NEW_QUESTIONS = """
INSERT INTO questions (public_id, kind, status, hit_id, position, cluster_id, tree_id, leaf_pos,
    gold_item_id)
SELECT p, 'sample', 'open', %(hit)s, i, i / 15 + 1, 1, i, NULL
FROM unnest(string_to_array(%(ids)s, ',')) WITH ORDINALITY AS t(p, i)
RETURNING id
"""

# ``answers`` as migration 0004 left it, HIT answers only.
_ANSWER_ROWS = [
    """
CREATE TABLE answer_rows (
    id serial PRIMARY KEY,
    question_id integer NOT NULL,
    assignment_id integer,
    worker_id integer NOT NULL,
    value boolean NOT NULL,
    ms integer NOT NULL CHECK (ms >= 0),
    discarded boolean NOT NULL,
    discard_reason text CHECK (NOT discarded OR discard_reason IS NOT NULL),
    created_at timestamptz NOT NULL DEFAULT now()
)
""",
    "CREATE UNIQUE INDEX ON answer_rows (assignment_id, question_id) "
    "WHERE assignment_id IS NOT NULL",
    "CREATE INDEX ON answer_rows (question_id)",
]

_AS_ROWS = """
INSERT INTO answer_rows (question_id, assignment_id, worker_id, value, ms, discarded)
SELECT q, %(assignment)s, 1, v, m, false
FROM unnest(string_to_array(%(qids)s, ',')::integer[], string_to_array(%(vals)s, ',')::boolean[],
    string_to_array(%(ms)s, ',')::integer[]) AS t(q, v, m)
ON CONFLICT (assignment_id, question_id) WHERE assignment_id IS NOT NULL DO NOTHING
"""

_CLOSE_QUESTIONS = (
    "UPDATE questions SET status = 'answered' WHERE hit_id = %(hit)s AND status = 'open'"
)

_ANSWER_SETS = """
CREATE TABLE answer_sets (
    assignment_id integer PRIMARY KEY,
    vals boolean[] NOT NULL,
    ms integer[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""

_AS_ARRAYS = """
INSERT INTO answer_sets (assignment_id, vals, ms)
VALUES (%(assignment)s, string_to_array(%(vals)s, ',')::boolean[],
    string_to_array(%(ms)s, ',')::integer[])
ON CONFLICT DO NOTHING
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hits", type=int, default=400, help="submissions to time")
    parser.add_argument("--warmup", type=int, default=50, help="first submissions not counted")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.hits <= args.warmup or args.warmup < 0:
        raise SystemExit("--hits must be greater than --warmup, which must be >= 0")

    import psycopg

    from service import migrate
    from service.devservers import PostgresServer

    server = PostgresServer().start()
    try:
        migrate.upgrade(server.create_database("bench"), SCHEMA)
        with psycopg.connect(server.dsn("bench")) as conn:
            for statement in [*_ANSWER_ROWS, _ANSWER_SETS]:
                conn.execute(statement)
            conn.commit()
            timings: dict[str, list[float]] = {"rows": [], "arrays": []}
            for hit in range(1, args.hits + 1):
                ids = ",".join(secrets.token_urlsafe(16) for _ in range(QUESTIONS))
                qids = [r[0] for r in conn.execute(_NEW_QUESTIONS, {"hit": hit, "ids": ids})]
                conn.commit()
                params = {
                    "hit": hit,
                    "assignment": hit,
                    "qids": ",".join(map(str, qids)),
                    "vals": ",".join("t" for _ in qids),
                    "ms": ",".join("1500" for _ in qids),
                }
                start = time.perf_counter()
                conn.execute(_AS_ROWS, params, prepare=True)
                conn.execute(_CLOSE_QUESTIONS, params, prepare=True)
                conn.commit()
                timings["rows"].append(time.perf_counter() - start)
                start = time.perf_counter()
                conn.execute(_AS_ARRAYS, params, prepare=True)
                conn.commit()
                timings["arrays"].append(time.perf_counter() - start)
    finally:
        server.stop()
    medians = {k: round(1000 * statistics.median(v[args.warmup :]), 3) for k, v in timings.items()}
    report = {
        "benchmark": "one HIT submission's answers: rows + closing questions vs one array row",
        "questions_per_hit": QUESTIONS,
        "submissions_timed": args.hits - args.warmup,
        "median_ms": {
            "rows_and_close_questions": medians["rows"],
            "one_array_row": medians["arrays"],
        },
        "saved_ms_per_submission": round(medians["rows"] - medians["arrays"], 3),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"rows + closing questions {medians['rows']} ms, one array row {medians['arrays']} ms "
            f"per submission (median of {report['submissions_timed']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
