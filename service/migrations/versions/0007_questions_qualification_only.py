"""questions: the qualification test's only; drop what HIT questions used

Since 0006 a HIT's questions are arrays of its HIT row, and ``questions`` holds the qualification
test's questions alone. What the HIT questions had needed goes: the columns ``hit_id``,
``position``, ``cluster_id``, ``tree_id`` and ``leaf_pos``, their two indexes, the CHECK that
matched a target to its kind, and 0003's fillfactor of 45 (room for the status change every HIT
question had; qualification questions are written once and never change). A CHECK allows only
the ``qualification`` kind, every question must name its gold item, and the foreign key to
``gold_items`` that 0002 dropped for the HIT build's sake is back (a qualification question is
written once per gold item, off the hot path).

A qualification question whose gold item is gone (its project was deleted: gold items went with
it, the question, without a key, stayed) cannot be shown or graded; the upgrade deletes such
rows, as the key would have.

A gold item has one question (a unique constraint). Two workers starting a project's first tests
at once could each give its items a question (fixed with this migration); the upgrade merges such
copies into the oldest: answers to a copy name the oldest instead, except where the same attempt
also answered the oldest or an older copy (the same mask twice in one test), where the later
answer row is deleted (the attempt's score, stored on the attempt, stays as it was graded). An
attempt still open when this runs may find a different question in its test on its next read.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_TARGET_MATCHES_KIND = (
    "(kind = 'sample' AND tree_id IS NOT NULL AND leaf_pos IS NOT NULL AND cluster_id IS NOT NULL "
    "AND gold_item_id IS NULL) OR (kind <> 'sample' AND gold_item_id IS NOT NULL AND tree_id IS "
    "NULL AND leaf_pos IS NULL AND cluster_id IS NULL)"
)
_HIT_COLUMNS = [
    ("hit_id", sa.Integer),
    ("position", sa.Integer),
    ("cluster_id", sa.Integer),
    ("tree_id", sa.Integer),
    ("leaf_pos", sa.BigInteger),
]


# Portable SQL (PostgreSQL and SQLite). A question is a copy when an older one has its gold item.
_OLDEST = "(SELECT min(o.id) FROM questions o WHERE o.gold_item_id = {q}.gold_item_id)"
_DELETE_REPEATED_ANSWERS = """
DELETE FROM answers WHERE id IN (
    SELECT a.id FROM answers a JOIN questions q ON q.id = a.question_id
    WHERE EXISTS (
        SELECT 1 FROM answers earlier JOIN questions eq ON eq.id = earlier.question_id
        WHERE earlier.qualification_attempt_id = a.qualification_attempt_id
            AND eq.gold_item_id = q.gold_item_id AND eq.id < q.id))
"""
_ANSWERS_TO_OLDEST = f"""
UPDATE answers SET question_id = (
    SELECT {_OLDEST.format(q="q")} FROM questions q WHERE q.id = answers.question_id)
WHERE question_id IN (SELECT q.id FROM questions q WHERE q.id > {_OLDEST.format(q="q")})
"""
_DELETE_COPIES = f"DELETE FROM questions WHERE id > {_OLDEST.format(q='questions')}"


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    bind = op.get_bind()
    stray = bind.execute(
        sa.text(
            "SELECT count(*) FROM questions WHERE kind <> 'qualification' OR hit_id IS NOT NULL"
        )
    ).scalar_one()
    if stray:
        # 0006 moved every HIT question onto its HIT; a row left here was written around it.
        raise RuntimeError(
            f"migration 0007: {stray} rows of questions are not qualification questions; "
            "0006 should have moved them onto their HITs, so nothing is dropped"
        )
    op.execute(
        "DELETE FROM questions WHERE gold_item_id IS NULL "
        "OR gold_item_id NOT IN (SELECT id FROM gold_items)"
    )
    op.execute(_DELETE_REPEATED_ANSWERS)
    op.execute(_ANSWERS_TO_OLDEST)
    op.execute(_DELETE_COPIES)
    # batch mode: SQLite copies the table; PostgreSQL alters it in place.
    with op.batch_alter_table("questions") as batch:
        batch.drop_index(op.f("ix_questions_hit_id_position"))
        batch.drop_index(op.f("ix_questions_cluster_id"))
        batch.drop_constraint(op.f("ck_questions_target_matches_kind"), type_="check")
        batch.drop_constraint(op.f("ck_questions_leaf_pos_non_negative"), type_="check")
        for name, _ in _HIT_COLUMNS:
            batch.drop_column(name)
        batch.alter_column("gold_item_id", existing_type=sa.Integer(), nullable=False)
        batch.create_check_constraint(
            op.f("ck_questions_qualification_only"), "kind = 'qualification'"
        )
        batch.create_unique_constraint(op.f("uq_questions_gold_item_id"), ["gold_item_id"])
        batch.create_foreign_key(
            op.f("fk_questions_gold_item_id_gold_items"),
            "gold_items",
            ["gold_item_id"],
            ["id"],
            ondelete="CASCADE",
        )
    if _postgres():
        op.execute("ALTER TABLE questions RESET (fillfactor)")


def downgrade() -> None:
    with op.batch_alter_table("questions") as batch:
        batch.drop_constraint(op.f("fk_questions_gold_item_id_gold_items"), type_="foreignkey")
        batch.drop_constraint(op.f("uq_questions_gold_item_id"), type_="unique")
        batch.drop_constraint(op.f("ck_questions_qualification_only"), type_="check")
        batch.alter_column("gold_item_id", existing_type=sa.Integer(), nullable=True)
        for name, kind in _HIT_COLUMNS:
            # position was NOT NULL (0 for questions outside a HIT).
            if name == "position":
                batch.add_column(
                    sa.Column(name, kind(), nullable=False, server_default=sa.text("0"))
                )
            else:
                batch.add_column(sa.Column(name, kind(), nullable=True))
    with op.batch_alter_table("questions") as batch:
        batch.alter_column("position", existing_type=sa.Integer(), server_default=None)
        batch.create_check_constraint(
            op.f("ck_questions_target_matches_kind"), _TARGET_MATCHES_KIND
        )
        batch.create_check_constraint(
            op.f("ck_questions_leaf_pos_non_negative"), "leaf_pos IS NULL OR leaf_pos >= 0"
        )
        batch.create_index(op.f("ix_questions_cluster_id"), ["cluster_id"], unique=False)
        batch.create_index(
            op.f("ix_questions_hit_id_position"), ["hit_id", "position"], unique=False
        )
    if _postgres():
        op.execute("ALTER TABLE questions SET (fillfactor = 45)")
