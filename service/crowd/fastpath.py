"""PostgreSQL fast paths for the two requests every crowd worker repeats: claim a HIT, submit it.

Why a second implementation: a HIT cycle is two HTTP requests, and at hundreds of cycles per second
the portable code (:mod:`service.crowd.hits`, :mod:`service.crowd.quality`: one SQLAlchemy
statement per step, a dozen per cycle) spends more time in round trips and statement overhead than
in the work itself. Here the same steps are a handful of static SQL statements run on a psycopg
connection directly (prepared once per connection):

* **claim**: one statement on the thread's held autocommit connection (no session, no pool
  checkout: :meth:`service.db.Database.autocommit_connection`). Token -> worker; the worker's
  unexpired claim if it has one (a reloaded page resumes); otherwise the oldest open
  single-assignment HIT of its project's offering campaigns, taken ``FOR UPDATE SKIP LOCKED``, gets the assignment and becomes
  ``assigned``; the HIT's stored payload is returned as is. (A redundant HIT's slots are counted
  by the portable code, in a statement that runs after the HIT is locked.)
* **submit**: on a SQLAlchemy connection in a transaction (the hot lane's own, checked out of the
  pool without a session, or a request session's), where the rare paths continue: BEGIN,
  then one statement locks the assignment (``NOWAIT``) and reads the HIT's
  questions; one statement stores the answers and, when they complete the assignment, closes it:
  verdict, worker gold, HIT completed, questions answered, cluster counts moved by atomic
  increments on rows locked in id order (so concurrent submissions of HITs sharing clusters
  neither lose updates nor deadlock); then one round trip writes the states the policy decided,
  spends the money (campaign row last, as every writer does) and commits.

Quality control and decisions are the portable ones: :func:`~service.crowd.quality.judge`,
:func:`~service.crowd.quality.block_reason` and :func:`~service.crowd.decisions.next_state` (which
calls the engine's :func:`~service.engine.policy.decide`), fed the same numbers, and the unusual
cases are the portable code's: a claim that finds no open HIT (it builds) or a lapsed lease
anywhere (it sweeps), and a submission whose assignment row is busy, go to it whole; an assignment
that completes a redundant HIT, fails quality control or gets its worker blocked has its answers
stored here and is then judged by :func:`~service.crowd.quality.finalize_assignment` in the same
transaction. So the two implementations cannot drift apart on the rare paths.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import psycopg
from psycopg import errors as pg_errors
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from service.crowd import MAX_BATCH_HITS, CrowdParams
from service.crowd import questions as hit_questions
from service.crowd.decisions import (
    UNDECIDED,
    ClusterRow,
    QuestionVotes,
    Vote,
    activate_children,
    next_state,
)
from service.crowd.hits import (
    BUILD_LOCK_CLASS,
    CampaignInfo,
    Claim,
    SubmitResult,
    WorkerRow,
    campaign_info,
    needs_refill,
    new_public_id,
    refuse_lapsed_lease,
    refuse_unknown_questions,
    utcnow,
)
from service.crowd.quality import AssignmentStats, block_reason, judge
from service.db import Database
from service.engine.policy import PolicyParams
from service.models import (
    AssignmentStatus,
    Backend,
    ClusterState,
    QuestionKind,
    QuestionStatus,
)

__all__ = ["ClaimOutcome", "Fallback", "available", "claim", "submit"]


def available(owner: Session | Database) -> bool:
    """The fast paths speak PostgreSQL; every other database uses the portable code."""
    bind = owner.engine if isinstance(owner, Database) else owner.get_bind()
    return bind.dialect.name == "postgresql"


def _run(conn: psycopg.Connection, sql: str, params: dict[str, Any]) -> psycopg.Cursor:
    """Execute as a prepared statement (parsed and planned once per connection) with binary
    results. Arrays (a HIT's 55 answers, the counts of its few dozen clusters) travel as
    comma-separated strings the server splits: joining them is C code, where psycopg's array
    dumpers inspect and pack every element in Python."""
    return conn.execute(sql, params, prepare=True, binary=True)


def _joined(numbers: Iterable[int]) -> str:
    """Integers as the comma-separated text ``string_to_array(..., ',')::integer[]`` splits."""
    return ",".join(map(str, numbers))


# ------------------------------------------------------------------------------------- claim

_CLAIM = """
WITH w AS (
    SELECT id, project_id, backend, qualified, blocked, blocked_reason
    FROM workers WHERE token_hash = %(token_hash)s
),
ok AS (
    SELECT id, project_id, backend FROM w
    WHERE qualified AND NOT blocked AND project_id IS NOT NULL
),
mine AS (
    SELECT a.id, a.public_id, a.hit_id, a.lease_expires_at, a.answer_positions
    FROM assignments a JOIN ok ON a.worker_id = ok.id
    WHERE a.status = 'claimed'
    ORDER BY a.id LIMIT 1
),
lapsed AS (
    SELECT EXISTS (
        SELECT 1 FROM assignments WHERE status = 'claimed' AND lease_expires_at < %(now)s
    ) AS found
),
pick AS (
    -- Only narrow columns here: the candidates are sorted before one is locked, and carrying
    -- each one's payload (a few kB, compressed) through the sort cost more than the rest.
    -- ``x.worker_id + 0``: probe a worker's past assignments through the (hit_id, worker_id)
    -- unique index, never through the worker's index, whose entries grow by one per HIT the
    -- worker does (a plan cached while the table was small picked that one and went linear).
    SELECT h.id, h.lease_seconds, ok.id AS worker_id, c.id AS campaign_id,
        c.params::text AS params
    FROM ok
    JOIN campaigns c ON c.project_id = ok.project_id AND c.backend = ok.backend
        AND c.status IN ('running', 'exhausted')
    JOIN hits h ON h.campaign_id = c.id AND h.status = 'open' AND h.max_assignments = 1
    WHERE NOT EXISTS (SELECT 1 FROM mine)
      AND NOT (SELECT found FROM lapsed)
      AND NOT EXISTS (
          SELECT 1 FROM assignments x WHERE x.hit_id = h.id AND x.worker_id + 0 = ok.id
      )
    ORDER BY h.id
    LIMIT 1
    FOR UPDATE OF h SKIP LOCKED
),
taken AS (
    INSERT INTO assignments
        (hit_id, worker_id, public_id, status, lease_expires_at, gold_correct, gold_total)
    SELECT id, worker_id, %(public_id)s, 'claimed',
        %(now)s + lease_seconds * interval '1 second', 0, 0
    FROM pick
    RETURNING lease_expires_at
),
filled AS (
    UPDATE hits SET status = 'assigned' FROM pick WHERE hits.id = pick.id
)
SELECT w.id, w.project_id, w.backend, w.qualified, w.blocked, w.blocked_reason,
    (SELECT found FROM lapsed),
    mine.public_id,
    mine.lease_expires_at,
    (SELECT payload FROM hits WHERE id = mine.hit_id),
    (SELECT public_id FROM hits WHERE id = mine.hit_id),
    mine.answer_positions,
    (SELECT lease_expires_at FROM taken),
    (SELECT payload FROM hits WHERE id = (SELECT id FROM pick)),
    (SELECT campaign_id FROM pick),
    (SELECT params FROM pick),
    -- Counted only as far as a refill decision can need (``needs_refill``): a campaign may
    -- hold thousands of open HITs, and this runs on every claim.
    (SELECT count(*) FROM (
        SELECT 1 FROM hits o, pick WHERE o.campaign_id = pick.campaign_id AND o.status = 'open'
        LIMIT %(count_cap)s) AS open_hits),
    -- Is anyone building this campaign's next batch? Taking the build lock answers it, and the
    -- lock goes again when this (autocommitted) statement ends.
    (SELECT pg_try_advisory_xact_lock(%(build_lock)s::integer, campaign_id) FROM pick)
FROM w LEFT JOIN mine ON true
"""


@dataclass(frozen=True)
class ClaimOutcome:
    """What the claim statement found. ``claim`` is set when it served the request; otherwise
    ``worker`` (if the token is valid) goes to the portable :func:`service.crowd.hits.claim`,
    which refuses, sweeps or builds as needed. ``refill``: the campaign whose pool of open HITs
    this claim left low (:func:`service.crowd.hits.refill` should build its next batch)."""

    worker: WorkerRow | None
    claim: Claim | None
    refill: int | None = None


def claim(
    conn: psycopg.Connection, token_hash: str, *, now: datetime | None = None
) -> ClaimOutcome:
    """Serve a claim in one statement on ``conn``, a connection in autocommit mode (the
    thread's :meth:`~service.db.Database.autocommit_connection`), when an open HIT (or the
    worker's own claim) is there to take; see :class:`ClaimOutcome`.

    Autocommit, rather than BEGIN + statement + COMMIT sent in one pipeline, and no session:
    ``scripts/bench_request_overhead.py`` (``claim``) measured a one-statement write at 107 us of
    Python on a held autocommit connection, 319 through a session switched to autocommit, 541
    pipelined with its BEGIN and COMMIT.
    """
    now = now or utcnow()
    public_id = new_public_id()
    key = {
        "token_hash": token_hash,
        "now": now,
        "public_id": public_id,
        "build_lock": BUILD_LOCK_CLASS,
        # The claimed HIT is in the count (the statement's snapshot predates the claim), so
        # MAX_BATCH_HITS + 1 open HITs tell "no refill" apart for every allowed batch size.
        "count_cap": MAX_BATCH_HITS + 1,
    }
    row = _run(conn, _CLAIM, key).fetchone()
    if row is None:
        return ClaimOutcome(None, None)
    (wid, project_id, backend, qualified, blocked, reason, lapsed) = row[:7]
    (mine_public_id, mine_lease, mine_payload, mine_hit_public_id, answered) = row[7:12]
    (lease, payload, campaign_id, params, open_hits, build_free) = row[12:]
    worker = WorkerRow(wid, project_id, Backend(backend), qualified, blocked, reason)
    if mine_public_id is not None and not lapsed:
        given = sorted(answered or ())
        answered_ids = [hit_questions.public_id(mine_hit_public_id, p) for p in given]
        resumed = Claim(mine_public_id, _utc(mine_lease), mine_payload, answered_ids)
        return ClaimOutcome(worker, resumed)
    if lease is None:
        return ClaimOutcome(worker, None)
    # ``open_hits`` counted the HIT just taken (the statement's snapshot predates the claim).
    # While a batch is being built, every claim finds the pool low; asking for another build
    # then would only cost a transaction that finds the build lock taken (measured: about one
    # such attempt per HIT cycle at 16 workers), so only a claim that found the lock free asks.
    low = build_free and needs_refill(_crowd(params), open_hits - 1)
    return ClaimOutcome(
        worker, Claim(public_id, _utc(lease), payload, []), campaign_id if low else None
    )


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


# ------------------------------------------------------------------------------------ submit

# One statement: lock the assignment (``NOWAIT``) with its answers (:mod:`service.crowd.answers`)
# and read its HIT's questions, as arrays in the same row (one row of a few arrays converts faster
# than 55 rows). The lock is taken in a CTE, which PostgreSQL materialises, so the questions are
# read only for a row this transaction holds. The locked row is its newest version, even if a
# concurrent submission committed after this statement's snapshot was taken, so the answers read
# are all the answers stored: the submission appends exactly those it does not find.
_LOCK_AND_READ = """
WITH a AS (
    SELECT a.id, a.hit_id, a.status, a.lease_expires_at, h.max_assignments,
        w.id AS worker_id, w.gold_correct, w.gold_total, w.blocked,
        c.id AS campaign_id, c.project_id, c.round_id, c.backend, c.status AS campaign_status,
        c.reward_per_hit_micros, c.questions_per_hit, c.gold_per_hit, c.assignments_per_hit,
        c.params::text AS crowd_params, p.params::text AS policy_params,
        a.answer_positions, a.answer_values, a.answer_ms
    FROM assignments a
    JOIN workers w ON w.id = a.worker_id
    JOIN hits h ON h.id = a.hit_id
    JOIN campaigns c ON c.id = h.campaign_id
    JOIN projects p ON p.id = c.project_id
    WHERE a.public_id = %(public_id)s AND w.token_hash = %(token_hash)s
    FOR UPDATE OF a NOWAIT
)
SELECT a.id, a.hit_id, a.status, a.lease_expires_at, a.max_assignments,
    a.worker_id, a.gold_correct, a.gold_total, a.blocked,
    a.campaign_id, a.project_id, a.round_id, a.backend, a.campaign_status,
    a.reward_per_hit_micros, a.questions_per_hit, a.gold_per_hit, a.assignments_per_hit,
    a.crowd_params, a.policy_params,
    a.answer_positions, a.answer_values, a.answer_ms,
    h.public_id, h.question_statuses, h.question_cluster_ids,
    -- Gold questions' known answers, by position (NULL for samples).
    (SELECT array_agg(g.expected ORDER BY u.n)
     FROM unnest(h.question_gold_item_ids) WITH ORDINALITY AS u(gold_item_id, n)
     LEFT JOIN gold_items g ON g.id = u.gold_item_id),
    h.question_gold_item_ids
FROM a JOIN hits h ON h.id = a.hit_id
"""


# The new answers, appended to the assignment's arrays (the row is locked by ``_LOCK_AND_READ``
# and nothing in ``qids`` is stored yet).
_APPEND = """
    answer_positions = coalesce(answer_positions, '{}')
        || string_to_array(%(positions)s, ',')::integer[],
    answer_values = coalesce(answer_values, '{}') || string_to_array(%(vals)s, ',')::boolean[],
    answer_ms = coalesce(answer_ms, '{}') || string_to_array(%(ms)s, ',')::integer[]
"""
_APPEND_ANSWERS = f"UPDATE assignments SET {_APPEND} WHERE id = %(assignment_id)s::integer"

# Statement order follows the lock order every writer uses (assignment -- already locked --, HIT,
# worker, clusters in id order; the campaign comes in the next statement): each data-modifying
# CTE depends on the previous one, so PostgreSQL runs them in that order.
_COMPLETE = f"""
WITH judged AS (
    UPDATE assignments
    SET status = 'approved', submitted_at = %(now)s, gold_correct = %(gold_correct)s::integer,
        gold_total = %(gold_total)s::integer, decision_reason = %(reason)s, {_APPEND}
    WHERE id = %(assignment_id)s::integer
    RETURNING id
),
done AS (
    -- Its open questions are answered now (the only assignment's answers are their labels).
    UPDATE hits SET status = 'completed',
        question_statuses = ARRAY(
            SELECT CASE WHEN s = 'open' THEN 'answered' ELSE s END
            FROM unnest(question_statuses) WITH ORDINALITY AS x(s, n) ORDER BY n)
    WHERE id = %(hit_id)s::integer AND EXISTS (SELECT 1 FROM judged)
    RETURNING id
),
scored AS (
    UPDATE workers
    SET gold_correct = gold_correct + %(gold_correct)s::integer, gold_total = gold_total + %(gold_total)s::integer
    WHERE id = %(worker_id)s::integer AND EXISTS (SELECT 1 FROM done)
    RETURNING gold_correct, gold_total
),
locked AS (
    SELECT id FROM clusters
    WHERE id = ANY(string_to_array(%(cids)s, ',')::integer[])
        AND EXISTS (SELECT 1 FROM scored)
    ORDER BY id
    FOR UPDATE
),
counted AS (
    UPDATE clusters c SET
        yes_count = c.yes_count
            + CASE WHEN c.state IN ('candidate', 'active') THEN d.dy ELSE 0 END,
        no_count = c.no_count
            + CASE WHEN c.state IN ('candidate', 'active') THEN d.dn ELSE 0 END,
        open_questions = c.open_questions - d.closed
    FROM locked
    JOIN unnest(string_to_array(%(cids)s, ',')::integer[], string_to_array(%(dy)s, ',')::integer[],
                string_to_array(%(dn)s, ',')::integer[], string_to_array(%(dc)s, ',')::integer[])
        AS d(id, dy, dn, closed) ON d.id = locked.id
    WHERE c.id = locked.id
    RETURNING c.id, c.tree_id, c.parent_id, c.lo, c.hi, c.size, c.score, c.state,
        c.yes_count, c.no_count, c.open_questions
)
SELECT (SELECT gold_correct FROM scored), (SELECT gold_total FROM scored),
    (SELECT json_agg(json_build_array(id, tree_id, parent_id, lo, hi, size, score, state,
                                      yes_count, no_count, open_questions))
     FROM counted),
    -- For the rest of this transaction (``is_local``): the next statement, which writes the
    -- decided states and the money, would otherwise be re-planned on every call (its array
    -- parameters make the generic plan's estimate look worse than a custom one, though both are
    -- the same index probes): ~230 us of PostgreSQL per call (``bench_service.py
    -- --statements``). Set here rather than by a ``SET LOCAL`` statement of its own, which
    -- cost ~75-90 us more (``scripts/bench_request_overhead.py``).
    set_config('plan_cache_mode', 'force_generic_plan', true)
"""

_DECIDE_AND_PAY = """
WITH states AS (
    UPDATE clusters c
    SET state = d.state, decided_at = CASE WHEN d.decided THEN %(now)s::timestamptz END
    FROM unnest(string_to_array(%(cids)s, ',')::integer[], string_to_array(%(states)s, ','),
                string_to_array(%(decided)s, ',')::boolean[])
        AS d(id, state, decided)
    WHERE c.id = d.id
    RETURNING 1
),
moved AS (
    -- No "enough reserved" condition here: if the reservation were short (a bookkeeping bug),
    -- the table's CHECK (reserved_micros >= 0) fails the statement and the whole transaction.
    UPDATE campaigns
    SET reserved_micros = reserved_micros - %(amount)s::bigint,
        spent_micros = spent_micros + %(amount)s::bigint
    WHERE id = %(campaign_id)s::integer AND (SELECT count(*) FROM states) >= 0
    RETURNING id
),
ledger AS (
    INSERT INTO ledger_entries (campaign_id, hit_id, kind, amount_micros, note)
    SELECT id, %(hit_id)s::integer, 'spend', %(amount)s::bigint, %(note)s FROM moved
    RETURNING 1
)
SELECT (SELECT count(*) FROM states), (SELECT count(*) FROM ledger)
"""


class Fallback(Exception):
    """The fast path cannot serve this request: the caller runs the portable code in a fresh
    transaction (whatever this one did is rolled back)."""


@functools.lru_cache(maxsize=256)
def _crowd(crowd_json: str) -> CrowdParams:
    """A campaign's params, parsed and validated once per distinct JSON text."""
    return CrowdParams.from_dict(json.loads(crowd_json) or {})


@functools.lru_cache(maxsize=256)
def _policy(policy_json: str) -> PolicyParams:
    """A project's policy params, parsed and validated once per distinct JSON text."""
    return PolicyParams.from_dict(json.loads(policy_json) or {})


def _campaign(row: Sequence[Any]) -> CampaignInfo:
    return campaign_info(row, crowd=_crowd(row[9]), policy=_policy(row[10]))


_OPEN = QuestionStatus.OPEN.value
_SAMPLE, _GOLD = QuestionKind.SAMPLE, QuestionKind.GOLD
_CODES = hit_questions.POSITION_CODES


class _Question(NamedTuple):
    """One of the HIT's questions as the submission reads it (55 per submission: a tuple,
    cheaper to make than a frozen dataclass)."""

    id: int
    position: int
    kind: QuestionKind
    open: bool
    cluster_id: int | None
    expected: bool | None
    answer: tuple[bool, int] | None  # (value, ms) already stored


def submit(
    owner: Session | Connection,
    token_hash: str,
    assignment_public_id: str,
    answers: Sequence[tuple[str, bool, int]],
    *,
    now: datetime | None = None,
) -> SubmitResult:
    """Store ``(question public id, value, ms)`` answers and, if they complete the assignment,
    judge it, count it and pay for it -- in the caller's transaction, which the caller commits.

    ``owner``: a session, or a bare connection (the hot lane's: a session's own bookkeeping cost
    the lane more Python than the rest of its transaction's overhead, see
    :func:`_transaction_connection`); a session is made on the connection only for the rare
    paths that need one.

    Raises :class:`Fallback` (the caller rolls back and runs the portable code) when the token and
    assignment do not match or the assignment row is busy, :class:`CrowdError` for refusals.
    """
    now = now or utcnow()
    connection = _transaction_connection(owner)
    conn = connection.connection.driver_connection
    key = {"public_id": assignment_public_id, "token_hash": token_hash}
    try:
        # Not pipelined with its BEGIN: a pipeline saves the BEGIN's round trip but costs more
        # CPU than it saves on loopback (``scripts/bench_request_overhead.py``: 331 against 247
        # us of Python per transaction).
        head = _run(conn, _LOCK_AND_READ, key).fetchone()
    except pg_errors.LockNotAvailable:
        raise Fallback("the assignment is being written by another request") from None
    if head is None:
        raise Fallback("no such assignment for this token")  # the portable code says which
    assignment_id, hit_id, status, lease, max_assignments = head[:5]
    worker_id, worker_correct, worker_total, worker_blocked = head[5:9]
    status = AssignmentStatus(status)
    refuse_lapsed_lease(status, lease, now)
    given_positions, given_values, given_ms = head[20:23]
    given = {}
    if given_positions is not None:
        given = dict(zip(given_positions, zip(given_values, given_ms, strict=True), strict=True))
    hit_public_id, statuses, cluster_ids, expected, gold_ids = head[23:]
    questions: dict[str, _Question] = {}
    first = hit_id << hit_questions.POSITION_BITS
    for position, (qstatus, cluster_id, known, gold_id) in enumerate(
        zip(statuses, cluster_ids, expected or (), gold_ids, strict=True)
    ):
        questions[hit_public_id + _CODES[position]] = _Question(
            first | position,
            position,
            _SAMPLE if gold_id is None else _GOLD,
            qstatus == _OPEN,
            cluster_id,
            known,
            given.get(position),
        )
    refuse_unknown_questions(answers, questions)
    if status is not AssignmentStatus.CLAIMED:
        return SubmitResult(0, len(answers), True, assignment_id, hit_id, False)
    new: dict[str, tuple[bool, int]] = {}
    for pid, value, ms in answers:
        if questions[pid].answer is None and pid not in new:
            new[pid] = (value, ms)
    complete = len(given) + len(new) >= len(questions)
    rows = {
        "assignment_id": assignment_id,
        "worker_id": worker_id,
        # A HIT's answers travel as three comma-separated strings: joining them is C code, where
        # psycopg's array dumper would loop over 55 values in Python for each array.
        "positions": _joined(questions[pid].position for pid in new),
        "vals": ",".join("t" if v else "f" for v, _ in new.values()),
        "ms": ",".join(str(m) for _, m in new.values()),
    }
    if not complete:
        if new:
            _run(conn, _APPEND_ANSWERS, rows)
        return SubmitResult(len(new), len(answers) - len(new), False, assignment_id, hit_id, False)
    campaign = _campaign(head[9:20])
    stats = _stats(questions, new)
    approved, reason = judge(stats, campaign.crowd)
    correct, total = worker_correct + stats.gold_correct, worker_total + stats.gold_total
    simple = (
        max_assignments == 1
        and approved
        and not worker_blocked
        and block_reason(correct, total, campaign.crowd) is None
    )
    if not simple:
        return _complete_portably(owner, conn, rows, questions, new, answers, hit_id, now)
    _complete(conn, connection, campaign, rows, questions, new, stats, reason, hit_id, now)
    return SubmitResult(len(new), len(answers) - len(new), True, assignment_id, hit_id, True)


def _transaction_connection(owner: Session | Connection) -> Connection:
    """The connection whose transaction the submission runs in. A bare connection's transaction
    is begun here, so that the caller's commit reaches the database (SQLAlchemy commits only a
    transaction it began, and the statements below go to the driver directly).

    Why a bare connection at all: per submission-shaped transaction (three statements and the
    commit), ``scripts/bench_request_overhead.py`` (``submit``) measured 398 us of Python and
    210 of PostgreSQL through a request's session, 230 and 150 on a connection checked out of
    the pool, 145 and 130 on a driver connection held outright."""
    if isinstance(owner, Session):
        return owner.connection()
    if not owner.in_transaction():
        owner.begin()
    return owner


def _stats(questions: dict[str, _Question], new: dict[str, tuple[bool, int]]) -> AssignmentStats:
    """Answer count, time and gold score of the whole assignment (stored answers plus new ones)."""
    count = total_ms = gold_total = gold_correct = 0
    for pid, q in questions.items():
        if q.answer is not None:
            value, ms = q.answer
        elif pid in new:
            value, ms = new[pid]
        else:
            continue
        count += 1
        total_ms += ms
        if q.kind is QuestionKind.GOLD and q.expected is not None:
            gold_total += 1
            gold_correct += value == q.expected
    return AssignmentStats(count, total_ms, gold_total, gold_correct)


def _complete(
    conn: psycopg.Connection,
    connection: Connection,
    campaign: CampaignInfo,
    rows: dict[str, Any],
    questions: dict[str, _Question],
    new: dict[str, tuple[bool, int]],
    stats: AssignmentStats,
    reason: str,
    hit_id: int,
    now: datetime,
) -> None:
    """Approve a single-assignment HIT: its one vote per question is the label (what
    :func:`~service.crowd.decisions.aggregate_hit` concludes for one voter)."""
    deltas: dict[int, list[int]] = {}
    for pid, q in questions.items():
        if not q.open or q.kind is not QuestionKind.SAMPLE:
            continue
        value = q.answer[0] if q.answer is not None else new[pid][0]
        delta = deltas.setdefault(int(q.cluster_id), [0, 0, 0])
        delta[0 if value else 1] += 1
        delta[2] += 1
    cids = sorted(deltas)
    params = dict(
        rows,
        now=now,
        hit_id=hit_id,
        gold_correct=stats.gold_correct,
        gold_total=stats.gold_total,
        reason=reason,
        cids=_joined(cids),
        dy=_joined(deltas[c][0] for c in cids),
        dn=_joined(deltas[c][1] for c in cids),
        dc=_joined(deltas[c][2] for c in cids),
    )
    _, worker_total, counted, _ = _run(conn, _COMPLETE, params).fetchone()
    if worker_total is None:
        raise Fallback("the assignment changed under the submission")
    changed, splits = _decide(counted or [], campaign.policy)
    if splits:
        activate_children(connection, splits, campaign.policy, now)
    share = campaign.assignment_cost
    params = {
        "cids": _joined(c.id for c in changed),
        "states": ",".join(c.state.value for c in changed),
        "decided": ",".join("f" if c.state in UNDECIDED else "t" for c in changed),
        "now": now,
        "campaign_id": campaign.id,
        "amount": share,
        "hit_id": hit_id,
        "note": f"assignment {rows['assignment_id']} approved",
    }
    # The campaign row is the hottest lock of all: it is taken in the transaction's last
    # statement, and the commit follows at once. (The caller's own commit afterwards finds
    # nothing left to do.) Not in one psycopg pipeline with the commit: entering and leaving
    # pipeline mode costs the web process more CPU than the round trip it saves (a statement
    # plus commit, 100 calls: 0.31-0.45 ms of client CPU per call pipelined, 0.25-0.29 plain).
    _run(conn, _DECIDE_AND_PAY, params)
    conn.commit()


def _decide(
    counted: list[list[Any]], policy: PolicyParams
) -> tuple[list[ClusterRow], list[ClusterRow]]:
    """The clusters whose state changes with their new counts, and those among them that split
    (their children are activated before the transaction ends)."""
    changed, splits = [], []
    for values in counted:
        cluster = ClusterRow.of(values)
        if cluster.state not in UNDECIDED:
            continue  # decided earlier: late answers are kept but change nothing
        state = next_state(cluster, policy)
        if state is not cluster.state:
            cluster.state = state
            changed.append(cluster)
            if state in (ClusterState.SPLIT, ClusterState.AUTO_SPLIT):
                splits.append(cluster)
    return changed, splits


def _complete_portably(
    owner: Session | Connection,
    conn: psycopg.Connection,
    rows: dict[str, Any],
    questions: dict[str, _Question],
    new: dict[str, tuple[bool, int]],
    answers: Sequence[tuple[str, bool, int]],
    hit_id: int,
    now: datetime,
) -> SubmitResult:
    """Store the answers, then let :func:`~service.crowd.quality.finalize_assignment` judge the
    assignment (rejection, blocking, redundancy) in the same transaction."""
    from service.crowd.quality import finalize_assignment

    if new:
        _run(conn, _APPEND_ANSWERS, rows)
    assignment_id, worker_id = rows["assignment_id"], rows["worker_id"]
    votes: dict[int, QuestionVotes] = {}
    for pid, q in questions.items():
        if not q.open:
            continue
        entry = votes[q.id] = QuestionVotes(q.cluster_id, q.kind, q.expected, [])
        if q.answer is not None:
            value, ms = q.answer
            entry.votes.append(Vote(worker_id, bool(value), assignment_id, ms))
        elif pid in new:
            value, ms = new[pid]
            entry.votes.append(Vote(worker_id, value, assignment_id, ms))
    with _session_on(owner) as session:
        finalize_assignment(session, assignment_id, hit_id, worker_id, votes=votes, now=now)
    return SubmitResult(len(new), len(answers) - len(new), True, assignment_id, hit_id, True)


@contextmanager
def _session_on(owner: Session | Connection) -> Iterator[Session]:
    """``owner`` if it is a session; else a session joined to the connection's transaction,
    which stays the caller's to commit or roll back (``rollback_only``: the session's commit
    would only flush, and closing it leaves the transaction as it is)."""
    if isinstance(owner, Session):
        yield owner
        return
    session = Session(bind=owner, join_transaction_mode="rollback_only")
    try:
        yield session
        session.flush()
    finally:
        session.close()
