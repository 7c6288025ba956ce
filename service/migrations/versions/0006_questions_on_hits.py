"""store a HIT's questions on its HIT row, as arrays

Until now every question of a HIT was a row of ``questions``: a build of 16 HITs inserted 880
rows, each with four index entries (the primary key, the unique public id, ``(hit_id,
position)``, ``cluster_id``), and a HIT's completion updated its 55 rows again. Stored instead as
parallel arrays of the HIT row (a sample's cluster, tree and leaf position, a gold question's gold
item, every question's status), a build writes 16 rows and a completion the HIT row it updates
anyway. A throwaway patch of the hot path measured 0.88-0.90 of the rows' CPU per HIT cycle in
the slice pairs of ``scripts/bench_compare.py`` that the host did not disturb (issue 4), and
this migration with its code 0.81, 0.96 and 0.92 in three runs of 12 pairs;
``scripts/bench_question_indexes.py`` times the build's insert alone: 12.3 ms per build as rows,
3.5 as arrays of the HITs.

What moves with it:

* a question's public id becomes its HIT's new random public id (``hits.public_id``, unique)
  followed by two characters for its position. Existing questions get such ids, and the payloads
  of existing HITs are rewritten to match (a worker with a page open during the upgrade reloads
  it once); the downgrade keeps these ids, so payloads stay valid both ways;
* an assignment's answers name questions by position in the HIT (``answer_question_ids`` becomes
  ``answer_positions``);
* a cluster lists the HITs that hold its samples (``clusters.sample_hit_ids``), which is how its
  questions are found without an index on them;
* ``questions`` keeps the qualification test's questions only.

On PostgreSQL a CHECK refuses arrays that do not line up, a position whose target does not match
its kind (a sample has a cluster, tree and leaf position and no gold item; gold the reverse), a
negative leaf position and an unknown status (SQLite cannot express it without subqueries).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from __future__ import annotations

import base64
import json
import secrets

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ARRAYS = [
    ("question_cluster_ids", sa.Integer, "cluster_id"),
    ("question_tree_ids", sa.Integer, "tree_id"),
    ("question_leaf_pos", sa.BigInteger, "leaf_pos"),
    ("question_gold_item_ids", sa.Integer, "gold_item_id"),
    ("question_statuses", sa.Text, "status"),
]

# Two base64url characters per position (as service.crowd.questions: frozen here, as a migration
# must not follow later code).
_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _code(position: int) -> str:
    return _DIGITS[position // 64] + _DIGITS[position % 64]


def _hit_public_id() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(18)).decode("ascii")


_TO_ARRAYS_POSTGRESQL = """
UPDATE hits h SET
    question_cluster_ids = x.c, question_tree_ids = x.t, question_leaf_pos = x.l,
    question_gold_item_ids = x.g, question_statuses = x.s
FROM (
    SELECT hit_id, array_agg(cluster_id ORDER BY position) AS c,
        array_agg(tree_id ORDER BY position) AS t, array_agg(leaf_pos ORDER BY position) AS l,
        array_agg(gold_item_id ORDER BY position) AS g, array_agg(status ORDER BY position) AS s
    FROM questions WHERE hit_id IS NOT NULL GROUP BY hit_id
) x
WHERE h.id = x.hit_id
"""


def _to_arrays_sqlite() -> str:
    sets = ",\n    ".join(
        f"{name} = (SELECT json_group_array({column}) FROM (SELECT {column} FROM questions "
        f"WHERE hit_id = hits.id ORDER BY position))"
        for name, _, column in _ARRAYS
    )
    return f"UPDATE hits SET\n    {sets}\nWHERE id IN (SELECT hit_id FROM questions)"


_SAMPLE_HITS_POSTGRESQL = """
UPDATE clusters c SET sample_hit_ids = x.hits
FROM (
    SELECT cluster_id, array_agg(DISTINCT hit_id ORDER BY hit_id) AS hits
    FROM questions WHERE hit_id IS NOT NULL AND cluster_id IS NOT NULL GROUP BY cluster_id
) x
WHERE c.id = x.cluster_id
"""
_SAMPLE_HITS_SQLITE = """
UPDATE clusters SET sample_hit_ids = (
    SELECT json_group_array(hit_id) FROM (
        SELECT DISTINCT hit_id FROM questions WHERE cluster_id = clusters.id ORDER BY hit_id))
WHERE id IN (SELECT cluster_id FROM questions WHERE hit_id IS NOT NULL)
"""
_POSITIONS_POSTGRESQL = """
UPDATE assignments a SET answer_question_ids = ARRAY(
    SELECT q.position FROM unnest(a.answer_question_ids) WITH ORDINALITY AS u(id, n)
    JOIN questions q ON q.id = u.id ORDER BY u.n)
WHERE a.answer_question_ids IS NOT NULL
"""
_POSITIONS_SQLITE = """
UPDATE assignments SET answer_question_ids = (
    SELECT json_group_array(position) FROM (
        SELECT q.position FROM json_each(assignments.answer_question_ids) AS u
        JOIN questions q ON q.id = u.value ORDER BY u.key))
WHERE answer_question_ids IS NOT NULL
"""

_TO_ROWS_POSTGRESQL = """
INSERT INTO questions (public_id, kind, status, hit_id, position, cluster_id, tree_id, leaf_pos,
    gold_item_id, created_at)
SELECT h.public_id || substr(:digits, (t.n - 1)::integer / 64 + 1, 1)
        || substr(:digits, (t.n - 1)::integer % 64 + 1, 1),
    CASE WHEN t.g IS NULL THEN 'sample' ELSE 'gold' END, t.s, h.id, t.n - 1, t.c, t.t, t.l, t.g,
    h.created_at
FROM hits h, unnest(h.question_cluster_ids, h.question_tree_ids, h.question_leaf_pos,
                    h.question_gold_item_ids, h.question_statuses)
    WITH ORDINALITY AS t(c, t, l, g, s, n)
ORDER BY h.id, t.n
"""
_TO_ROWS_SQLITE = """
INSERT INTO questions (public_id, kind, status, hit_id, position, cluster_id, tree_id, leaf_pos,
    gold_item_id, created_at)
SELECT h.public_id || substr(:digits, s.key / 64 + 1, 1) || substr(:digits, s.key % 64 + 1, 1),
    CASE WHEN json_extract(h.question_gold_item_ids, '$[' || s.key || ']') IS NULL
        THEN 'sample' ELSE 'gold' END,
    s.value, h.id, s.key,
    json_extract(h.question_cluster_ids, '$[' || s.key || ']'),
    json_extract(h.question_tree_ids, '$[' || s.key || ']'),
    json_extract(h.question_leaf_pos, '$[' || s.key || ']'),
    json_extract(h.question_gold_item_ids, '$[' || s.key || ']'),
    h.created_at
FROM hits h, json_each(h.question_statuses) AS s
ORDER BY h.id, s.key
"""
_IDS_POSTGRESQL = """
UPDATE assignments a SET answer_question_ids = ARRAY(
    SELECT q.id FROM unnest(a.answer_question_ids) WITH ORDINALITY AS u(p, n)
    JOIN questions q ON q.hit_id = a.hit_id AND q.position = u.p ORDER BY u.n)
WHERE a.answer_question_ids IS NOT NULL
"""
_IDS_SQLITE = """
UPDATE assignments SET answer_question_ids = (
    SELECT json_group_array(id) FROM (
        SELECT q.id FROM json_each(assignments.answer_question_ids) AS u
        JOIN questions q ON q.hit_id = assignments.hit_id AND q.position = u.value
        ORDER BY u.key))
WHERE answer_question_ids IS NOT NULL
"""

# PL/pgSQL (as 0005's function): the CHECK's plan is kept per session.
_VALID_FUNCTION = """
CREATE FUNCTION maskmill_hit_questions_valid(
    clusters integer[], trees integer[], leaves bigint[], golds integer[], statuses text[]
) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN cardinality(clusters) = cardinality(statuses)
        AND cardinality(trees) = cardinality(statuses)
        AND cardinality(leaves) = cardinality(statuses)
        AND cardinality(golds) = cardinality(statuses)
        AND coalesce((
            SELECT bool_and(
                s IN ('open', 'answered', 'discarded')
                AND ((g IS NULL AND c IS NOT NULL AND t IS NOT NULL AND l >= 0)
                     OR (g IS NOT NULL AND c IS NULL AND t IS NULL AND l IS NULL)))
            FROM unnest(clusters, trees, leaves, golds, statuses) AS x(c, t, l, g, s)), true);
END
$$
"""
_CHECK = (
    "maskmill_hit_questions_valid(question_cluster_ids, question_tree_ids, question_leaf_pos, "
    "question_gold_item_ids, question_statuses)"
)


def _array(item: type[sa.types.TypeEngine]) -> sa.types.TypeEngine:
    return sa.ARRAY(item()).with_variant(sa.JSON(none_as_null=True), "sqlite")


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


#: HITs per pass of :func:`_give_hits_public_ids`: memory stays bounded however many HITs exist.
_CHUNK = 1000


def _give_hits_public_ids() -> None:
    """Each HIT gets its random public id, and its payload names its questions by their new
    public ids (position order); a chunk of HITs at a time, in id order."""
    bind = op.get_bind()
    select_chunk = sa.text("SELECT id, payload FROM hits WHERE id > :after ORDER BY id LIMIT :n")
    update = sa.text("UPDATE hits SET public_id = :pid, payload = :payload WHERE id = :id")
    after = 0
    while rows := bind.execute(select_chunk, {"after": after, "n": _CHUNK}).all():
        updates = []
        for hit_id, payload in rows:
            hit_public_id = _hit_public_id()
            questions = json.loads(payload or "[]")
            for position, question in enumerate(questions):
                pid = hit_public_id + _code(position)
                question["id"] = pid
                question["image_url"] = f"/media/q/{pid}.jpg"
            updates.append(
                {
                    "id": hit_id,
                    "pid": hit_public_id,
                    "payload": json.dumps(questions, separators=(",", ":")),
                }
            )
        bind.execute(update, updates)
        after = int(rows[-1][0])


def upgrade() -> None:
    with op.batch_alter_table("hits") as batch:
        batch.add_column(sa.Column("public_id", sa.String(64), nullable=True))
        for name, item, _ in _ARRAYS:
            batch.add_column(sa.Column(name, _array(item), nullable=True))
    op.add_column("clusters", sa.Column("sample_hit_ids", _array(sa.Integer), nullable=True))
    if _postgres():
        op.execute('ALTER TABLE hits ALTER COLUMN public_id TYPE varchar(64) COLLATE "C"')
    _give_hits_public_ids()
    op.execute(_TO_ARRAYS_POSTGRESQL if _postgres() else _to_arrays_sqlite())
    empty = "'{}'" if _postgres() else "'[]'"
    op.execute(
        "UPDATE hits SET "
        + ", ".join(f"{name} = {empty}" for name, _, _ in _ARRAYS)
        + " WHERE question_statuses IS NULL"
    )
    op.execute(_SAMPLE_HITS_POSTGRESQL if _postgres() else _SAMPLE_HITS_SQLITE)
    op.execute(_POSITIONS_POSTGRESQL if _postgres() else _POSITIONS_SQLITE)
    op.execute("DELETE FROM questions WHERE hit_id IS NOT NULL")
    with op.batch_alter_table("assignments") as batch:
        batch.alter_column("answer_question_ids", new_column_name="answer_positions")
    with op.batch_alter_table("hits") as batch:
        batch.alter_column("public_id", existing_type=sa.String(64), nullable=False)
        for name, item, _ in _ARRAYS:
            batch.alter_column(name, existing_type=_array(item), nullable=False)
        batch.create_unique_constraint(op.f("uq_hits_public_id"), ["public_id"])
        batch.create_check_constraint(op.f("ck_hits_public_id_length"), "length(public_id) = 24")
    if _postgres():
        op.execute(_VALID_FUNCTION)
        op.create_check_constraint(op.f("ck_hits_questions_valid"), "hits", _CHECK)


def downgrade() -> None:
    if _postgres():
        op.drop_constraint(op.f("ck_hits_questions_valid"), "hits", type_="check")
        op.execute(
            "DROP FUNCTION maskmill_hit_questions_valid(integer[], integer[], bigint[], "
            "integer[], text[])"
        )
    with op.batch_alter_table("assignments") as batch:
        batch.alter_column("answer_positions", new_column_name="answer_question_ids")
    bind = op.get_bind()
    rows = _TO_ROWS_POSTGRESQL if _postgres() else _TO_ROWS_SQLITE
    bind.execute(sa.text(rows), {"digits": _DIGITS})
    op.execute(_IDS_POSTGRESQL if _postgres() else _IDS_SQLITE)
    op.drop_column("clusters", "sample_hit_ids")
    with op.batch_alter_table("hits") as batch:
        batch.drop_constraint(op.f("ck_hits_public_id_length"), type_="check")
        batch.drop_constraint(op.f("uq_hits_public_id"), type_="unique")
        for name, _, _ in reversed(_ARRAYS):
            batch.drop_column(name)
        batch.drop_column("public_id")
