"""The vault's tables as SQLAlchemy 2 typed declarative models.

Portability rules (SQLite is the embedded default, PostgreSQL the scale-out option):

- timestamps are :class:`UtcDateTime`: timezone-aware UTC in Python, ``TIMESTAMP WITH TIME
  ZONE`` where the database has it; a naive datetime is refused on write;
- enums are stored as their string *values* (``'enabling protection'``) in ``VARCHAR`` columns,
  never as native database enums, so adding a state needs no ``ALTER TYPE``;
- ids that leave the vault (jobs, replication relationships) are UUID strings;
- JSON columns hold plain objects and are always replaced, never mutated in place (in-place
  changes are not tracked by the ORM).

The schema itself is created by the Alembic migrations in ``migrations/versions``; these models
must describe exactly the same schema (a test compares them).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, validates

from siterecovery.domain import (
    COPY_FREQUENCIES_S,
    Consistency,
    Health,
    JobState,
    ReplicationState,
)
from siterecovery.policies.states import ErrorClass

#: Constraint names are explicit so later migrations can drop/alter them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NAME_LEN = 63
LABEL_LEN = 100
UUID_LEN = 36
ENUM_LEN = 32


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database.

    SQLite keeps no zone, so values are stored as naive UTC there and given ``UTC`` back on
    read; PostgreSQL stores ``timestamptz`` and values are converted to UTC on read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} refused: the vault stores aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def str_enum(cls: type[enum.Enum]) -> Enum:
    """A column type storing ``cls`` by value in a plain ``VARCHAR(32)``."""
    return Enum(
        cls,
        native_enum=False,
        create_constraint=False,
        length=ENUM_LEN,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class SiteRole(enum.StrEnum):
    """Which side of the DR relationship a site is on."""

    PRIMARY = "primary"
    RECOVERY = "recovery"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads this class attribute)
        datetime: UtcDateTime(),
        dict[str, Any]: JSON(),
        ReplicationState: str_enum(ReplicationState),
        Health: str_enum(Health),
        JobState: str_enum(JobState),
        Consistency: str_enum(Consistency),
        SiteRole: str_enum(SiteRole),
        ErrorClass: str_enum(ErrorClass),
    }


class Site(Base):
    """A group of hosts on one side: primary or recovery."""

    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    role: Mapped[SiteRole]
    created_at: Mapped[datetime]

    hosts: Mapped[list[Host]] = relationship(back_populates="site")


class Host(Base):
    """A hypervisor host registered in the vault; its agent reports heartbeats."""

    __tablename__ = "hosts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="RESTRICT"), index=True)
    last_heartbeat: Mapped[datetime | None]
    #: Hash of the host's own credential (never the credential itself); None until registered.
    credential_hash: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime]

    site: Mapped[Site] = relationship(back_populates="hosts")
    vms: Mapped[list[Vm]] = relationship(back_populates="host")


class Vm(Base):
    """A VM an agent reports. Names are unique in the vault: operators address VMs by name."""

    __tablename__ = "vms"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="RESTRICT"), index=True)
    #: What is needed to start the same machine elsewhere (cpus, memory, nics, boot...).
    config: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    host: Mapped[Host] = relationship(back_populates="vms")
    disks: Mapped[list[Disk]] = relationship(
        back_populates="vm", cascade="all, delete-orphan", order_by="Disk.name"
    )
    replicated: Mapped[ReplicatedVm | None] = relationship(back_populates="vm")


class Disk(Base):
    """A disk of a VM: size in bytes, QEMU block node name and image path on its host."""

    __tablename__ = "disks"
    __table_args__ = (
        UniqueConstraint("vm_id", "name"),
        CheckConstraint("size > 0", name="size_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    size: Mapped[int] = mapped_column(BigInteger)
    node_name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(String(4096))

    vm: Mapped[Vm] = relationship(back_populates="disks")


class Policy(Base):
    """A replication policy (DESIGN §1).

    ``resync_window`` is the off-hours window ``"HH:MM-HH:MM"`` (UTC, may wrap midnight): resync
    runs inside it, and ``bandwidth_offhours_mbps`` applies in it, ``bandwidth_work_mbps``
    outside it. A bandwidth of None means unlimited.
    """

    __tablename__ = "policies"
    __table_args__ = (
        CheckConstraint("copy_frequency_s IN (30, 300, 900)", name="copy_frequency"),
        CheckConstraint("retention_h > 0", name="retention_positive"),
        CheckConstraint("app_consistent_h >= 0", name="app_consistent_not_negative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    copy_frequency_s: Mapped[int]
    retention_h: Mapped[int]
    #: Hours between app-consistent points; 0 turns them off.
    app_consistent_h: Mapped[int]
    resync_window: Mapped[str] = mapped_column(String(11))
    encryption: Mapped[bool] = mapped_column(Boolean)
    bandwidth_work_mbps: Mapped[int | None]
    bandwidth_offhours_mbps: Mapped[int | None]
    created_at: Mapped[datetime]

    @validates("copy_frequency_s")
    def _check_frequency(self, _key: str, value: int) -> int:
        # The service validates with a friendly message; this guards direct ORM use.
        if value not in COPY_FREQUENCIES_S:
            raise ValueError(f"copy frequency {value}s is not one of {COPY_FREQUENCIES_S}")
        return value


class ReplicatedVm(Base):
    """A VM with protection enabled, and where its state machine (DESIGN §4) stands.

    ``relationship_id`` is a UUID made at protect time; dirty bitmaps and store prefixes are
    named after it, so a re-protected VM never picks up a previous relationship's state.
    """

    __tablename__ = "replicated_vms"
    __table_args__ = (CheckConstraint("attempts >= 0", name="attempts_not_negative"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), unique=True)
    policy_id: Mapped[int] = mapped_column(
        ForeignKey("policies.id", ondelete="RESTRICT"), index=True
    )
    relationship_id: Mapped[str] = mapped_column(String(UUID_LEN), unique=True)
    state: Mapped[ReplicationState]
    #: Why the last transition happened (operator text or error summary).
    state_reason: Mapped[str] = mapped_column(Text)
    state_changed_at: Mapped[datetime]
    health: Mapped[Health]
    health_reason: Mapped[str] = mapped_column(Text)
    last_point_id: Mapped[str | None] = mapped_column(String(NAME_LEN))
    last_cycle_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    error_class: Mapped[ErrorClass | None]
    #: Consecutive failed attempts since the last good cycle (drives the retry backoff).
    attempts: Mapped[int]
    next_retry_at: Mapped[datetime | None]
    resync_required_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]

    vm: Mapped[Vm] = relationship(back_populates="replicated")
    policy: Mapped[Policy] = relationship()


class Job(Base):
    """A long operation made of named tasks; ``progress`` (0-100) is derived from the tasks."""

    __tablename__ = "jobs"
    __table_args__ = (CheckConstraint("progress BETWEEN 0 AND 100", name="progress_range"),)

    id: Mapped[str] = mapped_column(String(UUID_LEN), primary_key=True)
    kind: Mapped[str] = mapped_column(String(LABEL_LEN))
    vm_id: Mapped[int | None] = mapped_column(ForeignKey("vms.id", ondelete="SET NULL"), index=True)
    state: Mapped[JobState]
    created_at: Mapped[datetime] = mapped_column(index=True)
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[int]
    details: Mapped[dict[str, Any]]

    vm: Mapped[Vm | None] = relationship()
    tasks: Mapped[list[JobTask]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="JobTask.seq"
    )


class JobTask(Base):
    """One named step of a job, run in ``seq`` order."""

    __tablename__ = "job_tasks"
    __table_args__ = (
        UniqueConstraint("job_id", "seq"),
        UniqueConstraint("job_id", "name"),
        CheckConstraint("progress BETWEEN 0 AND 100", name="progress_range"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(LABEL_LEN))
    state: Mapped[JobState]
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    progress: Mapped[int]
    error: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]]

    job: Mapped[Job] = relationship(back_populates="tasks")


class RecoveryPoint(Base):
    """A recovery point of a VM as recorded in the replica store.

    ``point_id`` is the store's id, unique per VM; ``bytes_shipped`` is what the cycle uploaded;
    ``figures`` holds the cycle's measurements (durations, extents, per-disk bytes...).
    """

    __tablename__ = "recovery_points"
    __table_args__ = (CheckConstraint("bytes_shipped >= 0", name="bytes_not_negative"),)

    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True)
    point_id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    consistency: Mapped[Consistency]
    manifest_key: Mapped[str] = mapped_column(String(1024))
    bytes_shipped: Mapped[int] = mapped_column(BigInteger)
    figures: Mapped[dict[str, Any]]

    vm: Mapped[Vm] = relationship()


class RecoveryNetwork(Base):
    """A network of the recovery host that replica VMs attach to (DESIGN §5).

    ``kind`` is ``user`` (QEMU user-mode networking: NAT to the outside) or ``isolated`` (the
    same without any route out, for drills); ``subnet`` is the IPv4 CIDR the guest sees.
    """

    __tablename__ = "recovery_networks"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    kind: Mapped[str] = mapped_column(String(ENUM_LEN))
    subnet: Mapped[str] = mapped_column(String(43))
    created_at: Mapped[datetime]


class NetworkMapping(Base):
    """Source network (a VM NIC's ``network``) → recovery network, and the drills' network."""

    __tablename__ = "network_mappings"

    id: Mapped[int] = mapped_column(primary_key=True)
    source_network: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    recovery_network_id: Mapped[int] = mapped_column(
        ForeignKey("recovery_networks.id", ondelete="RESTRICT")
    )
    test_network_id: Mapped[int] = mapped_column(
        ForeignKey("recovery_networks.id", ondelete="RESTRICT")
    )
    created_at: Mapped[datetime]

    recovery_network: Mapped[RecoveryNetwork] = relationship(foreign_keys=[recovery_network_id])
    test_network: Mapped[RecoveryNetwork] = relationship(foreign_keys=[test_network_id])


# The access and work tables share this metadata; import them so that every user of the
# models (migrations, schema comparison, sessions) sees the whole schema.
from siterecovery.vault import auth_models  # noqa: E402, F401
