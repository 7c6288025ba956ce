"""SQLite: a HIT's question arrays and an assignment's answer arrays must line up

On PostgreSQL, CHECKs of 0005 and 0006 refuse arrays that do not line up (and more: a question
answered twice, a negative time, a target that does not match its kind). SQLite stores the arrays
as JSON text and its CHECKs cannot run subqueries, so it had none of them. The lengths it can
check, with ``json_array_length``, and the presence of an assignment's answers together: that is
what this adds, on SQLite only (PostgreSQL's CHECKs already cover it). The per-entry rules stay
PostgreSQL's.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: (table, constraint, condition). ``json_array_length(NULL)`` is NULL, which a CHECK lets pass,
#: so presence is checked on its own.
_CHECKS = [
    (
        "hits",
        "ck_hits_questions_aligned",
        " AND ".join(
            f"json_array_length({name}) = json_array_length(question_statuses)"
            for name in (
                "question_cluster_ids",
                "question_tree_ids",
                "question_leaf_pos",
                "question_gold_item_ids",
            )
        ),
    ),
    (
        "assignments",
        "ck_assignments_answers_aligned",
        "(answer_positions IS NULL) = (answer_values IS NULL) "
        "AND (answer_positions IS NULL) = (answer_ms IS NULL) "
        "AND (answer_discard_reasons IS NULL OR answer_positions IS NOT NULL) "
        "AND json_array_length(answer_values) = json_array_length(answer_positions) "
        "AND json_array_length(answer_ms) = json_array_length(answer_positions) "
        "AND (answer_discard_reasons IS NULL "
        "OR json_array_length(answer_discard_reasons) = json_array_length(answer_positions))",
    ),
]


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def upgrade() -> None:
    if not _sqlite():
        return
    for table, name, condition in _CHECKS:
        # batch mode: SQLite adds a CHECK by copying the table.
        with op.batch_alter_table(table) as batch:
            batch.create_check_constraint(op.f(name), condition)


def downgrade() -> None:
    if not _sqlite():
        return
    for table, name, _ in reversed(_CHECKS):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(name), type_="check")
