"""HITs: building them from the best candidate clusters, claiming them, answering, leases.

Building (:func:`build_hits`): the highest-score ``candidate`` clusters of the campaign's project
are locked with ``SELECT ... FOR UPDATE SKIP LOCKED`` (concurrent builders take disjoint clusters
and never wait on each other), the policy says how many more answers each needs, fresh leaf
positions are sampled, the samples are shuffled within groups of ``hits_per_build`` HITs of
``questions_per_hit`` and dealt into them, hidden gold is added to each, every HIT gets a random
public id (its questions' public ids are it plus their positions), the HITs are inserted with their
questions as arrays of their rows (:mod:`service.crowd.questions`) and the payload a worker will
receive serialised onto them, the batch's render job is recorded (it pre-renders the overlays the
questions show; dispatched to the job runner once the caller commits) and the HITs' cost is
reserved -- all in one savepoint, so a HIT exists exactly when its money is reserved. The
reservation is the last statement, so the hot campaign row is locked only briefly. The randomness
of a build comes from the operating system, or from a seed (:func:`seeded_sampling`) when a test or
an experiment must be reproducible.

When HITs are built: a claim that finds none open builds ``build_batch_hits`` of them; on
PostgreSQL it does so under a per-campaign advisory lock, so one request builds and the others
wait for it and take its HITs instead of building more. A claim that leaves less than a batch open
asks for the next batch to be built once its response is sent (:func:`refill`), so in a running
campaign claims find HITs ready and the building cost is paid off the request's critical path.

Claiming (:func:`claim`): ``SELECT ... FROM hits WHERE status = 'open' ... FOR UPDATE SKIP LOCKED
LIMIT 1``, so two workers never receive the same HIT slot; a claim is an assignment with a lease.
Expired leases hand their HIT back: swept on every claim, and by :func:`sweep`, which a periodic
job calls (it also retires HITs past their lifetime).

Answering (:func:`record_answers`): the assignment row locked with its answers
(:mod:`service.crowd.answers`), one read of the HIT's questions (arrays of its row), one update
of the row; quality control and decisions follow in :mod:`service.crowd.quality` when the
assignment is complete.

This module is the portable implementation (PostgreSQL and SQLite) and handles every case;
:mod:`service.crowd.fastpath` serves the common claim and submission on PostgreSQL in fewer round
trips and hands anything unusual back to it.

Performance: hot statements are built once at import with bind parameters (building a SQLAlchemy
statement per call costs more Python time than executing it), a build's rows travel to PostgreSQL
as one value list per column (``unnest``), and nothing is done per question in a round trip.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from sqlalchemy import and_, bindparam, event, func, insert, or_, select, update
from sqlalchemy.orm import Session

from service.crowd import CrowdError, CrowdParams, money
from service.crowd import answers as stored_answers
from service.crowd import questions as hit_questions
from service.crowd.decisions import (
    CLUSTER_COLUMNS,
    ClusterRow,
    QuestionVotes,
    Vote,
    ancestors,
    closed_counts,
    discard_answers,
    settle,
    zero_counts,
)
from service.engine.policy import Action, PolicyParams, decide, sample_positions
from service.models import (
    Assignment,
    AssignmentStatus,
    Backend,
    Campaign,
    CampaignStatus,
    Cluster,
    ClusterState,
    GoldItem,
    Hit,
    HitStatus,
    Job,
    JobStatus,
    Project,
    ProjectClass,
    QuestionKind,
    QuestionStatus,
    Tree,
)

if TYPE_CHECKING:
    import psycopg

    from service.settings import Settings

__all__ = [
    "RENDER_JOB",
    "CampaignInfo",
    "Claim",
    "SubmitResult",
    "WorkerRow",
    "active_campaigns",
    "build_hit",
    "build_hits",
    "claim",
    "driver_connection",
    "encode_payload",
    "load_campaign",
    "lock_hit",
    "needs_refill",
    "new_public_id",
    "question_payload",
    "record_answers",
    "refill",
    "refuse_lapsed_lease",
    "refuse_unknown_questions",
    "render_job_id",
    "retire_hits",
    "sampling_rng",
    "seeded_sampling",
    "sweep",
    "sweep_leases",
    "utcnow",
]

_C = Campaign.__table__
_P = Project.__table__
_H = Hit.__table__
_AS = Assignment.__table__
_CL = Cluster.__table__
_G = GoldItem.__table__
_T = Tree.__table__
_PC = ProjectClass.__table__
_J = Job.__table__

log = logging.getLogger(__name__)

#: Statuses whose campaigns still hand out already-reserved HITs. An ``exhausted`` campaign builds
#: no new HIT but its open ones are paid for, so they are still offered.
OFFERING = (CampaignStatus.RUNNING, CampaignStatus.EXHAUSTED)
#: Assignment statuses that hold a slot of their HIT.
_LIVE = (
    AssignmentStatus.CLAIMED,
    AssignmentStatus.SUBMITTED,
    AssignmentStatus.APPROVED,
    AssignmentStatus.REJECTED,
)
_SWEEP_BATCH = 1000
_PUBLIC_ID = r"[A-Za-z0-9_-]+"
_PUBLIC_ID_SAFE = re.compile(_PUBLIC_ID)
#: Comma-separated public ids, checked in one match (a build encodes hundreds).
_PUBLIC_IDS_SAFE = re.compile(rf"{_PUBLIC_ID}(?:,{_PUBLIC_ID})*")
_LEASE_EXPIRED = "lease expired before the HIT was done"
#: Reservation races lost in a row before a claim gives up building (it answers ``no_work``).
_BUILD_ATTEMPTS = 3


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """SQLite hands timestamps back without a zone; every timestamp we store is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


#: The generator HIT builds draw from when their caller passes none: set only by
#: :func:`seeded_sampling`. A context variable rather than a module global, so a seed set for one
#: thread (a test, an experiment) never leaks into requests served by other threads.
_SEEDED_RNG: ContextVar[np.random.Generator | None] = ContextVar(
    "maskmill_sampling_rng", default=None
)


def sampling_rng() -> np.random.Generator:
    """The randomness of a HIT build (sampled leaf positions, the shuffles, the hidden gold):
    fresh from the operating system's entropy in production, so nobody can predict which masks
    or gold items a campaign will show; inside :func:`seeded_sampling`, its seeded generator."""
    seeded = _SEEDED_RNG.get()
    return seeded if seeded is not None else np.random.default_rng()


@contextmanager
def seeded_sampling(seed: int) -> Iterator[np.random.Generator]:
    """Make every HIT build in this context (and thread) draw from one generator seeded with
    ``seed``, so a whole campaign -- built on demand by claims over HTTP, where no caller can pass
    an ``rng`` -- is reproducible. For tests and experiments; public ids stay random whatever the
    seed (they are the questions' unguessable names, not part of the sampling)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"sampling seed must be an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(seed)
    token = _SEEDED_RNG.set(rng)
    try:
        yield rng
    finally:
        _SEEDED_RNG.reset(token)


def new_public_id() -> str:
    """Unguessable, and the same shape for every kind of question and assignment."""
    return new_public_ids(1)[0]


#: A public id: a millisecond clock (6 bytes), then 96 random bits (12 bytes: unguessable).
#: Both parts are whole base64 groups (8 and 16 characters, no padding), so the ids of a build are
#: one encoding of one read of the random source, cut into pieces (a build makes hundreds).
_CLOCK_BYTES = 6
_RANDOM_BYTES = 12
_RANDOM_CHARS = _RANDOM_BYTES // 3 * 4


def new_public_ids(count: int) -> list[str]:
    """``count`` public ids of 24 URL-safe characters (a build's HITs, a claim's assignment).

    Each starts with the current millisecond (big-endian, the first 8 characters), so the ids made
    at about the same time sit together in the unique indexes instead of at random places in
    them (``scripts/bench_question_indexes.py`` measured what that saved when every question had
    an id of its own, before migration 0006). The clock says only when a HIT was built; a
    question's public id is its HIT's plus its position, and the positions are shuffled before
    the HIT is stored, so ids reveal nothing the payload does not."""
    clock = (time.time_ns() // 1_000_000).to_bytes(_CLOCK_BYTES, "big")
    prefix = base64.urlsafe_b64encode(clock).decode("ascii")
    random = base64.urlsafe_b64encode(secrets.token_bytes(_RANDOM_BYTES * count)).decode("ascii")
    return [prefix + random[i : i + _RANDOM_CHARS] for i in range(0, len(random), _RANDOM_CHARS)]


def image_url(public_id: str) -> str:
    return f"/media/q/{public_id}.jpg"


def encode_payload(questions: Sequence[tuple[str, str]]) -> str:
    """The JSON a worker receives for ``(public id, class name)`` questions, in order.

    Every kind of question has the same three keys (sorted, as Flask's ``jsonify`` would write
    them) and an image URL made from its public id alone, so nothing in it tells gold apart.
    Written by formatting rather than ``json.dumps`` of dicts (a build encodes hundreds): public
    ids are URL-safe base64 and need no escaping, class names are encoded once each.
    """
    names: dict[str, str] = {}
    items = []
    joined = ",".join(pid for pid, _ in questions)
    if questions and not (
        joined.count(",") == len(questions) - 1 and _PUBLIC_IDS_SAFE.fullmatch(joined)
    ):
        unsafe = next(pid for pid, _ in questions if not _PUBLIC_ID_SAFE.fullmatch(pid))
        raise ValueError(f"not a public id: {unsafe!r}")
    for pid, name in questions:
        encoded = names.get(name) or names.setdefault(name, json.dumps(name))
        # The URL is image_url(pid), written out: a function call per question cost a tenth of
        # the encoding.
        items.append(f'{{"class_name":{encoded},"id":"{pid}","image_url":"/media/q/{pid}.jpg"}}')
    return "[" + ",".join(items) + "]"


# ------------------------------------------------------------------------------ campaigns


@dataclass(frozen=True)
class CampaignInfo:
    """What the crowd code needs of a campaign: immutable settings plus the status when read."""

    id: int
    project_id: int
    round_id: int | None
    backend: Backend
    status: CampaignStatus
    reward_micros: int
    questions_per_hit: int
    gold_per_hit: int
    assignments_per_hit: int
    crowd: CrowdParams
    policy: PolicyParams

    @property
    def hit_cost(self) -> int:
        return money.hit_cost(self.reward_micros, self.assignments_per_hit, self.backend)

    @property
    def assignment_cost(self) -> int:
        return money.assignment_cost(self.reward_micros, self.assignments_per_hit, self.backend)


_CAMPAIGN_COLUMNS = (
    _C.c.id,
    _C.c.project_id,
    _C.c.round_id,
    _C.c.backend,
    _C.c.status,
    _C.c.reward_per_hit_micros,
    _C.c.questions_per_hit,
    _C.c.gold_per_hit,
    _C.c.assignments_per_hit,
    _C.c.params,
    _P.c.params,
)


def campaign_info(
    row: Sequence, crowd: CrowdParams | None = None, policy: PolicyParams | None = None
) -> CampaignInfo:
    """A campaign row (``_CAMPAIGN_COLUMNS`` order) as a :class:`CampaignInfo`; callers that cache
    parsed params pass them instead of parsing the JSON columns again."""
    return CampaignInfo(
        id=row[0],
        project_id=row[1],
        round_id=row[2],
        backend=Backend(row[3]),
        status=CampaignStatus(row[4]),
        reward_micros=row[5],
        questions_per_hit=row[6],
        gold_per_hit=row[7],
        assignments_per_hit=row[8],
        crowd=crowd if crowd is not None else CrowdParams.from_dict(row[9] or {}),
        policy=policy if policy is not None else PolicyParams.from_dict(row[10] or {}),
    )


# Hot statements are built once, at import, with bind parameters (see the module doc).
_CAMPAIGN_FROM = _C.join(_P, _P.c.id == _C.c.project_id)
_LOAD_CAMPAIGN = (
    select(*_CAMPAIGN_COLUMNS).select_from(_CAMPAIGN_FROM).where(_C.c.id == bindparam("cid"))
)
_ACTIVE_CAMPAIGNS = (
    select(*_CAMPAIGN_COLUMNS)
    .select_from(_CAMPAIGN_FROM)
    .where(
        _C.c.project_id == bindparam("pid"),
        _C.c.backend == bindparam("backend"),
        _C.c.status.in_(OFFERING),
    )
    .order_by(_C.c.id)
)
_LOCK_HIT = (
    select(_H.c.max_assignments, *_CAMPAIGN_COLUMNS)
    .select_from(_H.join(_CAMPAIGN_FROM, _C.c.id == _H.c.campaign_id))
    .where(_H.c.id == bindparam("hid"))
    .with_for_update(of=_H)
)


def lock_hit(session: Session, hit_id: int) -> tuple[int, CampaignInfo]:
    """Lock a HIT row and read its ``max_assignments`` and its campaign, in one statement."""
    row = session.execute(_LOCK_HIT, {"hid": hit_id}).one()
    return int(row[0]), campaign_info(row[1:])


def load_campaign(session: Session, campaign_id: int) -> CampaignInfo:
    row = session.execute(_LOAD_CAMPAIGN, {"cid": campaign_id}).first()
    if row is None:
        raise ValueError(f"campaign {campaign_id} does not exist")
    return campaign_info(row)


def active_campaigns(session: Session, project_id: int, backend: Backend) -> list[CampaignInfo]:
    """The project's campaigns that may offer work to a worker of ``backend``, oldest first."""
    rows = session.execute(_ACTIVE_CAMPAIGNS, {"pid": project_id, "backend": backend.value}).all()
    return [campaign_info(r) for r in rows]


# -------------------------------------------------------------------------------- building


class _NoHit(Exception):
    """Abort a HIT under construction (its savepoint rolls back)."""


class _Sample(NamedTuple):
    cluster_id: int
    tree_id: int
    leaf_pos: int


class _NewHit(NamedTuple):
    """A HIT being built: its public id, its questions column by column, in the HIT's order (a
    question's position is its index), and the payload its worker will receive. A build makes
    hundreds of questions: columns cost less than a tuple per question, and they are the arrays
    the insert sends."""

    public_id: str
    cluster_ids: list[int | None]
    tree_ids: list[int | None]
    leaf_pos: list[int | None]
    gold_item_ids: list[int | None]
    payload: str


@dataclass
class _Plan:
    samples: list[_Sample] = field(default_factory=list)


def _candidates(
    session: Session, campaign: CampaignInfo, limit: int, exclude: list[int]
) -> list[ClusterRow]:
    """The best candidates nobody else is building with (``SKIP LOCKED``), locked for us."""
    query = select(*CLUSTER_COLUMNS).where(
        _CL.c.project_id == campaign.project_id, _CL.c.state == ClusterState.CANDIDATE
    )
    if campaign.round_id is not None:
        query = query.where(
            _CL.c.tree_id.in_(select(_T.c.id).where(_T.c.round_id == campaign.round_id))
        )
    if exclude:
        query = query.where(_CL.c.id.not_in(exclude))
    # Ties in score (equal-scored leaves are common) are broken by id, so the same state always
    # yields the same candidates in the same order: a seeded build is then reproducible.
    query = (
        query.order_by(_CL.c.score.desc(), _CL.c.id).limit(limit).with_for_update(skip_locked=True)
    )
    return [ClusterRow.of(r) for r in session.execute(query).all()]


def _asked_positions(
    session: Session, clusters: list[ClusterRow], reuse: bool
) -> dict[int, set[int]]:
    """Leaf positions a cluster must not be asked about again: its own questions that are not
    discarded and, when answers are reused, its ancestors' answered questions in its range (those
    are already in its counts)."""
    if not clusters:
        return {}
    chains = (
        ancestors(session, [c.id for c in clusters if c.parent_id is not None]) if reuse else {}
    )
    wanted = {c.id for c in clusters}.union(*chains.values())
    by_cluster: dict[int, list[tuple[int, QuestionStatus]]] = {}
    for q in hit_questions.of_clusters(session, wanted):
        if q.status is not QuestionStatus.DISCARDED:
            by_cluster.setdefault(q.cluster_id, []).append((int(q.leaf_pos), q.status))
    out: dict[int, set[int]] = {}
    for c in clusters:
        taken = {pos for pos, _ in by_cluster.get(c.id, ())}
        for ancestor in chains.get(c.id, ()):
            taken.update(
                pos
                for pos, status in by_cluster.get(ancestor, ())
                if status is QuestionStatus.ANSWERED and c.lo <= pos < c.hi
            )
        out[c.id] = taken
    return out


def _plan_samples(
    session: Session, campaign: CampaignInfo, room: int, rng: np.random.Generator, now: datetime
) -> _Plan:
    """Draw up to ``room`` sample questions from the best candidates, as many as each needs.

    A cluster that needs more answers than there is room for gets what fits; after those are
    answered the policy asks again for the rest (the decision waits, it does not change).
    """
    policy = campaign.policy
    plan = _Plan()
    seen: list[int] = []
    while room > 0:
        batch = _candidates(session, campaign, math.ceil(room / policy.n_s) + 1, seen)
        if not batch:
            break
        seen.extend(c.id for c in batch)
        needs, settled = [], []
        for c in batch:
            decision = decide(c.score, c.size, c.yes, c.no, policy)
            if decision.action is Action.ASK:
                needs.append((c, decision.more))
            else:
                settled.append(c.id)
        if settled:
            # Decidable without a question (e.g. inherited answers suffice): decide now; any
            # children it activates are found by the next batch.
            settle(session, zero_counts(settled), policy, now)
        asked = _asked_positions(
            session,
            [c for c, _ in needs if c.yes + c.no > 0],
            policy.reuse_parent_answers,
        )
        for c, more in needs:
            if room == 0:
                break
            k = min(more, room)
            positions = sample_positions(c.lo, c.hi, k, rng, exclude=asked.get(c.id, ()))
            plan.samples.extend(_Sample(c.id, c.tree_id, p) for p in positions.tolist())
            room -= k
    return plan


_GOLD_POOL = (
    select(_G.c.id, _PC.c.name)
    .join(_PC, _PC.c.id == _G.c.class_id)
    .where(_G.c.project_id == bindparam("pid"), _G.c.for_qualification.is_(False))
    .order_by(_G.c.id)
)
_TREE_CLASSES = (
    select(_T.c.id, _PC.c.name)
    .join(_PC, _PC.c.id == _T.c.class_id)
    .where(_T.c.id.in_(bindparam("ids", expanding=True)))
)


def _gold_pool(session: Session, campaign: CampaignInfo) -> list[tuple[int, str]]:
    """Every hidden-gold item of the project with its class name, in id order.

    Each HIT draws its gold from this pool with the build's generator, so a seeded build
    (:func:`seeded_sampling`) shows the same gold every time; the database's ``ORDER BY
    random()`` could not be seeded. The pool is the project's small ground-truth set (tens to a
    few thousand rows), read once per batch of HITs.
    """
    if campaign.gold_per_hit == 0:
        return []
    rows = session.execute(_GOLD_POOL, {"pid": campaign.project_id}).all()
    return [(int(r[0]), r[1]) for r in rows]


def _hit_questions(
    samples: list[_Sample],
    gold: list[tuple[int, str]],
    class_of_tree: dict[int, str],
    rng: np.random.Generator,
    hit_public_id: str,
) -> _NewHit:
    """One HIT's questions and its payload: samples and gold in a random order, each with the
    HIT's public id and its position as public id."""
    blank = [None] * len(gold)
    no_gold = [None] * len(samples)
    columns = (
        [s.cluster_id for s in samples] + blank,
        [s.tree_id for s in samples] + blank,
        [s.leaf_pos for s in samples] + blank,
        no_gold + [gold_id for gold_id, _ in gold],
        [class_of_tree[s.tree_id] for s in samples] + [name for _, name in gold],
    )
    order = rng.permutation(len(columns[0])).tolist()
    cluster_ids, tree_ids, leaf_pos, gold_ids, names = (
        [column[i] for i in order] for column in columns
    )
    ids = [hit_public_id + code for code in hit_questions.POSITION_CODES[: len(order)]]
    payload = encode_payload(list(zip(ids, names, strict=True)))
    return _NewHit(hit_public_id, cluster_ids, tree_ids, leaf_pos, gold_ids, payload)


def build_hits(
    session: Session,
    campaign: CampaignInfo,
    count: int | None = None,
    *,
    rng: np.random.Generator | None = None,
    now: datetime | None = None,
) -> list[int]:
    """Build and reserve up to ``count`` HITs (default ``hits_per_build``) in one go.

    Fewer are built when the budget or the candidates run short; ``[]`` when there is no money
    (the campaign becomes ``exhausted``) or nothing to ask (``finished`` if nothing is in flight
    either). Runs in a savepoint of the caller's transaction: if the reservation fails (another
    request took the money meanwhile) nothing of the HITs remains.
    """
    rng = rng if rng is not None else sampling_rng()
    now = now or utcnow()
    count = campaign.crowd.hits_per_build if count is None else count
    cost = campaign.hit_cost
    jobs_to = _job_settings()
    for _ in range(_BUILD_ATTEMPTS):
        funds = money.funds(session, campaign.id)
        if funds.status is not CampaignStatus.RUNNING:
            return []
        affordable = count if cost == 0 else min(count, funds.available // cost)
        if affordable < 1:
            money.mark_exhausted(session, campaign.id, cost)
            return []
        try:
            with session.begin_nested():
                hit_ids = _build_in_savepoint(
                    session, campaign, affordable, rng, now, render=jobs_to is not None
                )
        except _NoHit:
            # A concurrent build took part of the money first: size the batch again.
            continue
        if not hit_ids:
            _finish_if_done(session, campaign)
        elif jobs_to is not None:
            _dispatch_after_commit(session, jobs_to, render_job_id(hit_ids))
        return hit_ids
    return []


_OPEN_HITS = select(func.count()).where(
    _H.c.campaign_id == bindparam("cid"), _H.c.status == HitStatus.OPEN
)


def needs_refill(crowd: CrowdParams, open_hits: int) -> bool:
    """Whether a campaign with ``open_hits`` open HITs should build its next batch now: as soon
    as less than a batch is left, so a whole batch is still there to claim while the next one is
    built (claims never wait for a build unless the workers outrun the builder)."""
    return open_hits < crowd.build_batch_hits


def refill(
    session: Session,
    campaign_id: int,
    *,
    rng: np.random.Generator | None = None,
    now: datetime | None = None,
) -> list[int]:
    """Build the campaign's next batch ahead of demand, if it is running low and no one else is
    building it (PostgreSQL: a try-lock on the build lock, so concurrent refills do not pile up;
    SQLite serialises writers anyway). The caller commits. Returns the HITs built."""
    if _postgres(session):
        locked = session.execute(
            select(func.pg_try_advisory_xact_lock(BUILD_LOCK_CLASS, campaign_id))
        ).scalar_one()
        if not locked:
            return []
    campaign = load_campaign(session, campaign_id)
    if campaign.status is not CampaignStatus.RUNNING:
        return []
    open_hits = session.execute(_OPEN_HITS, {"cid": campaign_id}).scalar_one()
    if not needs_refill(campaign.crowd, open_hits):
        return []
    return build_hits(session, campaign, campaign.crowd.build_batch_hits, rng=rng, now=now)


def build_hit(
    session: Session,
    campaign: CampaignInfo,
    *,
    rng: np.random.Generator | None = None,
    now: datetime | None = None,
) -> int | None:
    """Build and reserve a single HIT; ``None`` when there is no money or nothing to ask."""
    built = build_hits(session, campaign, 1, rng=rng, now=now)
    return built[0] if built else None


def _build_in_savepoint(
    session: Session,
    campaign: CampaignInfo,
    count: int,
    rng: np.random.Generator,
    now: datetime,
    *,
    render: bool,
) -> list[int]:
    """The new HITs' ids, ``[]`` when no candidate needs a question (decisions taken on the way
    are kept); raises :class:`_NoHit` when the reservation fails (everything rolls back).
    ``render``: also record the job that pre-renders the batch's overlays (one more statement).

    The samples (in priority order) are cut into groups of ``hits_per_build`` HITs, shuffled within
    each group and dealt into its HITs, so a cluster's questions spread over several HITs and
    workers (as in the paper's live rounds) and a HIT's questions come from a few clusters.
    """
    per_hit = campaign.questions_per_hit
    plan = _plan_samples(session, campaign, count * per_hit, rng, now)
    if not plan.samples:
        return []
    group = campaign.crowd.hits_per_build * per_hit
    groups = []
    for start in range(0, len(plan.samples), group):
        part = plan.samples[start : start + group]
        part = [part[i] for i in rng.permutation(len(part)).tolist()]
        groups.append([part[i : i + per_hit] for i in range(0, len(part), per_hit)])
    # HITs are claimed in id order: dealing the groups' HITs round-robin means HITs claimed (and
    # so answered) at about the same time come from different groups and share no cluster, so
    # their submissions do not queue for the same cluster rows.
    chunks = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
    class_of_tree = dict(
        session.execute(_TREE_CLASSES, {"ids": sorted({s.tree_id for s in plan.samples})}).all()
    )
    gold_pool = _gold_pool(session, campaign)
    hits: list[_NewHit] = []
    hit_public_ids = new_public_ids(len(chunks))
    for chunk, hit_public_id in zip(chunks, hit_public_ids, strict=True):
        take = min(campaign.gold_per_hit, len(gold_pool))
        gold = [gold_pool[i] for i in rng.choice(len(gold_pool), size=take, replace=False)]
        hits.append(_hit_questions(chunk, gold, class_of_tree, rng, hit_public_id))
    hit_ids = _insert_hits(session, campaign, hits, now)
    opened: dict[int, int] = {}
    holders: dict[int, list[int]] = {}
    for hit, hit_id in zip(hits, hit_ids, strict=True):
        for cluster_id in hit.cluster_ids:
            if cluster_id is not None:
                opened[cluster_id] = opened.get(cluster_id, 0) + 1
                held = holders.setdefault(cluster_id, [])
                if not held or held[-1] != hit_id:
                    held.append(hit_id)
    _open_questions(session, opened, holders)
    if render:
        _record_render_job(session, campaign, hit_ids)
    if not money.reserve(
        session, campaign.id, campaign.hit_cost, hit_ids, next_hit_cost=campaign.hit_cost
    ):
        raise _NoHit
    return hit_ids


_PG_OPEN_QUESTIONS = (
    "UPDATE clusters c SET state = 'active', open_questions = c.open_questions + d.k, "
    "sample_hit_ids = coalesce(c.sample_hit_ids, '{}') || string_to_array(d.hits, ',')::integer[] "
    "FROM unnest(%(ids)b::integer[], %(ks)b::integer[], %(hits)b::text[]) AS d(id, k, hits) "
    "WHERE c.id = d.id"
)
_OPEN_QUESTIONS = (
    update(_CL)
    .where(_CL.c.id == bindparam("cid"))
    .values(
        state=ClusterState.ACTIVE,
        open_questions=_CL.c.open_questions + bindparam("k"),
        sample_hit_ids=bindparam("hits"),
    )
)


def _open_questions(
    session: Session, opened: dict[int, int], holders: dict[int, list[int]]
) -> None:
    """Clusters that got questions become ``active`` with that many more open questions, and
    list the HITs that hold them (their rows are already locked by :func:`_candidates`). One
    statement on PostgreSQL."""
    ids = sorted(opened)
    if _postgres(session):
        params = {
            "ids": ids,
            "ks": [opened[i] for i in ids],
            "hits": [",".join(map(str, holders[i])) for i in ids],
        }
        driver_connection(session).execute(_PG_OPEN_QUESTIONS, params, prepare=True, binary=True)
        return
    known = hit_questions.sample_hit_ids(session, ids)
    session.execute(
        _OPEN_QUESTIONS,
        [{"cid": i, "k": opened[i], "hits": known.get(i, []) + holders[i]} for i in ids],
    )


def _finish_if_done(session: Session, campaign: CampaignInfo) -> None:
    """``finished`` when the project has no candidate and no active cluster: nothing can come
    back to the queue (resume the campaign if a new round brings clusters)."""
    busy = session.execute(
        select(_CL.c.id)
        .where(
            _CL.c.project_id == campaign.project_id,
            _CL.c.state.in_((ClusterState.CANDIDATE, ClusterState.ACTIVE)),
        )
        .limit(1)
    ).first()
    if busy is None:
        session.execute(
            update(_C)
            .where(_C.c.id == campaign.id, _C.c.status == CampaignStatus.RUNNING)
            .values(status=CampaignStatus.FINISHED)
        )


# ---------------------------------------------------------------------------- render ahead

#: The job that pre-renders a built batch's overlays, by dotted name: the web process records and
#: dispatches it without importing the worker module.
RENDER_JOB = "workers.render.render_hits_job"
_RENDER_QUEUE = "cpu"
_NEW_JOB = insert(_J)
#: ``session.info`` key of the jobs recorded in the session's transaction, dispatched on commit.
_PENDING_JOBS = "maskmill.crowd.pending_jobs"


def render_job_id(hit_ids: Sequence[int]) -> str:
    """The render job of the batch whose HITs are ``hit_ids`` (in insertion order). Deterministic
    and unique: a HIT id belongs to one batch, so the first one names it."""
    if not hit_ids:
        raise ValueError("a render job needs at least one HIT id")
    return f"render-hits-{hit_ids[0]}-n{len(hit_ids)}"


def _job_settings() -> Settings | None:
    """Where a build's render job goes: the configuration of the web app serving the request.

    ``None`` -- no render job is recorded, and the batch's overlays are rendered on first request
    by the media route (:func:`service.render.overlay_for_question`), as any overlay missing from
    the cache is -- in two cases:

    * outside an application context: a script or test calling the crowd code directly, or a
      refill run after its response was sent without one;
    * in a ``testing`` app, as Flask extensions suppress side effects under ``TESTING``: its
      in-process job runner would go on rendering (and retrying) after the test module's database
      is dropped, holding up the test process at exit. Tests of pre-rendering use a non-testing
      app and wait for their jobs.

    Flask is imported here, not at module level: the crowd layer does not otherwise know the web.
    """
    from flask import has_app_context

    if not has_app_context():
        return None
    from service.app import get_settings

    try:
        settings = get_settings()
    except KeyError:  # an application context, but not a maskmill app's
        return None
    return None if settings.testing else settings


def _record_render_job(session: Session, campaign: CampaignInfo, hit_ids: list[int]) -> None:
    """Record the batch's render job in the build's transaction: one INSERT, undone with the
    batch if its savepoint rolls back. Dispatch waits for the commit
    (:func:`_dispatch_after_commit`), so a job runner never looks for a row it cannot see yet.
    The row is the durable record :mod:`service.jobs` keeps for every job (what
    ``GET /api/v1/jobs/{id}`` reports and a reconciler re-dispatches)."""
    session.execute(
        _NEW_JOB,
        {
            "id": render_job_id(hit_ids),
            "func_name": RENDER_JOB,
            "queue": _RENDER_QUEUE,
            "kwargs": {"hit_ids": hit_ids},
            "project_id": campaign.project_id,
            "status": JobStatus.QUEUED.value,
            "progress": {},
            "attempts": 0,
        },
    )


def _dispatch_after_commit(session: Session, settings: Settings, job_id: str) -> None:
    """Hand a recorded job to the job runner (RQ, or the in-process runner) once the session's
    transaction commits; forget it if the transaction rolls back instead.

    :func:`service.jobs.enqueue` commits the session itself, which a build cannot allow: it runs
    in the middle of a claim whose locks must hold until the claim commits.
    """
    pending = session.info.get(_PENDING_JOBS)
    if pending is None:
        pending = session.info[_PENDING_JOBS] = []
        event.listen(session, "after_commit", _dispatch_pending)
        event.listen(session, "after_transaction_end", _forget_uncommitted)
    pending.append((settings, job_id))


def _dispatch_pending(session: Session) -> None:
    # SQLAlchemy also calls this hook when a savepoint is released: only the real commit counts.
    if session.in_nested_transaction():
        return
    pending = session.info.get(_PENDING_JOBS) or []
    ready, pending[:] = list(pending), []
    from service.jobs import dispatcher_for

    for settings, job_id in ready:
        try:
            dispatcher_for(settings).dispatch(Job(id=job_id, queue=_RENDER_QUEUE))
        except Exception:  # the HITs are committed: never fail the request for an optimisation
            log.exception("could not dispatch %s; its overlays will render on demand", job_id)


def _forget_uncommitted(session: Session, transaction: Any) -> None:
    """The outermost transaction ended: whatever is still pending was rolled back with it."""
    if transaction.parent is None:
        pending = session.info.get(_PENDING_JOBS)
        if pending:
            pending.clear()


# -------------------------------------------------------------------------------- claiming


@dataclass(frozen=True)
class WorkerRow:
    id: int
    project_id: int | None
    backend: Backend
    qualified: bool
    blocked: bool
    blocked_reason: str | None


@dataclass(frozen=True)
class Claim:
    """A worker's current assignment. ``payload`` is the HIT's question list as JSON text, sent
    verbatim (see :func:`encode_payload`)."""

    assignment_id: str
    lease_expires_at: datetime
    payload: str
    answered: list[str]

    @property
    def questions(self) -> list[dict[str, str]]:
        return json.loads(self.payload)

    def to_json(self) -> dict[str, Any]:
        return json.loads(self.json_text())

    def json_text(self) -> str:
        """The claim as the API sends it, spliced around the stored payload (keys sorted, as
        ``jsonify`` writes them) rather than decoded and encoded again."""
        return (
            f'{{"answered":{json.dumps(self.answered, separators=(",", ":"))},'
            f'"assignment_id":{json.dumps(self.assignment_id)},'
            f'"lease_expires_at":"{aware(self.lease_expires_at).astimezone(UTC).isoformat()}",'
            f'"questions":{self.payload}}}'
        )


_PAYLOAD = select(_H.c.payload).where(_H.c.id == bindparam("hid"))
_LOCK_OPEN_HIT = (
    select(_H.c.id, _H.c.max_assignments, _H.c.lease_seconds, _H.c.payload)
    .where(
        _H.c.campaign_id == bindparam("cid"),
        _H.c.status == HitStatus.OPEN,
        ~select(_AS.c.id)
        .where(_AS.c.hit_id == _H.c.id, _AS.c.worker_id == bindparam("wid"))
        .exists(),
    )
    .order_by(_H.c.id)
    .limit(1)
    .with_for_update(skip_locked=True)
)
_NEW_ASSIGNMENT = insert(_AS)
_HIT_ASSIGNED = update(_H).where(_H.c.id == bindparam("hid")).values(status=HitStatus.ASSIGNED)
_LIVE_ASSIGNMENTS = select(func.count()).where(
    _AS.c.hit_id == bindparam("hid"), _AS.c.status.in_(_LIVE)
)
#: Key space of the advisory lock that makes one claim per campaign build at a time (the first
#: half of PostgreSQL's two-part advisory key; the campaign id is the second).
BUILD_LOCK_CLASS = 0x4D4D_4201


def question_payload(session: Session, hit_id: int) -> list[dict[str, str]]:
    """``[{id, image_url, class_name}]`` in the HIT's shuffled order, as stored when it was built."""
    return json.loads(session.execute(_PAYLOAD, {"hid": hit_id}).scalar_one())


@dataclass(frozen=True)
class _OpenHit:
    id: int
    max_assignments: int
    lease_seconds: int
    payload: str


def _lock_open_hit(session: Session, campaign_id: int, worker_id: int) -> _OpenHit | None:
    row = session.execute(_LOCK_OPEN_HIT, {"cid": campaign_id, "wid": worker_id}).first()
    return None if row is None else _OpenHit(*row)


def _assign(session: Session, hit: _OpenHit, worker_id: int, now: datetime) -> Claim:
    public_id = new_public_id()
    lease = now + timedelta(seconds=hit.lease_seconds)
    session.execute(
        _NEW_ASSIGNMENT,
        {
            "hit_id": hit.id,
            "worker_id": worker_id,
            "public_id": public_id,
            "status": AssignmentStatus.CLAIMED.value,
            "lease_expires_at": lease,
            "gold_correct": 0,
            "gold_total": 0,
        },
    )
    full = hit.max_assignments == 1 or _live_assignments(session, hit.id) >= hit.max_assignments
    if full:
        session.execute(_HIT_ASSIGNED, {"hid": hit.id})
    return Claim(public_id, lease, hit.payload, [])


def _live_assignments(session: Session, hit_id: int) -> int:
    return session.execute(_LIVE_ASSIGNMENTS, {"hid": hit_id}).scalar_one()


_SWEEP_OR_RESUME = (
    select(_AS.c.id, _AS.c.hit_id, _AS.c.worker_id, _AS.c.public_id, _AS.c.lease_expires_at)
    .where(
        _AS.c.status == AssignmentStatus.CLAIMED,
        or_(_AS.c.lease_expires_at < bindparam("now"), _AS.c.worker_id == bindparam("wid")),
    )
    .order_by(_AS.c.id)
    .limit(_SWEEP_BATCH)
    .with_for_update(skip_locked=True)
)
_ANY_OPEN_HIT = (
    select(_H.c.id, _H.c.max_assignments, _H.c.lease_seconds, _H.c.payload)
    .select_from(_H.join(_C, _C.c.id == _H.c.campaign_id))
    .where(
        _C.c.project_id == bindparam("pid"),
        _C.c.backend == bindparam("backend"),
        _C.c.status.in_(OFFERING),
        _H.c.status == HitStatus.OPEN,
        ~select(_AS.c.id)
        .where(_AS.c.hit_id == _H.c.id, _AS.c.worker_id == bindparam("wid"))
        .exists(),
    )
    .order_by(_H.c.id)
    .limit(1)
    .with_for_update(of=_H, skip_locked=True)
)


def _sweep_or_resume(session: Session, worker_id: int, now: datetime) -> Claim | None:
    """Expire lapsed claims (anyone's) and find the worker's own open claim, in one query."""
    rows = session.execute(_SWEEP_OR_RESUME, {"now": now, "wid": worker_id}).all()
    expired = [r for r in rows if aware(r[4]) < now]
    if expired:
        expire_assignments(session, [r[0] for r in expired], _LEASE_EXPIRED)
        reopen_hits(session, sorted({r[1] for r in expired}))
    mine = next((r for r in rows if r[2] == worker_id and aware(r[4]) >= now), None)
    if mine is None:
        return None
    given = set(stored_answers.load(session, [mine[0]])[mine[0]].question_ids)
    questions = hit_questions.of_hits(session, [mine[1]]).get(mine[1], [])
    answered = [q.public_id for q in questions if q.id in given]
    payload = session.execute(_PAYLOAD, {"hid": mine[1]}).scalar_one()
    return Claim(mine[3], aware(mine[4]), payload, answered)


def _wait_for_builder(session: Session, campaign_id: int) -> None:
    """PostgreSQL: take the campaign's build lock (held to the end of the transaction). If another
    claim is building, this waits for it; the next statement's snapshot then sees its HITs."""
    if _postgres(session):
        session.execute(
            select(func.pg_advisory_xact_lock(BUILD_LOCK_CLASS, campaign_id))
        ).scalar_one()


def claim(
    session: Session,
    worker: WorkerRow,
    *,
    rng: np.random.Generator | None = None,
    now: datetime | None = None,
) -> Claim:
    """The worker's next HIT (an assignment with a lease), building HITs if none is open.

    Refuses blocked and unqualified workers (403) and answers 409 ``no_work`` when no campaign of
    the worker's project has work (paused, stopped, out of money or out of clusters). A worker
    who still holds an unexpired claim gets it back (a reloaded page resumes, it does not hoard).
    """
    if worker.blocked:
        raise CrowdError(403, "blocked", f"this worker is blocked: {worker.blocked_reason}")
    if not worker.qualified:
        raise CrowdError(403, "not_qualified", "pass the qualification test before taking HITs")
    now = now or utcnow()
    current = _sweep_or_resume(session, worker.id, now)
    if current is not None:
        return current
    if worker.project_id is None:
        raise CrowdError(409, "no_work", "no HIT is available right now", persist=True)
    row = session.execute(
        _ANY_OPEN_HIT,
        {"pid": worker.project_id, "backend": worker.backend.value, "wid": worker.id},
    ).first()
    if row is not None:
        return _assign(session, _OpenHit(*row), worker.id, now)
    for campaign in active_campaigns(session, worker.project_id, worker.backend):
        hit = _lock_open_hit(session, campaign.id, worker.id)
        if hit is None and campaign.status is CampaignStatus.RUNNING:
            _wait_for_builder(session, campaign.id)
            hit = _lock_open_hit(session, campaign.id, worker.id)
            if hit is None:
                count = campaign.crowd.build_batch_hits
                built = build_hits(session, campaign, count, rng=rng, now=now)
                hit = _lock_open_hit(session, campaign.id, worker.id) if built else None
        if hit is not None:
            return _assign(session, hit, worker.id, now)
    raise CrowdError(409, "no_work", "no HIT is available right now", persist=True)


# ------------------------------------------------------------------------------- answering


@dataclass(frozen=True)
class SubmitResult:
    accepted: int
    duplicates: int
    complete: bool
    assignment_id: int
    hit_id: int
    newly_complete: bool
    #: This assignment's answers per open question, when it just became complete.
    votes: dict[int, QuestionVotes] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "duplicates": self.duplicates, "complete": self.complete}


def _postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def driver_connection(session: Session) -> psycopg.Connection:
    """The psycopg connection under the session's current transaction (PostgreSQL), for
    statements sent as prepared static SQL rather than through SQLAlchemy."""
    return session.connection().connection.driver_connection


_UNNEST_HITS = """
INSERT INTO hits
    (campaign_id, status, cost_micros, max_assignments, lease_seconds, payload, expires_at,
     public_id, question_cluster_ids, question_tree_ids, question_leaf_pos,
     question_gold_item_ids, question_statuses)
SELECT %(campaign_id)s, 'open', %(cost)s, %(assignments)s, %(lease)s, payload, %(expires)s,
    public_id,
    -- '' is no question or one NULL (both are all NULLs): string_to_array gives '{}' for both.
    CASE WHEN c = '' THEN array_fill(NULL::integer, ARRAY[n])
        ELSE string_to_array(c, ',', '')::integer[] END,
    CASE WHEN t = '' THEN array_fill(NULL::integer, ARRAY[n])
        ELSE string_to_array(t, ',', '')::integer[] END,
    CASE WHEN l = '' THEN array_fill(NULL::bigint, ARRAY[n])
        ELSE string_to_array(l, ',', '')::bigint[] END,
    CASE WHEN g = '' THEN array_fill(NULL::integer, ARRAY[n])
        ELSE string_to_array(g, ',', '')::integer[] END,
    array_fill('open'::text, ARRAY[n])
FROM unnest(%(payloads)b::text[], %(public_ids)b::text[], %(sizes)b::integer[],
            %(clusters)b::text[], %(trees)b::text[], %(leaves)b::text[], %(golds)b::text[])
    WITH ORDINALITY AS x(payload, public_id, n, c, t, l, g, ord)
ORDER BY ord
RETURNING id
"""


def _joined_column(hits: list[_NewHit], field: str) -> list[str]:
    """One comma-separated text per HIT for an array column (empty: ``NULL``). Numbers or None:
    "None" is the only text here with letters, so one replace in C empties it (a per-value Python
    conditional cost more than the rest of the build)."""
    return [",".join(map(str, getattr(hit, field))).replace("None", "") for hit in hits]


def _insert_hits(
    session: Session, campaign: CampaignInfo, hits: list[_NewHit], now: datetime
) -> list[int]:
    """Insert a build's HITs, open and priced, with their questions; their ids in the order of
    ``hits``.

    The ids come from the table's sequence, handed out in the order the rows are inserted, so
    sorting the returned ids gives the HITs' order: the same reliance as SQLAlchemy's
    ``sort_by_parameter_order``, used on SQLite. On PostgreSQL one prepared statement: the
    payloads and public ids as binary text arrays (no per-character escaping), each question
    array as one comma-separated text per HIT split by the server (no per-value work in the
    driver), instead of SQLAlchemy's multi-row statement, whose text psycopg converts afresh on
    every build."""
    lifetime = campaign.crowd.hit_lifetime_seconds
    values = {
        "campaign_id": campaign.id,
        "cost": campaign.hit_cost,
        "assignments": campaign.assignments_per_hit,
        "lease": campaign.crowd.lease_seconds,
        "expires": now + timedelta(seconds=lifetime) if lifetime else None,
    }
    if _postgres(session):
        arrays = {
            "payloads": [hit.payload for hit in hits],
            "public_ids": [hit.public_id for hit in hits],
            "sizes": [len(hit.cluster_ids) for hit in hits],
            "clusters": _joined_column(hits, "cluster_ids"),
            "trees": _joined_column(hits, "tree_ids"),
            "leaves": _joined_column(hits, "leaf_pos"),
            "golds": _joined_column(hits, "gold_item_ids"),
        }
        rows = driver_connection(session).execute(
            _UNNEST_HITS, dict(values, **arrays), prepare=True
        )
        return sorted(row[0] for row in rows)
    status = QuestionStatus.OPEN.value
    return list(
        session.scalars(
            insert(_H).returning(_H.c.id, sort_by_parameter_order=True),
            [
                {
                    "campaign_id": values["campaign_id"],
                    "status": HitStatus.OPEN,
                    "cost_micros": values["cost"],
                    "max_assignments": values["assignments"],
                    "lease_seconds": values["lease"],
                    "payload": hit.payload,
                    "expires_at": values["expires"],
                    "public_id": hit.public_id,
                    "question_cluster_ids": hit.cluster_ids,
                    "question_tree_ids": hit.tree_ids,
                    "question_leaf_pos": hit.leaf_pos,
                    "question_gold_item_ids": hit.gold_item_ids,
                    "question_statuses": [status] * len(hit.cluster_ids),
                }
                for hit in hits
            ],
        )
    )


_LOCK_ASSIGNMENT = (
    select(
        _AS.c.id,
        _AS.c.hit_id,
        _AS.c.worker_id,
        _AS.c.status,
        _AS.c.lease_expires_at,
        *stored_answers.COLUMNS,
    )
    .where(_AS.c.public_id == bindparam("pid"))
    .with_for_update()
)


def _read_questions(session: Session, hit_id: int) -> list[tuple]:
    """``(public id, id, kind, status, cluster id, expected answer)`` of the HIT's questions."""
    questions = hit_questions.of_hits(session, [hit_id]).get(hit_id, [])
    expected = hit_questions.expected_answers(session, questions)
    return [
        (q.public_id, q.id, q.kind, q.status, q.cluster_id, expected.get(q.id)) for q in questions
    ]


def refuse_lapsed_lease(status: AssignmentStatus, lease: datetime, now: datetime) -> None:
    """An assignment whose lease has run out takes no more answers (its questions went back)."""
    if status is AssignmentStatus.EXPIRED or (status is AssignmentStatus.CLAIMED and lease <= now):
        raise CrowdError(409, "lease_expired", "the lease on this assignment has expired")


def refuse_unknown_questions(
    answers: Sequence[tuple[str, bool, int]], known: Container[str]
) -> None:
    """Answers must name questions of the assignment's HIT (by public id)."""
    unknown = sorted({pid for pid, _, _ in answers if pid not in known})
    if unknown:
        raise CrowdError(
            422,
            "validation_error",
            f"answers.question_id: not in this assignment: {', '.join(unknown[:5])}",
        )


def record_answers(
    session: Session,
    worker_id: int,
    assignment_public_id: str,
    answers: Sequence[tuple[str, bool, int]],
    *,
    now: datetime | None = None,
) -> SubmitResult:
    """Store ``(question public id, value, ms)`` answers of one assignment, idempotently.

    Partial submissions are fine (the page sends one answer at a time); an answer already stored
    counts as a duplicate, never twice. The assignment row is locked first and its answers are
    read under the lock, so concurrent posts of the same assignment queue, each sees what the
    previous one stored, and exactly one of them sees it become complete.
    """
    now = now or utcnow()
    row = session.execute(_LOCK_ASSIGNMENT, {"pid": assignment_public_id}).first()
    if row is None or row[2] != worker_id:
        raise CrowdError(404, "not_found", f"assignment {assignment_public_id} not found")
    assignment_id, hit_id, _, status, lease = row[:5]
    stored = stored_answers.AnswerSet.of(hit_id, row[5:])
    status, lease = AssignmentStatus(status), aware(lease)
    refuse_lapsed_lease(status, lease, now)
    rows_read = _read_questions(session, hit_id)
    questions = {r[0]: r[1] for r in rows_read}
    refuse_unknown_questions(answers, questions)
    if status is not AssignmentStatus.CLAIMED:
        return SubmitResult(0, len(answers), True, assignment_id, hit_id, False)
    answered = set(stored.question_ids)
    new: dict[int, tuple[int, bool, int]] = {}
    for pid, value, ms in answers:
        qid = questions[pid]
        if qid not in answered and qid not in new:
            new[qid] = (qid, value, ms)
    if new:
        stored = stored.appended(new.values())
        stored_answers.store(session, assignment_id, stored)
    complete = len(answered) + len(new) >= len(questions)
    votes = _own_votes(rows_read, stored, assignment_id, worker_id) if complete else None
    return SubmitResult(
        len(new), len(answers) - len(new), complete, assignment_id, hit_id, complete, votes
    )


def _own_votes(
    rows_read: Sequence, stored: stored_answers.AnswerSet, assignment_id: int, worker_id: int
) -> dict[int, QuestionVotes]:
    """The HIT's open questions with this assignment's answers, from what the submission already
    read and wrote: for a single-assignment HIT that is exactly what :func:`hit_votes` would read,
    so completing it costs no extra query."""
    given = {a.question_id: a for a in stored.valid()}
    votes: dict[int, QuestionVotes] = {}
    for _pid, qid, kind, status, cluster_id, expected in rows_read:
        if QuestionStatus(status) is not QuestionStatus.OPEN:
            continue
        entry = votes[qid] = QuestionVotes(cluster_id, QuestionKind(kind), expected, [])
        answer = given.get(qid)
        if answer is not None:
            entry.votes.append(Vote(worker_id, answer.value, assignment_id, answer.ms))
    return votes


# --------------------------------------------------------------------------------- leases


_EXPIRED_LEASES = (
    select(_AS.c.id, _AS.c.hit_id)
    .where(_AS.c.status == AssignmentStatus.CLAIMED, _AS.c.lease_expires_at < bindparam("now"))
    .order_by(_AS.c.id)
    .limit(_SWEEP_BATCH)
    .with_for_update(skip_locked=True)
)


def sweep_leases(session: Session, now: datetime | None = None) -> int:
    """Expire claims whose lease ran out and hand their HITs back; returns how many expired.

    Their partial answers are discarded with the reason (they never count). ``SKIP LOCKED``: a
    claim being answered right now is locked by its submission and is left for the next sweep.
    """
    now = now or utcnow()
    rows = session.execute(_EXPIRED_LEASES, {"now": now}).all()
    if not rows:
        return 0
    expire_assignments(session, [r[0] for r in rows], _LEASE_EXPIRED)
    reopen_hits(session, sorted({r[1] for r in rows}))
    return len(rows)


def expire_assignments(session: Session, assignment_ids: list[int], reason: str) -> None:
    session.execute(
        update(_AS)
        .where(_AS.c.id.in_(assignment_ids))
        .values(status=AssignmentStatus.EXPIRED, decision_reason=reason)
    )
    discard_answers(session, dict.fromkeys(assignment_ids), reason)


def reopen_hits(session: Session, hit_ids: list[int]) -> None:
    """HITs that lost a claim are offered again -- unless their campaign stopped, in which case
    they are cancelled and their money released."""
    if not hit_ids:
        return
    session.execute(
        update(_H)
        .where(_H.c.id.in_(hit_ids), _H.c.status == HitStatus.ASSIGNED)
        .values(status=HitStatus.OPEN)
    )
    stopped = session.execute(
        select(_H.c.campaign_id, _H.c.id)
        .join(_C, _C.c.id == _H.c.campaign_id)
        .where(_H.c.id.in_(hit_ids), _C.c.status == CampaignStatus.STOPPED)
    ).all()
    by_campaign: dict[int, list[int]] = {}
    for campaign_id, hit_id in stopped:
        by_campaign.setdefault(campaign_id, []).append(hit_id)
    for campaign_id, ids in by_campaign.items():
        retire_hits(session, load_campaign(session, campaign_id), ids, HitStatus.CANCELLED)


def retire_hits(
    session: Session,
    campaign: CampaignInfo,
    hit_ids: list[int] | None,
    status: HitStatus,
    *,
    now: datetime | None = None,
) -> int:
    """Withdraw open HITs (campaign stopped: ``cancelled``; lifetime over: ``expired``).

    Slots nobody holds are released from the budget. A HIT nobody holds at all ends in
    ``status``, its open questions are discarded and their clusters settle back to ``candidate``;
    a redundant HIT that some workers hold keeps just those slots. ``hit_ids=None`` means every
    open HIT of the campaign. Returns the micro-dollars released.
    """
    now = now or utcnow()
    query = select(_H.c.id, _H.c.max_assignments).where(
        _H.c.campaign_id == campaign.id, _H.c.status == HitStatus.OPEN
    )
    if hit_ids is not None:
        query = query.where(_H.c.id.in_(hit_ids))
    hits = session.execute(query.order_by(_H.c.id).with_for_update(of=_H)).all()
    if not hits:
        return 0
    live = dict(
        session.execute(
            select(_AS.c.hit_id, func.count())
            .where(_AS.c.hit_id.in_([h[0] for h in hits]), _AS.c.status.in_(_LIVE))
            .group_by(_AS.c.hit_id)
        ).all()
    )
    releases: list[tuple[int, int, int]] = []
    emptied: list[int] = []
    for hit_id, max_assignments in hits:
        used = live.get(hit_id, 0)
        if max_assignments > used:
            releases.append((hit_id, max_assignments - used, campaign.assignment_cost))
        if used == 0:
            emptied.append(hit_id)
        else:
            session.execute(
                update(_H)
                .where(_H.c.id == hit_id)
                .values(max_assignments=used, status=HitStatus.ASSIGNED)
            )
    if emptied:
        session.execute(update(_H).where(_H.c.id.in_(emptied)).values(status=status))
        dropped = hit_questions.set_statuses(
            session,
            {
                q.id: QuestionStatus.DISCARDED
                for questions in hit_questions.of_hits(session, emptied).values()
                for q in questions
            },
            only_from=QuestionStatus.OPEN,
        )
        clusters = [q.cluster_id for q in dropped]
        settle(session, closed_counts(clusters), campaign.policy, now)
    # Money last: every writer takes the campaign row after the cluster rows (no deadlock).
    for hit_id, free, share in releases:
        money.release(
            session,
            campaign.id,
            free * share,
            hit_id=hit_id,
            note=f"HIT {status.value}: {free} unclaimed assignment(s)",
            next_hit_cost=campaign.hit_cost,
        )
    return sum(free * share for _, free, share in releases)


def sweep(session: Session, now: datetime | None = None) -> dict[str, int]:
    """The periodic job's pass: expire leases, retire open HITs past their lifetime."""
    now = now or utcnow()
    expired = sweep_leases(session, now)
    rows = session.execute(
        select(_H.c.campaign_id, _H.c.id)
        .where(
            _H.c.status == HitStatus.OPEN,
            and_(_H.c.expires_at.is_not(None), _H.c.expires_at < now),
        )
        .limit(_SWEEP_BATCH)
    ).all()
    by_campaign: dict[int, list[int]] = {}
    for campaign_id, hit_id in rows:
        by_campaign.setdefault(campaign_id, []).append(hit_id)
    for campaign_id, ids in by_campaign.items():
        retire_hits(session, load_campaign(session, campaign_id), ids, HitStatus.EXPIRED, now=now)
    return {"leases_expired": expired, "hits_expired": len(rows)}
