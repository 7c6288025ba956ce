"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["api_key_id"],
            ["api_keys.id"],
            name=op.f("fk_projects_api_key_id_api_keys"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
    )
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_projects_api_key_id"), ["api_key_id"], unique=False)

    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("file_name", sa.String(length=1000), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint("width > 0 AND height > 0", name=op.f("ck_images_positive_size")),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_images_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("project_id", "file_name", name=op.f("uq_images_project_id_file_name")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("func_name", sa.String(length=200), nullable=False),
        sa.Column("queue", sa.String(length=50), nullable=False),
        sa.Column("kwargs", sa.JSON(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "started",
                "finished",
                "failed",
                name="job_status",
                native_enum=False,
                create_constraint=True,
            ),
            nullable=False,
        ),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_jobs_attempts_non_negative")),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_jobs_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_status"), ["status"], unique=False)

    op.create_table(
        "project_classes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.CheckConstraint("length(name) > 0", name=op.f("ck_project_classes_name_not_empty")),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_project_classes_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_project_classes")),
        sa.UniqueConstraint("project_id", "name", name=op.f("uq_project_classes_project_id_name")),
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "training",
                "detecting",
                "clustering",
                "ready",
                "failed",
                name="round_status",
                native_enum=False,
                create_constraint=True,
            ),
            nullable=False,
        ),
        sa.Column("checkpoint_uri", sa.Text(), nullable=True),
        sa.Column("job_id", sa.String(length=200), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint("number >= 1", name=op.f("ck_rounds_number_positive")),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_rounds_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rounds")),
        sa.UniqueConstraint("project_id", "number", name=op.f("uq_rounds_project_id_number")),
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "backend",
            sa.Enum("local", "mturk", name="backend", native_enum=False, create_constraint=True),
            nullable=False,
        ),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=True),
        sa.Column("token_hash", sa.String(length=64), nullable=True),
        sa.Column("qualified", sa.Boolean(), nullable=False),
        sa.Column("qualified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("qualification_attempts", sa.Integer(), nullable=False),
        sa.Column("last_qualification_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("gold_correct", sa.Integer(), nullable=False),
        sa.Column("gold_total", sa.Integer(), nullable=False),
        sa.Column("blocked", sa.Boolean(), nullable=False),
        sa.Column("blocked_reason", sa.Text(), nullable=True),
        sa.Column("blocked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint(
            "NOT blocked OR blocked_reason IS NOT NULL", name=op.f("ck_workers_block_has_reason")
        ),
        sa.CheckConstraint(
            "gold_correct >= 0 AND gold_correct <= gold_total", name=op.f("ck_workers_gold_counts")
        ),
        sa.CheckConstraint(
            "qualification_attempts >= 0", name=op.f("ck_workers_attempts_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_workers_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
        sa.UniqueConstraint("backend", "external_id", name=op.f("uq_workers_backend_external_id")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_workers_token_hash")),
    )
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column(
            "backend",
            sa.Enum("local", "mturk", name="backend", native_enum=False, create_constraint=True),
            nullable=False,
        ),
        sa.Column(
            "status",
            sa.Enum(
                "running",
                "paused",
                "stopped",
                "exhausted",
                "finished",
                name="campaign_status",
                native_enum=False,
                create_constraint=True,
            ),
            nullable=False,
        ),
        sa.Column("budget_micros", sa.BigInteger(), nullable=False),
        sa.Column("reserved_micros", sa.BigInteger(), nullable=False),
        sa.Column("spent_micros", sa.BigInteger(), nullable=False),
        sa.Column("reward_per_hit_micros", sa.BigInteger(), nullable=False),
        sa.Column("questions_per_hit", sa.Integer(), nullable=False),
        sa.Column("gold_per_hit", sa.Integer(), nullable=False),
        sa.Column("assignments_per_hit", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint(
            "assignments_per_hit >= 1", name=op.f("ck_campaigns_assignments_positive")
        ),
        sa.CheckConstraint(
            "budget_micros >= 0 AND reserved_micros >= 0 AND spent_micros >= 0",
            name=op.f("ck_campaigns_money_non_negative"),
        ),
        sa.CheckConstraint("gold_per_hit >= 0", name=op.f("ck_campaigns_gold_non_negative")),
        sa.CheckConstraint("questions_per_hit > 0", name=op.f("ck_campaigns_questions_positive")),
        sa.CheckConstraint(
            "reserved_micros + spent_micros <= budget_micros",
            name=op.f("ck_campaigns_within_budget"),
        ),
        sa.CheckConstraint(
            "reward_per_hit_micros >= 0", name=op.f("ck_campaigns_reward_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_campaigns_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["round_id"],
            ["rounds.id"],
            name=op.f("fk_campaigns_round_id_rounds"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaigns")),
    )
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_campaigns_project_id"), ["project_id"], unique=False)

    op.create_table(
        "gold_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("rle", sa.JSON(), nullable=False),
        sa.Column("iou", sa.Float(), nullable=False),
        sa.Column("expected", sa.Boolean(), nullable=False),
        sa.Column("for_qualification", sa.Boolean(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint("iou >= 0 AND iou <= 1", name=op.f("ck_gold_items_iou_unit_interval")),
        sa.ForeignKeyConstraint(
            ["class_id"],
            ["project_classes.id"],
            name=op.f("fk_gold_items_class_id_project_classes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_gold_items_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_gold_items_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gold_items")),
    )
    with op.batch_alter_table("gold_items", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_gold_items_project_id_for_qualification"),
            ["project_id", "for_qualification"],
            unique=False,
        )

    op.create_table(
        "ground_truth_masks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column(
            "split",
            sa.Enum("seed", "heldout", name="split", native_enum=False, create_constraint=True),
            nullable=False,
        ),
        sa.Column("rle", sa.JSON(), nullable=False),
        sa.Column("area", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint("area >= 0", name=op.f("ck_ground_truth_masks_area_non_negative")),
        sa.ForeignKeyConstraint(
            ["class_id"],
            ["project_classes.id"],
            name=op.f("fk_ground_truth_masks_class_id_project_classes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_ground_truth_masks_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_ground_truth_masks_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ground_truth_masks")),
    )
    with op.batch_alter_table("ground_truth_masks", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ground_truth_masks_image_id"), ["image_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_ground_truth_masks_project_id_split"),
            ["project_id", "split"],
            unique=False,
        )

    op.create_table(
        "qualification_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=True),
        sa.Column("correct", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint(
            "correct >= 0 AND correct <= total", name=op.f("ck_qualification_attempts_counts_valid")
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_qualification_attempts_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["worker_id"],
            ["workers.id"],
            name=op.f("fk_qualification_attempts_worker_id_workers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_qualification_attempts")),
    )
    with op.batch_alter_table("qualification_attempts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_qualification_attempts_worker_id"), ["worker_id"], unique=False
        )

    op.create_table(
        "trees",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("mask_count", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint("mask_count >= 0", name=op.f("ck_trees_mask_count_non_negative")),
        sa.ForeignKeyConstraint(
            ["class_id"],
            ["project_classes.id"],
            name=op.f("fk_trees_class_id_project_classes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_trees_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_trees_round_id_rounds"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trees")),
        sa.UniqueConstraint("id", "project_id", name=op.f("uq_trees_id_project_id")),
        sa.UniqueConstraint("round_id", "class_id", name=op.f("uq_trees_round_id_class_id")),
    )
    op.create_table(
        "clusters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("tree_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("node", sa.BigInteger(), nullable=False),
        sa.Column("lo", sa.BigInteger(), nullable=False),
        sa.Column("hi", sa.BigInteger(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "pending",
                "candidate",
                "active",
                "accepted",
                "rejected",
                "split",
                "auto_rejected",
                "auto_split",
                "skipped",
                name="cluster_state",
                native_enum=False,
                create_constraint=True,
            ),
            nullable=False,
        ),
        sa.Column("yes_count", sa.Integer(), nullable=False),
        sa.Column("no_count", sa.Integer(), nullable=False),
        sa.Column("open_questions", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint("lo >= 0 AND lo < hi", name=op.f("ck_clusters_range_valid")),
        sa.CheckConstraint("size = hi - lo", name=op.f("ck_clusters_size_matches_range")),
        sa.CheckConstraint(
            "yes_count >= 0 AND no_count >= 0 AND open_questions >= 0",
            name=op.f("ck_clusters_counts_non_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["clusters.id"],
            name=op.f("fk_clusters_parent_id_clusters"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_clusters_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tree_id", "project_id"],
            ["trees.id", "trees.project_id"],
            name=op.f("fk_clusters_tree_id_trees"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clusters")),
        sa.UniqueConstraint("tree_id", "node", name=op.f("uq_clusters_tree_id_node")),
    )
    with op.batch_alter_table("clusters", schema=None) as batch_op:
        batch_op.create_index(
            "ix_clusters_candidates",
            ["project_id", "score"],
            unique=False,
            postgresql_where=sa.text("state = 'candidate'"),
            sqlite_where=sa.text("state = 'candidate'"),
        )
        batch_op.create_index(batch_op.f("ix_clusters_tree_id_lo"), ["tree_id", "lo"], unique=False)
        batch_op.create_index(batch_op.f("ix_clusters_parent_id"), ["parent_id"], unique=False)

    op.create_table(
        "hits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "open",
                "assigned",
                "completed",
                "expired",
                "cancelled",
                name="hit_status",
                native_enum=False,
                create_constraint=True,
            ),
            nullable=False,
        ),
        sa.Column("external_id", sa.String(length=200), nullable=True),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("max_assignments", sa.Integer(), nullable=False),
        sa.Column("lease_seconds", sa.Integer(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint("cost_micros >= 0", name=op.f("ck_hits_cost_non_negative")),
        sa.CheckConstraint("max_assignments >= 1", name=op.f("ck_hits_assignments_positive")),
        sa.CheckConstraint("lease_seconds > 0", name=op.f("ck_hits_lease_positive")),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name=op.f("fk_hits_campaign_id_campaigns"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hits")),
    )
    with op.batch_alter_table("hits", schema=None) as batch_op:
        batch_op.create_index(
            "uq_hits_external_id",
            ["external_id"],
            unique=True,
            postgresql_where=sa.text("external_id IS NOT NULL"),
            sqlite_where=sa.text("external_id IS NOT NULL"),
        )
        batch_op.create_index(
            "ix_hits_open",
            ["campaign_id", "id"],
            unique=False,
            postgresql_where=sa.text("status = 'open'"),
            sqlite_where=sa.text("status = 'open'"),
        )

    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hit_id", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.Integer(), nullable=False),
        sa.Column(
            "public_id",
            sa.String(length=64).with_variant(sa.String(length=64, collation="C"), "postgresql"),
            nullable=False,
        ),
        sa.Column("external_id", sa.String(length=200), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "claimed",
                "submitted",
                "approved",
                "rejected",
                "expired",
                name="assignment_status",
                native_enum=False,
                create_constraint=True,
            ),
            nullable=False,
        ),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("gold_correct", sa.Integer(), nullable=False),
        sa.Column("gold_total", sa.Integer(), nullable=False),
        sa.Column("decision_reason", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint(
            "gold_correct >= 0 AND gold_correct <= gold_total",
            name=op.f("ck_assignments_gold_counts"),
        ),
        sa.ForeignKeyConstraint(
            ["hit_id"], ["hits.id"], name=op.f("fk_assignments_hit_id_hits"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["worker_id"],
            ["workers.id"],
            name=op.f("fk_assignments_worker_id_workers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assignments")),
        sa.UniqueConstraint("hit_id", "worker_id", name=op.f("uq_assignments_hit_id_worker_id")),
        sa.UniqueConstraint("public_id", name=op.f("uq_assignments_public_id")),
    )
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.create_index(
            "ix_assignments_claimed_lease",
            ["lease_expires_at"],
            unique=False,
            postgresql_where=sa.text("status = 'claimed'"),
            sqlite_where=sa.text("status = 'claimed'"),
        )
        batch_op.create_index(
            "uq_assignments_external_id",
            ["external_id"],
            unique=True,
            postgresql_where=sa.text("external_id IS NOT NULL"),
            sqlite_where=sa.text("external_id IS NOT NULL"),
        )
        batch_op.create_index(
            batch_op.f("ix_assignments_worker_id_status"), ["worker_id", "status"], unique=False
        )

    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("hit_id", sa.Integer(), nullable=True),
        sa.Column(
            "kind",
            sa.Enum(
                "reserve",
                "release",
                "spend",
                name="ledger_kind",
                native_enum=False,
                create_constraint=True,
            ),
            nullable=False,
        ),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint(
            "amount_micros >= 0", name=op.f("ck_ledger_entries_amount_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name=op.f("fk_ledger_entries_campaign_id_campaigns"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["hit_id"], ["hits.id"], name=op.f("fk_ledger_entries_hit_id_hits"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
    )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ledger_entries_campaign_id_kind"), ["campaign_id", "kind"], unique=False
        )

    op.create_table(
        "questions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "public_id",
            sa.String(length=64).with_variant(sa.String(length=64, collation="C"), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "kind",
            sa.Enum(
                "sample",
                "gold",
                "qualification",
                name="question_kind",
                native_enum=False,
                create_constraint=True,
            ),
            nullable=False,
        ),
        sa.Column(
            "status",
            sa.Enum(
                "open",
                "answered",
                "discarded",
                name="question_status",
                native_enum=False,
                create_constraint=True,
            ),
            nullable=False,
        ),
        sa.Column("hit_id", sa.Integer(), nullable=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=True),
        sa.Column("tree_id", sa.Integer(), nullable=True),
        sa.Column("leaf_pos", sa.BigInteger(), nullable=True),
        sa.Column("gold_item_id", sa.Integer(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint(
            "(kind = 'sample' AND tree_id IS NOT NULL AND leaf_pos IS NOT NULL AND cluster_id IS NOT NULL AND gold_item_id IS NULL) OR (kind <> 'sample' AND gold_item_id IS NOT NULL AND tree_id IS NULL AND leaf_pos IS NULL AND cluster_id IS NULL)",
            name=op.f("ck_questions_target_matches_kind"),
        ),
        sa.CheckConstraint(
            "leaf_pos IS NULL OR leaf_pos >= 0", name=op.f("ck_questions_leaf_pos_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["gold_item_id"],
            ["gold_items.id"],
            name=op.f("fk_questions_gold_item_id_gold_items"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["hit_id"], ["hits.id"], name=op.f("fk_questions_hit_id_hits"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_questions")),
        sa.UniqueConstraint("public_id", name=op.f("uq_questions_public_id")),
        postgresql_with={"fillfactor": 80},
    )
    with op.batch_alter_table("questions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_questions_cluster_id"), ["cluster_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_questions_hit_id_position"), ["hit_id", "position"], unique=False
        )

    op.create_table(
        "answers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("question_id", sa.Integer(), nullable=False),
        sa.Column("assignment_id", sa.Integer(), nullable=True),
        sa.Column("qualification_attempt_id", sa.Integer(), nullable=True),
        sa.Column("worker_id", sa.Integer(), nullable=False),
        sa.Column("value", sa.Boolean(), nullable=False),
        sa.Column("ms", sa.Integer(), nullable=False),
        sa.Column("discarded", sa.Boolean(), nullable=False),
        sa.Column("discard_reason", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint(
            "(assignment_id IS NULL) <> (qualification_attempt_id IS NULL)",
            name=op.f("ck_answers_one_parent"),
        ),
        sa.CheckConstraint(
            "NOT discarded OR discard_reason IS NOT NULL",
            name=op.f("ck_answers_discard_has_reason"),
        ),
        sa.CheckConstraint("ms >= 0", name=op.f("ck_answers_ms_non_negative")),
        sa.ForeignKeyConstraint(
            ["qualification_attempt_id"],
            ["qualification_attempts.id"],
            name=op.f("fk_answers_qualification_attempt_id_qualification_attempts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["question_id"],
            ["questions.id"],
            name=op.f("fk_answers_question_id_questions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_answers")),
    )
    with op.batch_alter_table("answers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_answers_question_id"), ["question_id"], unique=False)
        batch_op.create_index(
            "uq_answers_assignment_id_question_id",
            ["assignment_id", "question_id"],
            unique=True,
            postgresql_where=sa.text("assignment_id IS NOT NULL"),
            sqlite_where=sa.text("assignment_id IS NOT NULL"),
        )
        batch_op.create_index(
            "uq_answers_qualification_attempt_id_question_id",
            ["qualification_attempt_id", "question_id"],
            unique=True,
            postgresql_where=sa.text("qualification_attempt_id IS NOT NULL"),
            sqlite_where=sa.text("qualification_attempt_id IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("answers", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_answers_qualification_attempt_id_question_id",
            postgresql_where=sa.text("qualification_attempt_id IS NOT NULL"),
            sqlite_where=sa.text("qualification_attempt_id IS NOT NULL"),
        )
        batch_op.drop_index(
            "uq_answers_assignment_id_question_id",
            postgresql_where=sa.text("assignment_id IS NOT NULL"),
            sqlite_where=sa.text("assignment_id IS NOT NULL"),
        )
        batch_op.drop_index(batch_op.f("ix_answers_question_id"))

    op.drop_table("answers")
    with op.batch_alter_table("questions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_questions_hit_id_position"))
        batch_op.drop_index(batch_op.f("ix_questions_cluster_id"))

    op.drop_table("questions")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_entries_campaign_id_kind"))

    op.drop_table("ledger_entries")
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_assignments_worker_id_status"))
        batch_op.drop_index(
            "uq_assignments_external_id",
            postgresql_where=sa.text("external_id IS NOT NULL"),
            sqlite_where=sa.text("external_id IS NOT NULL"),
        )
        batch_op.drop_index(
            "ix_assignments_claimed_lease",
            postgresql_where=sa.text("status = 'claimed'"),
            sqlite_where=sa.text("status = 'claimed'"),
        )

    op.drop_table("assignments")
    with op.batch_alter_table("hits", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_hits_open",
            postgresql_where=sa.text("status = 'open'"),
            sqlite_where=sa.text("status = 'open'"),
        )
        batch_op.drop_index(
            "uq_hits_external_id",
            postgresql_where=sa.text("external_id IS NOT NULL"),
            sqlite_where=sa.text("external_id IS NOT NULL"),
        )

    op.drop_table("hits")
    with op.batch_alter_table("clusters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_clusters_parent_id"))
        batch_op.drop_index(batch_op.f("ix_clusters_tree_id_lo"))
        batch_op.drop_index(
            "ix_clusters_candidates",
            postgresql_where=sa.text("state = 'candidate'"),
            sqlite_where=sa.text("state = 'candidate'"),
        )

    op.drop_table("clusters")
    op.drop_table("trees")
    with op.batch_alter_table("qualification_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_qualification_attempts_worker_id"))

    op.drop_table("qualification_attempts")
    with op.batch_alter_table("ground_truth_masks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ground_truth_masks_project_id_split"))
        batch_op.drop_index(batch_op.f("ix_ground_truth_masks_image_id"))

    op.drop_table("ground_truth_masks")
    with op.batch_alter_table("gold_items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gold_items_project_id_for_qualification"))

    op.drop_table("gold_items")
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_campaigns_project_id"))

    op.drop_table("campaigns")
    op.drop_table("workers")
    op.drop_table("rounds")
    op.drop_table("project_classes")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_status"))

    op.drop_table("jobs")
    op.drop_table("images")
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_projects_api_key_id"))

    op.drop_table("projects")
    op.drop_table("api_keys")
