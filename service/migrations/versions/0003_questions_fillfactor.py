"""leave room on question pages for every row's one status change

A submission closes its HIT's 55 questions (``open`` -> ``answered``), a change of no indexed
column, so PostgreSQL can rewrite each row in place on its page (a HOT update) if the page has
room. At fillfactor 80 it had room for about a quarter of a page's rows: half the updates were
HOT, the others wrote the row to another page and added an entry to each of the table's four
indexes. At 45 a page keeps room for every row on it to change once, and all of them were HOT.
``scripts/bench_cycle_cpu.py`` (claim + submit in process, one worker; 3 alternating runs of each
setting, 15 rounds of 60 cycles) measured PostgreSQL's CPU per HIT cycle at 0.997 of the Python
side's at 80 and 0.872 at 45: an eighth less, with 48-51% of question updates HOT at 80 and 100% at
45.

Only pages written from now on follow the new setting; existing pages keep theirs (rewriting the
table would lock it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: Must equal ``Question.__table_args__``'s ``postgresql_with`` (tests/test_migrations.py checks).
_FILLFACTOR = 45
_PREVIOUS = 80


def _set(fillfactor: int) -> None:
    # A PostgreSQL storage parameter; SQLite has nothing like it.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE questions SET (fillfactor = {fillfactor})")


def upgrade() -> None:
    _set(_FILLFACTOR)


def downgrade() -> None:
    _set(_PREVIOUS)
