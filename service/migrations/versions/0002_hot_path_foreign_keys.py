"""drop the per-row foreign keys of the crowd hot path

Every HIT cycle inserts 55 questions and 55 answers. Each of these rows' foreign keys ran a
referential-integrity trigger that re-read, and share-locked, the parent row: the HIT (the same
row 55 times per build), the gold item (shared by concurrent builds, so the locks became
multixacts) and, per answer, the question (then updated by the same transaction). Measured with
``scripts/bench_service.py --statements``, those triggers were about a seventh of PostgreSQL's time
per cycle. The references still hold by construction: questions are inserted by the statement
that inserts their HIT, from gold items read in the same transaction; answers only for questions
the submission has just read from its locked assignment's HIT; and HITs, questions and gold items
are never deleted on their own.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# (table, constraint, column, referred table)
_KEYS = [
    ("questions", "fk_questions_hit_id_hits", "hit_id", "hits"),
    ("questions", "fk_questions_gold_item_id_gold_items", "gold_item_id", "gold_items"),
    ("answers", "fk_answers_question_id_questions", "question_id", "questions"),
]


def upgrade() -> None:
    for table, name, _column, _referred in _KEYS:
        # batch mode: SQLite cannot drop a constraint in place (the table is copied).
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(name, type_="foreignkey")


def downgrade() -> None:
    for table, name, column, referred in reversed(_KEYS):
        with op.batch_alter_table(table) as batch:
            batch.create_foreign_key(name, referred, [column], ["id"], ondelete="CASCADE")
