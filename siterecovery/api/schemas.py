"""Request bodies and path parameters of the vault API: the shapes validated (422) before any
service runs.

Pydantic stops here: views pass plain values to the vault services, which validate again
(ranges, names) and raise domain errors. Free texts refuse NUL characters, which PostgreSQL
cannot store; integers are bounded so no database ever overflows; free-form JSON fields
(:data:`FreeJson`) are bounded in depth and size (:mod:`siterecovery.vault.limits`); times
must be representable in UTC. Patterns are matched whole (pydantic's regex engine: ``$`` is
the end of the text, a trailing newline does not match).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from siterecovery.domain import Consistency, ReplicationState
from siterecovery.errors import InputError
from siterecovery.vault import checks, limits

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._:/()-]{0,99}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
Text = Annotated[str, Field(min_length=1, max_length=10_000, pattern=r"^[^\x00]*$")]
Session = Annotated[str, Field(pattern=UUID_PATTERN, description="agent session (a UUID)")]
MAX_BYTES = (1 << 62) - 1

#: The pattern of each path parameter, by its name (see :data:`siterecovery.api.deps.PATH_PARAMS`).
PATH_PATTERNS = {
    "vm": NAME_PATTERN,
    "name": NAME_PATTERN,
    "job_id": UUID_PATTERN,
    "task": LABEL_PATTERN,
}


def _bounded_json(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` if within the JSON bounds; ValueError (pydantic's 422) otherwise."""
    try:
        return checks.json_object("free-form JSON", value)
    except InputError as exc:
        raise ValueError(exc.message) from None


def _in_utc(value: datetime) -> datetime:
    """``value`` in UTC; ValueError (422) when UTC cannot represent it."""
    try:
        return checks.utc("time", value)
    except InputError as exc:
        raise ValueError(exc.message) from None


FreeJson = Annotated[
    dict[str, Any],
    AfterValidator(_bounded_json),
    Field(description=f"a JSON object at most {limits.MAX_JSON_DEPTH} levels deep and "
                      f"{limits.MAX_JSON_BYTES} bytes serialized"),
]  # fmt: skip
UtcTime = Annotated[AwareDatetime, AfterValidator(_in_utc)]


class Body(BaseModel):
    """Base of every request body: unknown fields are an error, not silently dropped.

    They are refused in one error naming at most ten of them, before the fields are
    validated: a body of many unknown fields costs no more than one of them.
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                shown = ", ".join(repr(str(k))[:70] for k in unknown[:10])
                more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
                raise ValueError(f"unknown fields {shown}{more}")
        return data


class SiteCreate(Body):
    name: Name
    role: Literal["primary", "recovery"] = "primary"


def _drop_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


#: The default of a setting an update leaves out: not shown, never stored (exclude_unset).
_LEFT_OUT: Any = Field(default=None, json_schema_extra=_drop_default)


class PolicySettings(Body):
    """Every policy setting optional: the body of an update. Settings every policy has may be
    left out but not set to null (422); the bandwidths may be null: unlimited."""

    copy_frequency_s: Literal[30, 300, 900] | SkipJsonSchema[None] = _LEFT_OUT
    retention_h: Annotated[int, Field(ge=1, le=8760)] | SkipJsonSchema[None] = _LEFT_OUT
    app_consistent_h: Annotated[int, Field(ge=0, le=12)] | SkipJsonSchema[None] = _LEFT_OUT
    resync_window: (
        Annotated[str, Field(pattern=r"^\d\d:\d\d-\d\d:\d\d$")] | SkipJsonSchema[None]
    ) = _LEFT_OUT
    encryption: bool | SkipJsonSchema[None] = _LEFT_OUT
    bandwidth_work_mbps: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    bandwidth_offhours_mbps: Annotated[int, Field(ge=1, le=1_000_000)] | None = None

    @field_validator(
        "copy_frequency_s", "retention_h", "app_consistent_h", "resync_window", "encryption",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("this setting may be left out, but not null")
        return value


class PolicyCreate(Body):
    name: Name
    copy_frequency_s: Literal[30, 300, 900] = 300
    retention_h: Annotated[int, Field(ge=1, le=8760)] = 24
    app_consistent_h: Annotated[int, Field(ge=0, le=12)] = 0
    resync_window: Annotated[str, Field(pattern=r"^\d\d:\d\d-\d\d:\d\d$")] = "18:30-06:00"
    encryption: bool = False
    bandwidth_work_mbps: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    bandwidth_offhours_mbps: Annotated[int, Field(ge=1, le=1_000_000)] | None = None


class ProtectRequest(Body):
    policy: Name


class AssignPolicy(Body):
    policy: Name


class DrillCheckIn(Body):
    """A drill's check: a console line (``serial``) or an exposed TCP port answering."""

    kind: Literal["serial", "port"]
    pattern: Annotated[str, Field(max_length=1024, pattern=r"^[^\x00]*$")] = ""
    port: Annotated[int, Field(ge=0, le=65535)] = 0
    http: bool = True
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0


class FailoverOptionsIn(Body):
    """How the recovery agent starts the replica (see ``FailoverOptions``); ``check`` is a
    drill's check (test failovers only)."""

    mode: Literal["instant", "full"] | None = None
    expose: Annotated[
        list[Annotated[str, Field(pattern=r"^(\d{1,3}(\.\d{1,3}){3}:)?\d{1,5}:\d{1,5}$")]],
        Field(max_length=16),
    ] = Field(default_factory=list)
    append: Annotated[str, Field(max_length=4096, pattern=r"^[^\x00]*$")] | None = None
    check: DrillCheckIn | None = None


class FailoverRequest(Body):
    """``point``: a point id, ``latest`` or ``latest-app`` (planned: always the final one)."""

    kind: Literal["test", "planned", "unplanned"]
    point: Name | None = None
    options: FailoverOptionsIn = Field(default_factory=FailoverOptionsIn)


class NetworkCreate(Body):
    name: Name
    kind: Literal["user", "isolated"] = "user"
    subnet: Annotated[str, Field(pattern=r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$")] = "10.0.2.0/24"


class NetworkMap(Body):
    source: Name
    recovery: Name
    test: Name


class ChangePointRequest(Body):
    point: Name


class ResyncRequest(Body):
    full: bool = False
    reason: Text | None = None


class CancelRequest(Body):
    """Why an operator cancels a job (kept in the job's error)."""

    reason: Annotated[str, Field(min_length=1, max_length=500, pattern=r"^[^\x00]*$")] | None = None


class HandOffRequest(Body):
    """Hand a planned failover to the other site: ``recovery`` or ``source-finish``."""

    session: Session
    phase: Literal["recovery", "source-finish"]
    details: FreeJson = Field(default_factory=dict)


class TokenCreate(Body):
    name: Name
    role: Literal["reader", "operator", "admin"]
    ttl_s: Annotated[int, Field(ge=1, le=10 * 365 * 86400)] | None = None


class RegistrationKeyCreate(Body):
    """A key for ``host`` to join ``site``; ``replace``: it may re-register that host when it
    is registered already (its current credential then stops working)."""

    site: Name
    host: Name
    site_role: Literal["primary", "recovery"] = "primary"
    ttl_s: Annotated[int, Field(ge=1, le=5 * 86400)] = 86400
    replace: bool = False


class RegisterRequest(Body):
    key: Annotated[str, Field(min_length=1, max_length=200)]
    host: Name


class HeartbeatRequest(Body):
    session: Session


class DiskIn(Body):
    name: Name
    size: Annotated[int, Field(ge=1, le=MAX_BYTES)]
    node_name: Annotated[str, Field(max_length=255, pattern=r"^[^\x00]*$")] = ""
    path: Annotated[str, Field(max_length=4096, pattern=r"^[^\x00]*$")] = ""
    fmt: Literal["qcow2", "raw"] = "qcow2"


class DiscoveredVm(Body):
    name: Name
    config: FreeJson = Field(default_factory=dict)
    disks: Annotated[list[DiskIn], Field(max_length=64)]


class DiscoveryReport(Body):
    vms: Annotated[list[DiscoveredVm], Field(max_length=1000)]


class ClaimRequest(Body):
    session: Session
    limit: Annotated[int, Field(ge=1, le=64)] = 4
    lease_s: Annotated[int, Field(ge=5, le=86400)] = 300


class LeaseRequest(Body):
    session: Session
    lease_s: Annotated[int, Field(ge=5, le=86400)] = 300


class TaskEvent(Body):
    """What happened to a job's task: ``start``, ``progress``, ``finish`` or ``fail``."""

    action: Literal["start", "progress", "finish", "fail"]
    progress: Annotated[int, Field(ge=0, le=100)] = 0
    details: FreeJson = Field(default_factory=dict)
    error: Text | None = None


class TransitionRequest(Body):
    to_state: ReplicationState
    reason: Text


class PointIn(Body):
    point_id: Name
    created_at: UtcTime
    consistency: Consistency
    manifest_key: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[^\x00]*$")]
    bytes_shipped: Annotated[int, Field(ge=0, le=MAX_BYTES)] = 0
    figures: FreeJson = Field(default_factory=dict)


class FailureIn(Body):
    """A failure as the agent diagnosed it (``policies.retry.diagnose``); the vault decides
    the retry time and the state it leads to."""

    message: Text
    error_class: Literal["recoverable", "non-recoverable"]
    cause: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
    resync: bool = False


class CycleReport(Body):
    """The outcome of a claimed cycle: a recorded ``point``, or a ``failure``."""

    session: Session
    point: PointIn | None = None
    failure: FailureIn | None = None
    release_lease: bool = True
