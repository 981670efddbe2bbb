"""The vault's tables for access and agent work: API tokens, registration keys, work leases.

Same portability rules as :mod:`siterecovery.vault.models` (whose ``Base`` these share): aware
UTC timestamps, enums stored by value in ``VARCHAR(32)``. Secrets are never stored: only the
SHA-256 of a high-entropy random secret (a slow password hash adds nothing for 256-bit random
values, and a plain digest allows an indexed lookup).

Created by migration ``0003`` (``0004``: registration keys bound to a host); a test compares
these models with the migrated schema.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, String, false
from sqlalchemy.orm import Mapped, mapped_column, relationship

from siterecovery.vault.models import ENUM_LEN, NAME_LEN, UUID_LEN, Base, Host, Site, Vm

DIGEST_LEN = 64


class Role(enum.StrEnum):
    """What an operator's API token may do; each role includes the ones before it."""

    READER = "reader"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)


class ApiToken(Base):
    """An operator's API token: its name, role, and the digest of its secret."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    role: Mapped[str] = mapped_column(String(ENUM_LEN))
    secret_digest: Mapped[str] = mapped_column(String(DIGEST_LEN), unique=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class RegistrationKey(Base):
    """A one-time, expiring key that lets one host join ``site`` (the seed's vault credentials).

    ``host`` is the only host name it registers (None: a key made before keys were bound,
    which registers new host names only); ``may_replace`` lets it re-register that host when
    it is registered already. ``used_at`` / ``used_by`` are set when a host registers with
    it; it never works again.
    """

    __tablename__ = "registration_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    secret_digest: Mapped[str] = mapped_column(String(DIGEST_LEN), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    used_by: Mapped[str | None] = mapped_column(String(NAME_LEN))
    host: Mapped[str | None] = mapped_column(String(NAME_LEN))
    may_replace: Mapped[bool] = mapped_column(Boolean, server_default=false())

    site: Mapped[Site] = relationship()


class WorkLease(Base):
    """A VM's work claimed by an agent: at most one per VM, so no two cycles ever overlap.

    ``session`` identifies the agent process that claimed it: when the same host comes back
    with a new session, its old leases are stale and handed back to it at once. ``kind`` is
    ``cycle``, ``enable protection`` or ``disable protection``; ``job_id`` names the job of
    a job-backed kind. A lease past ``expires_at`` may be claimed by any agent of the host.
    """

    __tablename__ = "work_leases"

    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    session: Mapped[str] = mapped_column(String(UUID_LEN))
    kind: Mapped[str] = mapped_column(String(ENUM_LEN))
    job_id: Mapped[str | None] = mapped_column(String(UUID_LEN))
    claimed_at: Mapped[datetime]
    expires_at: Mapped[datetime]

    vm: Mapped[Vm] = relationship()
    host: Mapped[Host] = relationship()
