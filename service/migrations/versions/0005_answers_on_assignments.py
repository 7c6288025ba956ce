"""store a HIT's answers on its assignment, as arrays

Until now every answer to a HIT was a row of ``answers``: 55 rows per submission, each with a
sequence value, three index entries and a speculative insertion (``ON CONFLICT``). Stored instead
as four parallel arrays of the assignment row (question, yes/no, milliseconds, discard reason), a
submission writes the one row it updates anyway. ``scripts/bench_compare.py`` (8 alternating
slice pairs of ``bench_service.py``'s load, issue 4) measured the service's CPU per HIT cycle at
0.817 of the answers-as-rows code, and 1.225 times its cycles per second; closing the questions
without storing answer rows measured 0.983 (no gain), so the rows were the cost.

Uniqueness per (assignment, question), which the partial unique index enforced, now holds because
every writer locks the assignment row and reads its arrays before it appends; on PostgreSQL a CHECK
still refuses an assignment whose arrays name a question twice, and two more check that the arrays
line up and that no time is negative (SQLite cannot express these without subqueries). ``answers`` keeps
the qualification test's answers, so its HIT-only columns go (``assignment_id``, ``discarded``,
``discard_reason``) and every remaining answer belongs to a qualification attempt.

Existing HIT answers are moved, in their insertion order; the downgrade moves them back.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ARRAYS = [
    ("answer_question_ids", sa.Integer),
    ("answer_values", sa.Boolean),
    ("answer_ms", sa.Integer),
    ("answer_discard_reasons", sa.Text),
]

_TO_ARRAYS_POSTGRESQL = """
UPDATE assignments a
SET answer_question_ids = x.q, answer_values = x.v, answer_ms = x.m,
    answer_discard_reasons = CASE WHEN x.any_discarded THEN x.r END
FROM (
    SELECT assignment_id,
        array_agg(question_id ORDER BY id) AS q, array_agg(value ORDER BY id) AS v,
        array_agg(ms ORDER BY id) AS m,
        array_agg(CASE WHEN discarded THEN discard_reason END ORDER BY id) AS r,
        bool_or(discarded) AS any_discarded
    FROM answers WHERE assignment_id IS NOT NULL GROUP BY assignment_id
) x
WHERE a.id = x.assignment_id
"""

# SQLite's JSON lists: json_group_array keeps the subquery's order; booleans as JSON true/false.
_TO_ARRAYS_SQLITE = """
UPDATE assignments SET
    answer_question_ids = (SELECT json_group_array(question_id) FROM
        (SELECT question_id FROM answers WHERE assignment_id = assignments.id ORDER BY id)),
    answer_values = (SELECT json_group_array(json(CASE WHEN value THEN 'true' ELSE 'false' END))
        FROM (SELECT value FROM answers WHERE assignment_id = assignments.id ORDER BY id)),
    answer_ms = (SELECT json_group_array(ms) FROM
        (SELECT ms FROM answers WHERE assignment_id = assignments.id ORDER BY id)),
    answer_discard_reasons = CASE WHEN EXISTS (
            SELECT 1 FROM answers WHERE assignment_id = assignments.id AND discarded)
        THEN (SELECT json_group_array(CASE WHEN discarded THEN discard_reason END) FROM
            (SELECT discarded, discard_reason FROM answers
             WHERE assignment_id = assignments.id ORDER BY id))
        END
WHERE id IN (SELECT assignment_id FROM answers WHERE assignment_id IS NOT NULL)
"""

_TO_ROWS_POSTGRESQL = """
INSERT INTO answers
    (question_id, assignment_id, worker_id, value, ms, discarded, discard_reason, created_at)
SELECT t.q, a.id, a.worker_id, t.v, t.m, t.r IS NOT NULL, t.r, coalesce(a.submitted_at, a.created_at)
FROM assignments a,
    unnest(a.answer_question_ids, a.answer_values, a.answer_ms,
           coalesce(a.answer_discard_reasons,
                    array_fill(NULL::text, ARRAY[cardinality(a.answer_question_ids)])))
        WITH ORDINALITY AS t(q, v, m, r, n)
WHERE a.answer_question_ids IS NOT NULL
ORDER BY a.id, t.n
"""

_TO_ROWS_SQLITE = """
INSERT INTO answers
    (question_id, assignment_id, worker_id, value, ms, discarded, discard_reason, created_at)
SELECT q.value, a.id, a.worker_id,
    CASE WHEN json_extract(a.answer_values, '$[' || q.key || ']') THEN 1 ELSE 0 END,
    json_extract(a.answer_ms, '$[' || q.key || ']'),
    json_extract(a.answer_discard_reasons, '$[' || q.key || ']') IS NOT NULL,
    json_extract(a.answer_discard_reasons, '$[' || q.key || ']'),
    coalesce(a.submitted_at, a.created_at)
FROM assignments a, json_each(a.answer_question_ids) AS q
WHERE a.answer_question_ids IS NOT NULL
ORDER BY a.id, q.key
"""


# PL/pgSQL rather than SQL: a CHECK builds its expressions anew for every statement, and a SQL
# function's query would be planned again each time, where PL/pgSQL keeps its plan per session.
_DISTINCT_FUNCTION = """
CREATE FUNCTION maskmill_all_distinct(ids integer[]) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN ids IS NULL OR (SELECT count(DISTINCT x) = count(*) FROM unnest(ids) AS x);
END
$$
"""

_CHECKS = {
    "answers_aligned": "(answer_question_ids IS NULL) = (answer_values IS NULL) "
    "AND (answer_question_ids IS NULL) = (answer_ms IS NULL) "
    "AND (answer_discard_reasons IS NULL OR answer_question_ids IS NOT NULL) "
    "AND cardinality(answer_values) = cardinality(answer_question_ids) "
    "AND cardinality(answer_ms) = cardinality(answer_question_ids) "
    "AND (answer_discard_reasons IS NULL "
    "OR cardinality(answer_discard_reasons) = cardinality(answer_question_ids))",
    "answer_ms_non_negative": "0 <= ALL(answer_ms)",
    "answers_distinct": "maskmill_all_distinct(answer_question_ids)",
}


def _array(item: type[sa.types.TypeEngine]) -> sa.types.TypeEngine:
    return sa.ARRAY(item()).with_variant(sa.JSON(none_as_null=True), "sqlite")


def _unique_per_parent(parent: str) -> tuple[str, dict[str, sa.TextClause]]:
    """0001's partial unique index of an answer's (parent, question): its name and predicate."""
    where = sa.text(f"{parent} IS NOT NULL")
    return f"uq_answers_{parent}_question_id", {"postgresql_where": where, "sqlite_where": where}


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    for name, item in _ARRAYS:
        op.add_column("assignments", sa.Column(name, _array(item), nullable=True))
    op.execute(_TO_ARRAYS_POSTGRESQL if _postgres() else _TO_ARRAYS_SQLITE)
    if _postgres():
        op.execute(_DISTINCT_FUNCTION)
        for name, condition in _CHECKS.items():
            op.create_check_constraint(op.f(f"ck_assignments_{name}"), "assignments", condition)
    op.execute("DELETE FROM answers WHERE assignment_id IS NOT NULL")
    with op.batch_alter_table("answers") as batch:
        for parent in ("assignment_id", "qualification_attempt_id"):
            name, where = _unique_per_parent(parent)
            batch.drop_index(name, **where)
        batch.drop_constraint(op.f("ck_answers_one_parent"), type_="check")
        batch.drop_constraint(op.f("ck_answers_discard_has_reason"), type_="check")
        batch.drop_column("assignment_id")
        batch.drop_column("discarded")
        batch.drop_column("discard_reason")
        batch.alter_column("qualification_attempt_id", existing_type=sa.Integer, nullable=False)
        batch.create_index(
            "uq_answers_qualification_attempt_id_question_id",
            ["qualification_attempt_id", "question_id"],
            unique=True,
        )


def downgrade() -> None:
    if _postgres():
        for name in _CHECKS:
            op.drop_constraint(op.f(f"ck_assignments_{name}"), "assignments", type_="check")
        op.execute("DROP FUNCTION maskmill_all_distinct(integer[])")
    with op.batch_alter_table("answers") as batch:
        batch.drop_index("uq_answers_qualification_attempt_id_question_id")
        batch.alter_column("qualification_attempt_id", existing_type=sa.Integer, nullable=True)
        batch.add_column(sa.Column("assignment_id", sa.Integer, nullable=True))
        batch.add_column(
            sa.Column("discarded", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("discard_reason", sa.Text, nullable=True))
        batch.create_check_constraint(
            op.f("ck_answers_one_parent"),
            "(assignment_id IS NULL) <> (qualification_attempt_id IS NULL)",
        )
        batch.create_check_constraint(
            op.f("ck_answers_discard_has_reason"), "NOT discarded OR discard_reason IS NOT NULL"
        )
        for parent in ("qualification_attempt_id", "assignment_id"):
            name, where = _unique_per_parent(parent)
            batch.create_index(name, [parent, "question_id"], unique=True, **where)
    op.execute(_TO_ROWS_POSTGRESQL if _postgres() else _TO_ROWS_SQLITE)
    with op.batch_alter_table("assignments") as batch:
        for name, _item in reversed(_ARRAYS):
            batch.drop_column(name)
