"""Initial vault schema: sites, hosts, VMs, disks, policies, replicated VMs, jobs, points.

Written by hand to stay independent of the models (which will change): enums are plain
``VARCHAR(32)`` holding the enum values, timestamps are ``TIMESTAMP WITH TIME ZONE``.

Revision ID: 0001
Revises:
Create Date: 2025-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.Column[int]:
    return sa.Column("id", sa.Integer(), primary_key=True)


def _name(column: str = "name", length: int = 63) -> sa.Column[str]:
    return sa.Column(column, sa.String(length), nullable=False)


def _ts(column: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(column, sa.DateTime(timezone=True), nullable=nullable)


def _enum(column: str, *, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(column, sa.String(32), nullable=nullable)


def upgrade() -> None:
    _create_inventory()
    _create_protection()
    _create_jobs()


def _create_inventory() -> None:
    op.create_table(
        "sites",
        _id(),
        _name(),
        _enum("role"),
        _ts("created_at"),
        sa.UniqueConstraint("name", name=op.f("uq_sites_name")),
    )
    op.create_table(
        "hosts",
        _id(),
        _name(),
        sa.Column("site_id", sa.Integer(), nullable=False),
        _ts("last_heartbeat", nullable=True),
        sa.Column("credential_hash", sa.String(255), nullable=True),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["site_id"], ["sites.id"], name=op.f("fk_hosts_site_id_sites"), ondelete="RESTRICT"
        ),
        sa.UniqueConstraint("name", name=op.f("uq_hosts_name")),
    )
    op.create_index(op.f("ix_hosts_site_id"), "hosts", ["site_id"])
    op.create_table(
        "vms",
        _id(),
        _name(),
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["host_id"], ["hosts.id"], name=op.f("fk_vms_host_id_hosts"), ondelete="RESTRICT"
        ),
        sa.UniqueConstraint("name", name=op.f("uq_vms_name")),
    )
    op.create_index(op.f("ix_vms_host_id"), "vms", ["host_id"])
    op.create_table(
        "disks",
        _id(),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        _name(),
        sa.Column("size", sa.BigInteger(), nullable=False),
        _name("node_name", 255),
        _name("path", 4096),
        sa.CheckConstraint("size > 0", name=op.f("ck_disks_size_positive")),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_disks_vm_id_vms"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint("vm_id", "name", name=op.f("uq_disks_vm_id_name")),
    )


def _create_protection() -> None:
    op.create_table(
        "policies",
        _id(),
        _name(),
        sa.Column("copy_frequency_s", sa.Integer(), nullable=False),
        sa.Column("retention_h", sa.Integer(), nullable=False),
        sa.Column("app_consistent_h", sa.Integer(), nullable=False),
        sa.Column("resync_window", sa.String(11), nullable=False),
        sa.Column("encryption", sa.Boolean(), nullable=False),
        sa.Column("bandwidth_work_mbps", sa.Integer(), nullable=True),
        sa.Column("bandwidth_offhours_mbps", sa.Integer(), nullable=True),
        _ts("created_at"),
        sa.CheckConstraint(
            "copy_frequency_s IN (30, 300, 900)", name=op.f("ck_policies_copy_frequency")
        ),
        sa.CheckConstraint("retention_h > 0", name=op.f("ck_policies_retention_positive")),
        sa.CheckConstraint(
            "app_consistent_h >= 0", name=op.f("ck_policies_app_consistent_not_negative")
        ),
        sa.UniqueConstraint("name", name=op.f("uq_policies_name")),
    )
    op.create_table(
        "replicated_vms",
        _id(),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("policy_id", sa.Integer(), nullable=False),
        _name("relationship_id", 36),
        _enum("state"),
        sa.Column("state_reason", sa.Text(), nullable=False),
        _ts("state_changed_at"),
        _enum("health"),
        sa.Column("health_reason", sa.Text(), nullable=False),
        sa.Column("last_point_id", sa.String(63), nullable=True),
        _ts("last_cycle_at", nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        _enum("error_class", nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("next_retry_at", nullable=True),
        sa.Column("resync_required_reason", sa.Text(), nullable=True),
        _ts("created_at"),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_replicated_vms_attempts_not_negative")),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["policies.id"],
            name=op.f("fk_replicated_vms_policy_id_policies"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_replicated_vms_vm_id_vms"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint("relationship_id", name=op.f("uq_replicated_vms_relationship_id")),
        sa.UniqueConstraint("vm_id", name=op.f("uq_replicated_vms_vm_id")),
    )
    op.create_index(op.f("ix_replicated_vms_policy_id"), "replicated_vms", ["policy_id"])
    op.create_table(
        "recovery_points",
        sa.Column("vm_id", sa.Integer(), primary_key=True),
        sa.Column("point_id", sa.String(63), primary_key=True),
        _ts("created_at"),
        _enum("consistency"),
        sa.Column("manifest_key", sa.String(1024), nullable=False),
        sa.Column("bytes_shipped", sa.BigInteger(), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.CheckConstraint(
            "bytes_shipped >= 0", name=op.f("ck_recovery_points_bytes_not_negative")
        ),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_recovery_points_vm_id_vms"), ondelete="CASCADE"
        ),
    )
    op.create_index(op.f("ix_recovery_points_created_at"), "recovery_points", ["created_at"])


def _create_jobs() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        _name("kind", 100),
        sa.Column("vm_id", sa.Integer(), nullable=True),
        _enum("state"),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("ended_at", nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.CheckConstraint("progress BETWEEN 0 AND 100", name=op.f("ck_jobs_progress_range")),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_jobs_vm_id_vms"), ondelete="SET NULL"
        ),
    )
    op.create_index(op.f("ix_jobs_created_at"), "jobs", ["created_at"])
    op.create_index(op.f("ix_jobs_vm_id"), "jobs", ["vm_id"])
    op.create_table(
        "job_tasks",
        _id(),
        _name("job_id", 36),
        sa.Column("seq", sa.Integer(), nullable=False),
        _name("name", 100),
        _enum("state"),
        _ts("started_at", nullable=True),
        _ts("ended_at", nullable=True),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.CheckConstraint("progress BETWEEN 0 AND 100", name=op.f("ck_job_tasks_progress_range")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_tasks_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint("job_id", "name", name=op.f("uq_job_tasks_job_id_name")),
        sa.UniqueConstraint("job_id", "seq", name=op.f("uq_job_tasks_job_id_seq")),
    )


def downgrade() -> None:
    for table in (
        "job_tasks",
        "jobs",
        "recovery_points",
        "replicated_vms",
        "policies",
        "disks",
        "vms",
        "hosts",
        "sites",
    ):
        op.drop_table(table)
