"""The domain in SQLAlchemy 2: projects, rounds, trees and their clusters, campaigns and money, HITs,
questions, answers and workers.

Invariants that must survive bugs and concurrency live in the database as constraints (foreign keys,
uniques, checks), not only in Python: a negative budget, a duplicate answer, ``lo >= hi`` or an
overspent campaign are refused by PostgreSQL (and SQLite) themselves. (A HIT's answers are arrays
of its assignment; the checks on those arrays are PostgreSQL's only, see ``Assignment``.)

Money is stored as integer micro-dollars (1e-6 USD) so sums are exact on every backend.

The crowd tables (``hits``, ``assignments``, ``questions``) take a few hundred row writes per second
per core, so every index and foreign key on them is there for a query or a cascade that needs it:
keys derivable through another row (a sample question's tree through its cluster) are not enforced
twice, uniques on nullable columns are partial, a HIT's answers are arrays of its assignment row
(not a row each), and random public ids compare bytewise (``COLLATE "C"`` on PostgreSQL; they are
opaque tokens).
Enums are stored as short strings guarded by CHECK constraints (portable, and cheap to extend with a
migration).
"""

from __future__ import annotations

import enum
import secrets
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    ARRAY,
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

MICROS_PER_USD = 1_000_000
#: A claim's lease unless the campaign says otherwise (``CrowdParams.lease_seconds``).
DEFAULT_LEASE_SECONDS = 900

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


#: Random URL-safe tokens (``secrets.token_urlsafe``): bytewise comparison is their natural order and
#: several times cheaper in a PostgreSQL btree than a linguistic collation.
PublicId = String(64).with_variant(String(64, collation="C"), "postgresql")


def _random_public_id() -> str:
    """24 URL-safe characters, 144 random bits (the crowd code makes its own ids for HITs it
    builds; this is the default for any other writer)."""
    return secrets.token_urlsafe(18)


def _array(item: type[Integer | Boolean | Text]) -> ARRAY:
    """A PostgreSQL array, a JSON list on SQLite: a list in Python either way."""
    return ARRAY(item).with_variant(JSON(none_as_null=True), "sqlite")


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    """A portable enum column: VARCHAR + CHECK, values (not names) stored."""
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=max(len(m.value) for m in cls),
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )


# --------------------------------------------------------------------------------------- enums


class Split(enum.StrEnum):
    SEED = "seed"
    HELDOUT = "heldout"


class RoundStatus(enum.StrEnum):
    PENDING = "pending"
    TRAINING = "training"
    DETECTING = "detecting"
    CLUSTERING = "clustering"
    READY = "ready"
    FAILED = "failed"


class ClusterState(enum.StrEnum):
    """Where a tree node stands in the search (Alg. 1 of the paper).

    ``pending`` nodes are known to be askable but their parent has not split yet; ``candidate`` nodes
    are in the priority queue; ``active`` nodes have questions out.
    """

    PENDING = "pending"
    CANDIDATE = "candidate"
    ACTIVE = "active"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    SPLIT = "split"
    AUTO_REJECTED = "auto_rejected"
    AUTO_SPLIT = "auto_split"
    SKIPPED = "skipped"


class Backend(enum.StrEnum):
    LOCAL = "local"
    MTURK = "mturk"


class CampaignStatus(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    EXHAUSTED = "exhausted"  # the budget cannot cover another HIT
    FINISHED = "finished"  # no candidate cluster is left


class HitStatus(enum.StrEnum):
    OPEN = "open"
    ASSIGNED = "assigned"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class AssignmentStatus(enum.StrEnum):
    CLAIMED = "claimed"
    SUBMITTED = "submitted"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"


class QuestionKind(enum.StrEnum):
    SAMPLE = "sample"
    GOLD = "gold"
    QUALIFICATION = "qualification"


class QuestionStatus(enum.StrEnum):
    OPEN = "open"
    ANSWERED = "answered"
    DISCARDED = "discarded"


class LedgerKind(enum.StrEnum):
    RESERVE = "reserve"
    RELEASE = "release"
    SPEND = "spend"


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"


# ---------------------------------------------------------------------------------- accounts


class ApiKey(TimestampMixin, Base):
    """A requester credential. Only a SHA-256 of the secret is stored (keys are 256-bit random, so a
    slow hash buys nothing); ``prefix`` finds the row without scanning."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    @classmethod
    def by_prefix(cls, session: Session, prefix: str) -> ApiKey | None:
        return session.scalar(select(cls).where(cls.prefix == prefix))


class Project(TimestampMixin, Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)

    classes: Mapped[list[ProjectClass]] = relationship(
        back_populates="project", order_by="ProjectClass.id", cascade="all, delete-orphan"
    )

    __table_args__ = (Index(None, "api_key_id"),)

    @classmethod
    def owned(cls, session: Session, project_id: int, api_key_id: int) -> Project | None:
        """The project if this key owns it: other keys' projects are indistinguishable from absent."""
        return session.scalar(select(cls).where(cls.id == project_id, cls.api_key_id == api_key_id))


class ProjectClass(Base):
    __tablename__ = "project_classes"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))

    project: Mapped[Project] = relationship(back_populates="classes")

    __table_args__ = (
        UniqueConstraint("project_id", "name"),
        CheckConstraint("length(name) > 0", name="name_not_empty"),
    )


class Image(TimestampMixin, Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    file_name: Mapped[str] = mapped_column(String(1000))
    uri: Mapped[str] = mapped_column(Text)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        UniqueConstraint("project_id", "file_name"),
        CheckConstraint("width > 0 AND height > 0", name="positive_size"),
    )


class GroundTruthMask(TimestampMixin, Base):
    """A hand-drawn mask from the requester's COCO ground truth (seed set or held-out set)."""

    __tablename__ = "ground_truth_masks"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    class_id: Mapped[int] = mapped_column(ForeignKey("project_classes.id", ondelete="CASCADE"))
    split: Mapped[Split] = mapped_column(_enum(Split, "split"))
    rle: Mapped[dict[str, Any]] = mapped_column()
    area: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        Index(None, "project_id", "split"),
        Index(None, "image_id"),
        CheckConstraint("area >= 0", name="area_non_negative"),
    )


# ------------------------------------------------------------------------------ rounds, trees


class Round(TimestampMixin, Base):
    """One iteration of train → detect → cluster → verify."""

    __tablename__ = "rounds"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[RoundStatus] = mapped_column(
        _enum(RoundStatus, "round_status"), default=RoundStatus.PENDING
    )
    checkpoint_uri: Mapped[str | None] = mapped_column(Text)
    job_id: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        UniqueConstraint("project_id", "number"),
        CheckConstraint("number >= 1", name="number_positive"),
    )


class Tree(TimestampMixin, Base):
    """The cluster tree of one (round, class); its arrays live in a tree file in storage."""

    __tablename__ = "trees"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    class_id: Mapped[int] = mapped_column(ForeignKey("project_classes.id", ondelete="CASCADE"))
    uri: Mapped[str] = mapped_column(Text)
    mask_count: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        UniqueConstraint("round_id", "class_id"),
        # Target of the clusters' composite key, so a cluster's project always equals its tree's.
        UniqueConstraint("id", "project_id"),
        CheckConstraint("mask_count >= 0", name="mask_count_non_negative"),
    )


class Cluster(TimestampMixin, Base):
    """A tree node a human could be asked about: the leaf range ``[lo, hi)`` of its tree.

    Only such nodes become rows (the automatic rules depend on ``(S, size)`` alone, so they are known
    when the tree is built); the rest of the tree stays in the file.
    """

    __tablename__ = "clusters"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(Integer)
    tree_id: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("clusters.id", ondelete="CASCADE"))
    node: Mapped[int] = mapped_column(BigInteger)
    lo: Mapped[int] = mapped_column(BigInteger)
    hi: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(BigInteger)
    score: Mapped[float] = mapped_column(Float)
    state: Mapped[ClusterState] = mapped_column(
        _enum(ClusterState, "cluster_state"), default=ClusterState.PENDING
    )
    yes_count: Mapped[int] = mapped_column(Integer, default=0)
    no_count: Mapped[int] = mapped_column(Integer, default=0)
    #: Sample questions about this cluster still out in HITs. Kept by the same statements that open
    #: and close questions, so the hot path reads one number instead of counting questions (and
    #: an atomic ``open_questions - k`` stays right under concurrent submissions). Writers of new
    #: clusters need not know it (server default 0).
    open_questions: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: The HITs that hold sample questions about this cluster, in build order (migration 0006):
    #: how its questions are found, now that they are arrays of their HITs rather than rows
    #: indexed by cluster. Appended by the build that opens them (which updates this row anyway).
    sample_hit_ids: Mapped[list[int] | None] = mapped_column(_array(Integer))

    __table_args__ = (
        ForeignKeyConstraint(
            ["tree_id", "project_id"], ["trees.id", "trees.project_id"], ondelete="CASCADE"
        ),
        ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        UniqueConstraint("tree_id", "node"),
        CheckConstraint("lo >= 0 AND lo < hi", name="range_valid"),
        CheckConstraint("size = hi - lo", name="size_matches_range"),
        CheckConstraint(
            "yes_count >= 0 AND no_count >= 0 AND open_questions >= 0", name="counts_non_negative"
        ),
        # Hot path: the next candidates of a project by score.
        Index(
            "ix_clusters_candidates",
            "project_id",
            "score",
            postgresql_where=text("state = 'candidate'"),
            sqlite_where=text("state = 'candidate'"),
        ),
        Index(None, "tree_id", "lo"),
        # The self-referencing cascade (deleting a tree's clusters) looks children up by parent.
        Index(None, "parent_id"),
    )


# ------------------------------------------------------------------------------- crowd side


class Worker(TimestampMixin, Base):
    """A crowd worker: a local account (invited per project) or an MTurk worker id."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(primary_key=True)
    backend: Mapped[Backend] = mapped_column(_enum(Backend, "backend"))
    external_id: Mapped[str] = mapped_column(String(200))
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    qualified: Mapped[bool] = mapped_column(Boolean, default=False)
    qualified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    qualification_attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_qualification_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    gold_correct: Mapped[int] = mapped_column(Integer, default=0)
    gold_total: Mapped[int] = mapped_column(Integer, default=0)
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    blocked_reason: Mapped[str | None] = mapped_column(Text)
    blocked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("backend", "external_id"),
        CheckConstraint("gold_correct >= 0 AND gold_correct <= gold_total", name="gold_counts"),
        CheckConstraint("qualification_attempts >= 0", name="attempts_non_negative"),
        CheckConstraint("NOT blocked OR blocked_reason IS NOT NULL", name="block_has_reason"),
    )


class GoldItem(TimestampMixin, Base):
    """A mask with a known answer (from held-out ground truth): hidden gold or a qualification item."""

    __tablename__ = "gold_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    class_id: Mapped[int] = mapped_column(ForeignKey("project_classes.id", ondelete="CASCADE"))
    rle: Mapped[dict[str, Any]] = mapped_column()
    iou: Mapped[float] = mapped_column(Float)
    expected: Mapped[bool] = mapped_column(Boolean)
    for_qualification: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        CheckConstraint("iou >= 0 AND iou <= 1", name="iou_unit_interval"),
        Index(None, "project_id", "for_qualification"),
    )


class Campaign(TimestampMixin, Base):
    """A budgeted verification campaign. ``reserved + spent <= budget`` is a database check, so no
    code path (nor a race between two) can overspend."""

    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id", ondelete="SET NULL"))
    backend: Mapped[Backend] = mapped_column(_enum(Backend, "backend"))
    status: Mapped[CampaignStatus] = mapped_column(
        _enum(CampaignStatus, "campaign_status"), default=CampaignStatus.RUNNING
    )
    budget_micros: Mapped[int] = mapped_column(BigInteger)
    reserved_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    spent_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    reward_per_hit_micros: Mapped[int] = mapped_column(BigInteger)
    questions_per_hit: Mapped[int] = mapped_column(Integer, default=50)
    gold_per_hit: Mapped[int] = mapped_column(Integer, default=5)
    assignments_per_hit: Mapped[int] = mapped_column(Integer, default=1)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)

    __table_args__ = (
        CheckConstraint(
            "budget_micros >= 0 AND reserved_micros >= 0 AND spent_micros >= 0",
            name="money_non_negative",
        ),
        CheckConstraint("reserved_micros + spent_micros <= budget_micros", name="within_budget"),
        CheckConstraint("reward_per_hit_micros >= 0", name="reward_non_negative"),
        CheckConstraint("questions_per_hit > 0", name="questions_positive"),
        CheckConstraint("gold_per_hit >= 0", name="gold_non_negative"),
        CheckConstraint("assignments_per_hit >= 1", name="assignments_positive"),
        Index(None, "project_id"),
    )


class Hit(TimestampMixin, Base):
    __tablename__ = "hits"

    id: Mapped[int] = mapped_column(primary_key=True)
    #: Not a foreign key (migration 0004): HITs are inserted by the build that has just read
    #: their campaign and reserves their money in the same transaction; campaigns are never
    #: deleted.
    campaign_id: Mapped[int] = mapped_column(Integer)
    status: Mapped[HitStatus] = mapped_column(
        _enum(HitStatus, "hit_status"), default=HitStatus.OPEN
    )
    external_id: Mapped[str | None] = mapped_column(String(200))
    cost_micros: Mapped[int] = mapped_column(BigInteger)
    max_assignments: Mapped[int] = mapped_column(Integer, default=1)
    #: How long a claim of this HIT lasts (the campaign's ``lease_seconds`` when it was built).
    lease_seconds: Mapped[int] = mapped_column(Integer, default=DEFAULT_LEASE_SECONDS)
    #: The questions as the worker receives them, ``[{id, image_url, class_name}, ...]`` in the
    #: HIT's shuffled order: serialised once when the HIT is built, so a claim sends it as is
    #: instead of reading and encoding its questions again.
    payload: Mapped[str] = mapped_column(Text, default="[]")
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Random and unguessable; a question's public id is this plus its position
    #: (:mod:`service.crowd.questions`), so ids say which HIT a question is in and nothing else.
    public_id: Mapped[str] = mapped_column(PublicId, unique=True, default=_random_public_id)
    #: The HIT's questions (migration 0006), as parallel arrays in the HIT's shuffled order (a
    #: question's position is its index): a sample's cluster, tree and leaf position, a gold
    #: question's gold item (the other entries ``NULL``), and every question's status. One row
    #: written per HIT instead of one per question: inserting a build's 880 questions as rows,
    #: four indexes each, and closing them again, cost 5-19% of the CPU of a whole HIT cycle
    #: (three runs of ``scripts/bench_compare.py``, median 8%, issue 4). Read and written through
    #: :mod:`service.crowd.questions` only. CHECKs not declared here: 0006's on PostgreSQL (lengths,
    #: statuses, targets matching kinds), 0008's on SQLite (lengths).
    question_cluster_ids: Mapped[list[int | None]] = mapped_column(_array(Integer), default=list)
    question_tree_ids: Mapped[list[int | None]] = mapped_column(_array(Integer), default=list)
    question_leaf_pos: Mapped[list[int | None]] = mapped_column(_array(BigInteger), default=list)
    question_gold_item_ids: Mapped[list[int | None]] = mapped_column(_array(Integer), default=list)
    question_statuses: Mapped[list[str]] = mapped_column(_array(Text), default=list)

    __table_args__ = (
        CheckConstraint("cost_micros >= 0", name="cost_non_negative"),
        CheckConstraint("max_assignments >= 1", name="assignments_positive"),
        CheckConstraint("lease_seconds > 0", name="lease_positive"),
        # Its questions' public ids are it plus two characters (service.crowd.questions).
        CheckConstraint("length(public_id) = 24", name="public_id_length"),
        Index(
            "uq_hits_external_id",
            "external_id",
            unique=True,
            postgresql_where=text("external_id IS NOT NULL"),
            sqlite_where=text("external_id IS NOT NULL"),
        ),
        # Hot path: the oldest open HIT of a campaign, claimed with FOR UPDATE SKIP LOCKED.
        Index(
            "ix_hits_open",
            "campaign_id",
            "id",
            postgresql_where=text("status = 'open'"),
            sqlite_where=text("status = 'open'"),
        ),
    )


class Assignment(TimestampMixin, Base):
    """One worker's lease on a HIT and, once submitted, the unit that gold checks judge."""

    __tablename__ = "assignments"

    id: Mapped[int] = mapped_column(primary_key=True)
    #: Neither is a foreign key (migration 0004): an assignment is inserted by the claim
    #: statement that has just locked its HIT and read its worker by token; HITs and workers are
    #: never deleted.
    hit_id: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[int] = mapped_column(Integer)
    public_id: Mapped[str] = mapped_column(PublicId, unique=True)
    external_id: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[AssignmentStatus] = mapped_column(
        _enum(AssignmentStatus, "assignment_status"), default=AssignmentStatus.CLAIMED
    )
    lease_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    gold_correct: Mapped[int] = mapped_column(Integer, default=0)
    gold_total: Mapped[int] = mapped_column(Integer, default=0)
    decision_reason: Mapped[str | None] = mapped_column(Text)
    #: The assignment's answers (migration 0005), as parallel arrays in the order they were
    #: stored: the question (its position in the HIT, migration 0006), the worker's yes/no, the
    #: time it took. ``NULL``
    #: until the first answer. One row written per submission instead of one per answer: storing
    #: a HIT's 55 answers as rows (three indexes each) cost a fifth of the CPU of a whole HIT
    #: cycle (``scripts/bench_compare.py``, issue 4). The row is locked by every writer, so an
    #: answer is stored at most once without a unique index. On PostgreSQL, CHECKs of migration
    #: 0005 (not declared here: SQLite cannot express them) still refuse a question answered twice,
    #: arrays that do not line up and a negative time; on SQLite, 0008's refuse arrays of
    #: different lengths.
    answer_positions: Mapped[list[int] | None] = mapped_column(_array(Integer))
    answer_values: Mapped[list[bool] | None] = mapped_column(_array(Boolean))
    answer_ms: Mapped[list[int] | None] = mapped_column(_array(Integer))
    #: Why each answer was discarded (``NULL`` entries: still valid); ``NULL`` while none is.
    answer_discard_reasons: Mapped[list[str | None] | None] = mapped_column(_array(Text))

    __table_args__ = (
        UniqueConstraint("hit_id", "worker_id"),
        CheckConstraint("gold_correct >= 0 AND gold_correct <= gold_total", name="gold_counts"),
        Index(
            "uq_assignments_external_id",
            "external_id",
            unique=True,
            postgresql_where=text("external_id IS NOT NULL"),
            sqlite_where=text("external_id IS NOT NULL"),
        ),
        Index(None, "worker_id", "status"),
        # Lease sweeps look at live claims only; finished assignments never enter this index.
        Index(
            "ix_assignments_claimed_lease",
            "lease_expires_at",
            postgresql_where=text("status = 'claimed'"),
            sqlite_where=text("status = 'claimed'"),
        ),
    )


class QualificationAttempt(TimestampMixin, Base):
    __tablename__ = "qualification_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    worker_id: Mapped[int] = mapped_column(ForeignKey("workers.id", ondelete="CASCADE"))
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    correct: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    passed: Mapped[bool | None] = mapped_column(Boolean)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("correct >= 0 AND correct <= total", name="counts_valid"),
        Index(None, "worker_id"),
    )


class Question(TimestampMixin, Base):
    """A qualification test's question: a qualification gold item with a random ``public_id``.

    A HIT's questions are not rows: they are arrays of their HIT's row (:class:`Hit`, migration
    0006, read and written by :mod:`service.crowd.questions`), which is why ``kind`` is always
    ``qualification`` here (migration 0007 dropped the columns HIT questions had used).
    """

    __tablename__ = "questions"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(PublicId, unique=True)
    kind: Mapped[QuestionKind] = mapped_column(
        _enum(QuestionKind, "question_kind"), default=QuestionKind.QUALIFICATION
    )
    status: Mapped[QuestionStatus] = mapped_column(
        _enum(QuestionStatus, "question_status"), default=QuestionStatus.OPEN
    )
    #: One question per gold item (:func:`service.crowd.qualification._ensure_pool`). A foreign
    #: key again since 0007: qualification questions are written once per gold item, off the hot
    #: path that made 0002 drop it.
    gold_item_id: Mapped[int] = mapped_column(
        ForeignKey("gold_items.id", ondelete="CASCADE"), unique=True
    )

    __table_args__ = (CheckConstraint("kind = 'qualification'", name="qualification_only"),)


class Answer(TimestampMixin, Base):
    """A worker's yes/no to a qualification question. Unique per (attempt, question): grading
    cannot count an answer twice. (A HIT's answers are arrays of its assignment, migration 0005.)

    ``worker_id`` is the attempt's worker, copied for reading. ``question_id`` carries no foreign
    key (migration 0002): answers are inserted for the questions their attempt was given, which
    go only with their project's gold items, as the attempt and its answers do.
    """

    __tablename__ = "answers"

    id: Mapped[int] = mapped_column(primary_key=True)
    question_id: Mapped[int] = mapped_column(Integer)
    qualification_attempt_id: Mapped[int] = mapped_column(
        ForeignKey("qualification_attempts.id", ondelete="CASCADE")
    )
    worker_id: Mapped[int] = mapped_column(Integer)
    value: Mapped[bool] = mapped_column(Boolean)
    ms: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        Index(
            "uq_answers_qualification_attempt_id_question_id",
            "qualification_attempt_id",
            "question_id",
            unique=True,
        ),
        CheckConstraint("ms >= 0", name="ms_non_negative"),
        Index(None, "question_id"),
    )


class LedgerEntry(TimestampMixin, Base):
    """Every reservation, release and spend of a campaign's money, append-only."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(primary_key=True)
    #: Neither is a foreign key (migration 0004): an entry is written by the statement that moves
    #: its campaign's money, for HITs the transaction holds; campaigns and HITs are never deleted.
    campaign_id: Mapped[int] = mapped_column(Integer)
    hit_id: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[LedgerKind] = mapped_column(_enum(LedgerKind, "ledger_kind"))
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (
        CheckConstraint("amount_micros >= 0", name="amount_non_negative"),
        Index(None, "campaign_id", "kind"),
    )


class Job(TimestampMixin, Base):
    """A background job's durable record. Redis holds the queue; this row survives a Redis flush so a
    reconciler can re-enqueue unfinished work, and serves ``GET /api/v1/jobs/{id}`` without Redis."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    func_name: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(50))
    kwargs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.QUEUED
    )
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    __table_args__ = (
        Index(None, "status"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
    )
