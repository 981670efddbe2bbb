"""API tokens, registration keys and work leases (the vault as a service, DESIGN §2, §6).

Revision ID: 0003
Revises: 0002
Create Date: 2025-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# The tables' models live in their own module; importing it here puts them into the shared
# metadata whenever the migrations are loaded (Alembic's env and the schema comparison test).
import siterecovery.vault.auth_models  # noqa: F401

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(column: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(column, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("secret_digest", sa.String(64), nullable=False),
        _ts("created_at"),
        _ts("expires_at", nullable=True),
        _ts("revoked_at", nullable=True),
        sa.UniqueConstraint("name", name=op.f("uq_api_tokens_name")),
        sa.UniqueConstraint("secret_digest", name=op.f("uq_api_tokens_secret_digest")),
    )
    op.create_table(
        "registration_keys",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("secret_digest", sa.String(64), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
        _ts("used_at", nullable=True),
        sa.Column("used_by", sa.String(63), nullable=True),
        sa.UniqueConstraint("secret_digest", name=op.f("uq_registration_keys_secret_digest")),
        sa.ForeignKeyConstraint(
            ["site_id"],
            ["sites.id"],
            ondelete="CASCADE",
            name=op.f("fk_registration_keys_site_id_sites"),
        ),
    )
    op.create_index(op.f("ix_registration_keys_site_id"), "registration_keys", ["site_id"])
    op.create_table(
        "work_leases",
        sa.Column("vm_id", sa.Integer(), primary_key=True),
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("session", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=True),
        _ts("claimed_at"),
        _ts("expires_at"),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], ondelete="CASCADE", name=op.f("fk_work_leases_vm_id_vms")
        ),
        sa.ForeignKeyConstraint(
            ["host_id"],
            ["hosts.id"],
            ondelete="CASCADE",
            name=op.f("fk_work_leases_host_id_hosts"),
        ),
    )
    op.create_index(op.f("ix_work_leases_host_id"), "work_leases", ["host_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_work_leases_host_id"), table_name="work_leases")
    op.drop_table("work_leases")
    op.drop_index(op.f("ix_registration_keys_site_id"), table_name="registration_keys")
    op.drop_table("registration_keys")
    op.drop_table("api_tokens")
