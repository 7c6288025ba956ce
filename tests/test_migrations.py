"""The schema comes only from Alembic: one head, upgrade from empty and back down, on both databases,
and the migrated schema equals the models (no drift)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from service import migrate
from service.crowd import questions as stored_questions
from service.db import make_engine
from service.models import Assignment, Base, Cluster, Hit, Question

EXPECTED_TABLES = {
    "api_keys",
    "projects",
    "project_classes",
    "images",
    "ground_truth_masks",
    "rounds",
    "trees",
    "clusters",
    "workers",
    "gold_items",
    "campaigns",
    "hits",
    "assignments",
    "qualification_attempts",
    "questions",
    "answers",
    "ledger_entries",
    "jobs",
}


def test_single_head():
    assert len(migrate.heads()) == 1


@pytest.fixture(params=["postgres", "sqlite"])
def empty_url(request, sqlite_url):
    if request.param == "sqlite":
        return sqlite_url
    return request.getfixturevalue("pg_url")


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_from_empty_then_downgrade(empty_url):
    assert _tables(empty_url) == set()
    migrate.upgrade(empty_url)
    assert _tables(empty_url) == EXPECTED_TABLES
    assert migrate.current(empty_url) == migrate.heads()[0]
    migrate.upgrade(empty_url)  # idempotent
    migrate.downgrade(empty_url, "base")
    assert _tables(empty_url) == set()
    assert migrate.current(empty_url) is None
    migrate.upgrade(empty_url)  # and up again after a full downgrade
    assert _tables(empty_url) == EXPECTED_TABLES
    migrate.downgrade(empty_url, "base")


def test_models_match_migrations(pg_url):
    migrate.upgrade(pg_url)
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
        migrate.downgrade(pg_url, "base")
    assert diff == [], f"models and migrations disagree: {diff}"


def test_storage_parameters_match_the_models(pg_url):
    """``compare_metadata`` does not look at storage parameters: every migrated table's must be
    what the models declare (none since 0007 reset the fillfactor ``questions`` had for its HIT
    questions' status changes), and going down must restore each revision's."""
    declared = {
        table.name: [
            f"{k}={v}" for k, v in (table.dialect_options["postgresql"]["with"] or {}).items()
        ]
        or None
        for table in Base.metadata.sorted_tables
    }

    def reloptions() -> dict[str, list[str] | None]:
        engine = make_engine(pg_url)
        try:
            with engine.connect() as conn:
                rows = conn.exec_driver_sql(
                    "SELECT relname, reloptions FROM pg_class "
                    "WHERE relkind = 'r' AND relname = ANY(%(names)s)",
                    {"names": list(declared)},
                ).all()
        finally:
            engine.dispose()
        return dict(rows)

    try:
        migrate.upgrade(pg_url)
        assert reloptions() == declared
        migrate.downgrade(pg_url, "0006")
        assert reloptions()["questions"] == ["fillfactor=45"]
        migrate.downgrade(pg_url, "0002")
        assert reloptions()["questions"] == ["fillfactor=80"]
    finally:
        migrate.downgrade(pg_url, "base")


def _array(item: type) -> sa.types.TypeEngine:
    return sa.ARRAY(item()).with_variant(sa.JSON(none_as_null=True), "sqlite")


#: ``assignments`` as migration 0005 left it (the models describe the head).
_AS_0005 = sa.table(
    "assignments",
    sa.column("id", sa.Integer),
    sa.column("answer_question_ids", _array(sa.Integer)),
    sa.column("answer_values", _array(sa.Boolean)),
    sa.column("answer_ms", _array(sa.Integer)),
    sa.column("answer_discard_reasons", _array(sa.Text)),
)


def test_0005_moves_hit_answers_onto_their_assignments_and_back(empty_url):
    """Existing HIT answers become their assignment's arrays in insertion order (discards with
    their reasons), qualification answers stay rows, and the downgrade restores the rows."""
    migrate.upgrade(empty_url, "0004")
    engine = make_engine(empty_url)
    rows = [  # (assignment, question, value, ms, discard reason), in insertion order
        (1, 30, True, 900, None),
        (1, 10, False, 800, "gold 0/1 correct"),
        (1, 20, True, 700, None),
        (2, 10, True, 600, None),
    ]
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO workers (id, backend, external_id, qualified, "
                "qualification_attempts, gold_correct, gold_total, blocked) "
                "VALUES (1, 'local', 'w1', true, 1, 0, 0, false)"
            )
            conn.exec_driver_sql(
                "INSERT INTO qualification_attempts (id, worker_id, correct, total) "
                "VALUES (1, 1, 1, 1)"
            )
            for aid in (1, 2, 3):
                conn.exec_driver_sql(
                    "INSERT INTO assignments (id, hit_id, worker_id, public_id, status, "
                    "lease_expires_at, gold_correct, gold_total) "
                    f"VALUES ({aid}, {aid}, 1, 'a{aid}', 'claimed', '2030-01-01', 0, 0)"
                )
            for aid, qid, value, ms, reason in rows:
                conn.exec_driver_sql(
                    "INSERT INTO answers (question_id, assignment_id, worker_id, value, ms, "
                    "discarded, discard_reason) VALUES (%s, %s, 1, %s, %s, %s, %s)"
                    if empty_url.startswith("postgresql")
                    else "INSERT INTO answers (question_id, assignment_id, worker_id, value, ms, "
                    "discarded, discard_reason) VALUES (?, ?, 1, ?, ?, ?, ?)",
                    (qid, aid, value, ms, reason is not None, reason),
                )
            conn.exec_driver_sql(
                "INSERT INTO answers (question_id, qualification_attempt_id, worker_id, value, "
                "ms, discarded) VALUES (99, 1, 1, true, 500, false)"
            )
        migrate.upgrade(empty_url, "0005")
        with engine.connect() as conn:
            arrays = conn.execute(
                select(
                    _AS_0005.c.id,
                    _AS_0005.c.answer_question_ids,
                    _AS_0005.c.answer_values,
                    _AS_0005.c.answer_ms,
                    _AS_0005.c.answer_discard_reasons,
                ).order_by(_AS_0005.c.id)
            ).all()
            qualification = conn.exec_driver_sql(
                "SELECT question_id, qualification_attempt_id, value, ms FROM answers"
            ).all()
        assert [tuple(r) for r in arrays] == [
            (
                1,
                [30, 10, 20],
                [True, False, True],
                [900, 800, 700],
                [None, "gold 0/1 correct", None],
            ),
            (2, [10], [True], [600], None),
            (3, None, None, None, None),
        ]
        assert [tuple(r) for r in qualification] == [(99, 1, True, 500)]
        migrate.downgrade(empty_url, "0004")
        with engine.connect() as conn:
            back = conn.exec_driver_sql(
                "SELECT assignment_id, question_id, value, ms, discard_reason FROM answers "
                "WHERE assignment_id IS NOT NULL ORDER BY id"
            ).all()
        assert [(a, q, bool(v), m, r) for a, q, v, m, r in back] == rows
    finally:
        # The rows above break the foreign keys that 0004's downgrade puts back.
        with engine.begin() as conn:
            for table in ("answers", "assignments", "qualification_attempts", "workers"):
                conn.exec_driver_sql(f"DELETE FROM {table}")
        engine.dispose()
        migrate.downgrade(empty_url, "base")


def _run(conn, sql: str, *rows: tuple) -> None:
    """Raw SQL with ``%s`` placeholders, once per row, on either database (SQLite's are ``?``)."""
    postgres = conn.dialect.name == "postgresql"
    for row in rows or ((),):
        conn.exec_driver_sql(sql if postgres else sql.replace("%s", "?"), row)


def _insert_project(conn) -> None:
    """API key 1, its project 1 and the project's class 1 ("chair")."""
    _run(conn, "INSERT INTO api_keys (id, name, prefix, key_hash) VALUES (1, 'k', 'p', 'h')")
    _run(conn, "INSERT INTO projects (id, api_key_id, name, params) VALUES (1, 1, 'p', '{}')")
    _run(conn, "INSERT INTO project_classes (id, project_id, name) VALUES (1, 1, 'chair')")


def test_0006_moves_hit_questions_onto_their_hits_and_back(empty_url):
    """A HIT's question rows become its arrays in position order, with new public ids (the HIT's
    own plus the position) that its payload names; answers name positions; a cluster lists the
    HITs holding its samples; qualification questions stay rows. The downgrade restores rows with
    the same public ids, and answers naming them."""
    migrate.upgrade(empty_url, "0005")
    engine = make_engine(empty_url)
    postgres = empty_url.startswith("postgresql")
    # (id, position, kind, status, cluster, tree, leaf, gold item), stored out of order.
    questions = [
        (11, 2, "sample", "answered", 5, 3, 40, None),
        (12, 0, "gold", "answered", None, None, None, 7),
        (13, 1, "sample", "discarded", 5, 3, 41, None),
    ]
    old_ids = {11: "q-eleven", 12: "q-twelve", 13: "q-thirteen"}
    payload = json.dumps(
        [
            {"class_name": "chair", "id": old_ids[qid], "image_url": f"/media/q/{old_ids[qid]}.jpg"}
            for qid, *_ in sorted(questions, key=lambda q: q[1])
        ]
    )

    try:
        with engine.begin() as conn:
            _insert_project(conn)
            _run(
                conn,
                "INSERT INTO rounds (id, project_id, number, status) VALUES (1, 1, 1, 'ready')",
            )
            _run(
                conn,
                "INSERT INTO trees (id, project_id, round_id, class_id, uri, mask_count) "
                "VALUES (3, 1, 1, 1, 'file:///t', 100)",
            )
            _run(
                conn,
                "INSERT INTO clusters (id, project_id, tree_id, node, lo, hi, size, score, state, "
                "yes_count, no_count) VALUES (5, 1, 3, 9, 40, 50, 10, 0.9, 'active', 1, 0)",
            )
            _run(
                conn,
                "INSERT INTO hits (id, campaign_id, status, cost_micros, max_assignments, "
                "lease_seconds, payload) VALUES (1, 1, 'completed', 0, 1, 900, %s), "
                "(2, 1, 'open', 0, 1, 900, '[]')",
                (payload,),
            )
            _run(
                conn,
                "INSERT INTO questions (id, public_id, kind, status, hit_id, position, cluster_id, "
                "tree_id, leaf_pos, gold_item_id) VALUES (%s, %s, %s, %s, 1, %s, %s, %s, %s, %s)",
                *[(q[0], old_ids[q[0]], q[2], q[3], q[1], *q[4:]) for q in questions],
            )
            _run(
                conn,
                "INSERT INTO questions (id, public_id, kind, status, position, gold_item_id) "
                "VALUES (20, 'qualification-one', 'qualification', 'open', 0, 7)",
            )
            _run(
                conn,
                "INSERT INTO assignments (id, hit_id, worker_id, public_id, status, "
                "lease_expires_at, gold_correct, gold_total, answer_question_ids, answer_values, "
                "answer_ms) VALUES (1, 1, 1, 'a1', 'approved', '2030-01-01', 1, 1, %s, %s, %s)",
                (
                    [11, 12] if postgres else "[11, 12]",
                    [True, False] if postgres else "[true, false]",
                    [900, 800] if postgres else "[900, 800]",
                ),
            )
        migrate.upgrade(empty_url, "0006")
        with Session(engine) as session:
            hit = session.get(Hit, 1)
            assert hit.question_cluster_ids == [None, 5, 5]
            assert hit.question_tree_ids == [None, 3, 3]
            assert hit.question_leaf_pos == [None, 41, 40]
            assert hit.question_gold_item_ids == [7, None, None]
            assert hit.question_statuses == ["answered", "discarded", "answered"]
            new_ids = [stored_questions.public_id(hit.public_id, p) for p in range(3)]
            assert [q["id"] for q in json.loads(hit.payload)] == new_ids
            assert [q["image_url"] for q in json.loads(hit.payload)] == [
                f"/media/q/{pid}.jpg" for pid in new_ids
            ]
            empty = session.get(Hit, 2)
            assert empty.question_statuses == [] and empty.public_id != hit.public_id
            assert len(hit.public_id) == 24
            assert session.get(Cluster, 5).sample_hit_ids == [1]
            assignment = session.get(Assignment, 1)
            assert assignment.answer_positions == [2, 0]
            assert [q.public_id for q in stored_questions.of_hits(session, [1])[1]] == new_ids
            rows = session.execute(select(Question.id, Question.public_id)).all()
            assert [tuple(r) for r in rows] == [(20, "qualification-one")]
        migrate.downgrade(empty_url, "0005")
        with engine.connect() as conn:
            back = conn.exec_driver_sql(
                "SELECT public_id, kind, status, hit_id, position, cluster_id, tree_id, leaf_pos, "
                "gold_item_id FROM questions WHERE hit_id IS NOT NULL ORDER BY position"
            ).all()
            answered = conn.execute(
                select(_AS_0005.c.answer_question_ids).where(_AS_0005.c.id == 1)
            ).scalar_one()
            by_id = dict(
                conn.exec_driver_sql("SELECT id, position FROM questions WHERE hit_id = 1").all()
            )
        assert [tuple(r) for r in back] == [
            (new_ids[0], "gold", "answered", 1, 0, None, None, None, 7),
            (new_ids[1], "sample", "discarded", 1, 1, 5, 3, 41, None),
            (new_ids[2], "sample", "answered", 1, 2, 5, 3, 40, None),
        ]
        assert [by_id[q] for q in answered] == [2, 0]
    finally:
        with engine.begin() as conn:
            for table in ("assignments", "questions", "hits", "clusters", "trees", "rounds"):
                conn.exec_driver_sql(f"DELETE FROM {table}")
            for table in ("project_classes", "projects", "api_keys"):
                conn.exec_driver_sql(f"DELETE FROM {table}")
        engine.dispose()
        migrate.downgrade(empty_url, "base")


def _migration_module(name: str):
    """A revision file loaded as a module of its own, to call its helpers directly."""
    path = Path(migrate.__file__).parent / "migrations" / "versions" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"revision_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_0006_gives_hits_public_ids_a_chunk_at_a_time(empty_url):
    """0006's pass over the HITs reads them a chunk at a time (memory bounded by the chunk, not
    by the number of HITs): with chunks of 2, five HITs all get a new public id of their own and a
    payload naming their questions by it."""
    revision = _migration_module("0006_questions_on_hits")
    revision._CHUNK = 2
    migrate.upgrade(empty_url, "0006")
    engine = make_engine(empty_url)
    old = [f"{n:024d}" for n in range(1, 6)]
    payload = json.dumps([{"id": "q-old", "image_url": "/media/q/q-old.jpg", "class_name": "c"}])
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.insert(Hit.__table__),
                [
                    {
                        "id": n,
                        "campaign_id": 1,
                        "cost_micros": 0,
                        "public_id": pid,
                        "payload": payload,
                    }
                    for n, pid in enumerate(old, start=1)
                ]
                + [
                    {
                        "id": 6,
                        "campaign_id": 1,
                        "cost_micros": 0,
                        "public_id": "x" * 24,
                        "payload": "[]",
                    }
                ],
            )
        with engine.begin() as conn, Operations.context(MigrationContext.configure(conn)):
            revision._give_hits_public_ids()
        with engine.connect() as conn:
            rows = conn.execute(select(Hit.id, Hit.public_id, Hit.payload).order_by(Hit.id)).all()
        assert [r.id for r in rows] == [1, 2, 3, 4, 5, 6]
        assert len({r.public_id for r in rows}) == 6 and not {r.public_id for r in rows} & {
            *old,
            "x" * 24,
        }
        for row in rows[:5]:
            (question,) = json.loads(row.payload)
            expected = stored_questions.public_id(row.public_id, 0)
            assert question == {
                "id": expected,
                "image_url": f"/media/q/{expected}.jpg",
                "class_name": "c",
            }
        assert json.loads(rows[5].payload) == []
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM hits")
        engine.dispose()
        migrate.downgrade(empty_url, "base")


def test_0007_keeps_qualification_questions_and_drops_the_hit_columns(empty_url):
    """0007 drops what HIT questions used from ``questions``, keeps the qualification questions,
    deletes those whose gold item is gone (their key is back), merges copies of one gold item's
    question into the oldest (answers follow it; an attempt's second answer to the same mask
    goes), refuses to run over a question row that is not a qualification question, and goes back
    down with the columns restored."""
    migrate.upgrade(empty_url, "0006")
    engine = make_engine(empty_url)
    postgres = empty_url.startswith("postgresql")

    def questions() -> list[tuple]:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT id, public_id, kind, gold_item_id FROM questions ORDER BY id"
            ).all()
        return [tuple(r) for r in rows]

    def columns() -> set[str]:
        return {c["name"] for c in inspect(engine).get_columns("questions")}

    hit_columns = {"hit_id", "position", "cluster_id", "tree_id", "leaf_pos"}
    try:
        with engine.begin() as conn:
            _insert_project(conn)
            _run(
                conn,
                "INSERT INTO images (id, project_id, file_name, uri, width, height) "
                "VALUES (1, 1, 'a.jpg', 'file:///a.jpg', 4, 3)",
            )
            _run(
                conn,
                "INSERT INTO gold_items (id, project_id, image_id, class_id, rle, iou, expected, "
                "for_qualification) VALUES (7, 1, 1, 1, '{}', 0.9, %s, %s)",
                (True, True),
            )
            # Question 21's gold item (8) is gone, as after its project was deleted; 22 is a
            # copy of 20 (gold item 7), as two first tests started at once could make.
            _run(
                conn,
                "INSERT INTO questions (id, public_id, kind, status, position, gold_item_id) "
                "VALUES (%s, %s, 'qualification', 'open', 0, %s)",
                (20, "qualification-one", 7),
                (21, "qualification-orphan", 8),
                (22, "qualification-copy", 7),
            )
            _run(
                conn,
                "INSERT INTO workers (id, backend, external_id, qualified, qualification_attempts, "
                "gold_correct, gold_total, blocked) VALUES (1, 'local', 'w', %s, 2, 0, 0, %s)",
                (False, False),
            )
            _run(
                conn,
                "INSERT INTO qualification_attempts (id, worker_id, correct, total) "
                "VALUES (%s, 1, 1, 1)",
                (1,),
                (2,),
            )
            # Attempt 1 answered the copy only; attempt 2 the mask twice, as 20 and as 22.
            _run(
                conn,
                "INSERT INTO answers (id, question_id, qualification_attempt_id, worker_id, "
                "value, ms) VALUES (%s, %s, %s, 1, %s, %s)",
                (1, 22, 1, True, 900),
                (2, 20, 2, False, 800),
                (3, 22, 2, True, 700),
            )
            _run(
                conn,
                "INSERT INTO questions (id, public_id, kind, status, hit_id, position, "
                "cluster_id, tree_id, leaf_pos) VALUES (30, 'q-stray', 'sample', 'open', 1, 0, "
                "5, 3, 40)",
            )
        with pytest.raises(RuntimeError, match="1 rows of questions are not qualification"):
            migrate.upgrade(empty_url, "0007")
        assert migrate.current(empty_url) == "0006" and len(questions()) == 4
        with engine.begin() as conn:
            _run(conn, "DELETE FROM questions WHERE id = 30")

        migrate.upgrade(empty_url, "0007")
        assert questions() == [(20, "qualification-one", "qualification", 7)]
        with engine.connect() as conn:
            answers = conn.exec_driver_sql(
                "SELECT id, question_id, qualification_attempt_id, value, ms FROM answers "
                "ORDER BY id"
            ).all()
        assert [tuple(r) for r in answers] == [(1, 20, 1, True, 900), (2, 20, 2, False, 800)]
        with engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
            _run(
                conn,
                "INSERT INTO questions (id, public_id, kind, status, gold_item_id) "
                "VALUES (23, 'qualification-again', 'qualification', 'open', 7)",
            )
        assert not columns() & hit_columns
        assert not {i["name"] for i in inspect(engine).get_indexes("questions")} & {
            "ix_questions_cluster_id",
            "ix_questions_hit_id_position",
        }
        if postgres:
            with engine.connect() as conn:
                options = conn.exec_driver_sql(
                    "SELECT reloptions FROM pg_class WHERE relname = 'questions'"
                ).scalar_one()
            assert options is None

        migrate.downgrade(empty_url, "0006")
        assert hit_columns <= columns()
        with engine.connect() as conn:
            kept = conn.exec_driver_sql(
                "SELECT id, hit_id, position, cluster_id, tree_id, leaf_pos, gold_item_id "
                "FROM questions"
            ).all()
        assert [tuple(r) for r in kept] == [(20, None, 0, None, None, None, 7)]
        with engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
            # The target CHECK is back: a sample needs its leaf.
            _run(
                conn,
                "INSERT INTO questions (id, public_id, kind, status, hit_id, position, "
                "cluster_id, tree_id) VALUES (31, 'q-leafless', 'sample', 'open', 1, 0, 5, 3)",
            )
    finally:
        with engine.begin() as conn:
            for table in (
                "answers",
                "qualification_attempts",
                "workers",
                "questions",
                "gold_items",
                "images",
                "project_classes",
                "projects",
            ):
                conn.exec_driver_sql(f"DELETE FROM {table}")
            conn.exec_driver_sql("DELETE FROM api_keys")
        engine.dispose()
        migrate.downgrade(empty_url, "base")
