"""Registration keys are bound to one host name (DESIGN §6).

``registration_keys.host`` is the one host name a key registers; ``may_replace`` says whether
it may also re-register that host when it is registered already (a reinstalled host: the old
credential stops working). Keys made before this revision have no host: they may register a
new host name only, never take over a registered one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("registration_keys") as batch:
        batch.add_column(sa.Column("host", sa.String(63), nullable=True))
        batch.add_column(
            sa.Column("may_replace", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("registration_keys") as batch:
        batch.drop_column("may_replace")
        batch.drop_column("host")
