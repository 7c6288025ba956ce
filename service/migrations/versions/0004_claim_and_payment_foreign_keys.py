"""drop the foreign keys that every claim and payment checked row by row

0002 dropped the keys of the rows a HIT cycle writes by the dozen (questions, answers). The rows it
writes one at a time still ran referential-integrity triggers: per claim the new assignment's HIT
and worker, per payment the ledger entry's campaign and HIT, per built HIT its campaign. Each is a
query through SPI that reads the parent row and takes a key-share lock on it; for the worker, whose
row nothing else in the claim locks, that lock is a write to its page. ``perf`` on PostgreSQL's
backends under ``scripts/bench_service.py`` put the end-of-statement trigger work at 4.2% of their
CPU. The references hold by construction, as 0002's do: a claim inserts its assignment from the HIT
it has just locked and the worker it has just read by token, in the same statement; a payment's
ledger entry comes from the campaign row the statement is updating and the HIT the transaction holds
locked; a build inserts HITs for the campaign it has just read and reserves their money in the same
transaction. Campaigns, HITs and workers are never deleted (no route or job deletes them), so the
cascades these keys carried have nothing to do.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# (table, constraint, column, referred table, on delete)
_KEYS = [
    ("hits", "fk_hits_campaign_id_campaigns", "campaign_id", "campaigns", "CASCADE"),
    ("assignments", "fk_assignments_hit_id_hits", "hit_id", "hits", "CASCADE"),
    ("assignments", "fk_assignments_worker_id_workers", "worker_id", "workers", "CASCADE"),
    (
        "ledger_entries",
        "fk_ledger_entries_campaign_id_campaigns",
        "campaign_id",
        "campaigns",
        "CASCADE",
    ),
    ("ledger_entries", "fk_ledger_entries_hit_id_hits", "hit_id", "hits", "SET NULL"),
]


def upgrade() -> None:
    for table, name, _column, _referred, _on_delete in _KEYS:
        # batch mode: SQLite cannot drop a constraint in place (the table is copied).
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(name, type_="foreignkey")


def downgrade() -> None:
    for table, name, column, referred, on_delete in reversed(_KEYS):
        with op.batch_alter_table(table) as batch:
            batch.create_foreign_key(name, referred, [column], ["id"], ondelete=on_delete)
