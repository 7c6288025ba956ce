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
