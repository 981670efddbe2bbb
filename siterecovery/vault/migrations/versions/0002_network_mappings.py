"""Recovery networks and network mappings (DESIGN §5: source network → recovery network).

``recovery_networks`` are the networks a recovery host can attach a replica VM to (``kind``
``user``: NAT to the outside; ``isolated``: no route out, for drills). ``network_mappings``
map a source network name (as in the VM's NIC config) to its recovery network and to the
isolated network drills use.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "recovery_networks",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("subnet", sa.String(43), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", name=op.f("uq_recovery_networks_name")),
    )
    op.create_table(
        "network_mappings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("source_network", sa.String(63), nullable=False),
        sa.Column("recovery_network_id", sa.Integer(), nullable=False),
        sa.Column("test_network_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("source_network", name=op.f("uq_network_mappings_source_network")),
        sa.ForeignKeyConstraint(
            ["recovery_network_id"], ["recovery_networks.id"], ondelete="RESTRICT",
            name=op.f("fk_network_mappings_recovery_network_id_recovery_networks"),
        ),
        sa.ForeignKeyConstraint(
            ["test_network_id"], ["recovery_networks.id"], ondelete="RESTRICT",
            name=op.f("fk_network_mappings_test_network_id_recovery_networks"),
        ),
    )


def downgrade() -> None:
    op.drop_table("network_mappings")
    op.drop_table("recovery_networks")
