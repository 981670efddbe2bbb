"""What is due for a replicated VM, and when: the agent's schedule as pure functions.

:func:`decide` takes a replicated VM's bookkeeping, its policy and the time ``now`` (the
clock is the caller's, so tests never sleep) and returns one :class:`Due`:

=============================  ===========================================================
state / last error             due
=============================  ===========================================================
*resync required*              **resync** at the first instant inside the policy's resync
                               window that is not before ``next_retry_at`` (a failed resync
                               is retried on the same backoff schedule, inside the window)
*error*, or a non-recoverable  nothing: an operator must act (fix the cause, then
last error                     ``siterecovery resync VM``)
*protected* or *test failover  **retry** at ``next_retry_at`` (the backoff schedule of
running*, recoverable error    :mod:`siterecovery.policies.retry`)
being retried
*protected* or *test failover  **cycle** one copy interval after the last cycle (now if none):
running*                       replication never stops for a drill (DESIGN §5)
*initial replication*, with a  **retry** of the initial copy at ``next_retry_at``
recoverable error
anything else                  nothing (enabling, resyncing, failover phases...)
=============================  ===========================================================

:func:`over_threshold` is the resync trigger on the size of the change log;
:func:`app_consistent_due` says whether a cycle should quiesce the guest (the policy's
app-consistent frequency); :func:`bandwidth_limit` picks the policy's work or off-hours rate.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from siterecovery.domain import ReplicationState
from siterecovery.policies.states import ErrorClass, in_window, parse_window

S = ReplicationState

#: States in which scheduled cycles run: a drill does not stop replication (DESIGN §5).
CYCLING_STATES = frozenset({S.PROTECTED, S.TEST_FAILOVER_RUNNING})

#: Default resync trigger: the pending change of a disk exceeds this fraction of its size.
RESYNC_THRESHOLD = 0.5


class Action(enum.StrEnum):
    """What the agent should run for a VM."""

    CYCLE = "cycle"
    RETRY = "retry"
    RESYNC = "resync"
    NONE = "none"


@dataclass(frozen=True)
class Due:
    """``action`` to run at ``at`` (None when nothing is due), and why."""

    action: Action
    at: datetime | None
    reason: str

    def ready(self, now: datetime) -> bool:
        """Whether the action should run at ``now``."""
        return self.action != Action.NONE and self.at is not None and self.at <= now


@dataclass(frozen=True)
class VmSchedule:
    """The inputs of :func:`decide` for one VM (from its vault record and policy)."""

    state: ReplicationState
    copy_frequency_s: int
    resync_window: str
    last_cycle_at: datetime | None = None
    error_class: ErrorClass | None = None
    next_retry_at: datetime | None = None


def decide(vm: VmSchedule, now: datetime) -> Due:
    """The next thing due for ``vm`` as seen at ``now`` (aware); see the module table."""
    if vm.state == S.RESYNC_REQUIRED:
        # Checked first: an operator (or store verify) may mark a VM in error for resync.
        start = max(now, vm.next_retry_at) if vm.next_retry_at else now
        return Due(Action.RESYNC, next_in_window(vm.resync_window, start), "resync required")
    if vm.state == S.ERROR or vm.error_class == ErrorClass.NON_RECOVERABLE:
        return Due(Action.NONE, None, "stopped on a non-recoverable error: an operator must act")
    retrying = vm.error_class == ErrorClass.RECOVERABLE and vm.next_retry_at is not None
    if vm.state == S.INITIAL_REPLICATION and retrying:
        return Due(Action.RETRY, vm.next_retry_at, "retrying the initial copy")
    if vm.state not in CYCLING_STATES:
        return Due(Action.NONE, None, f"no replication work in state '{vm.state}'")
    if retrying:
        return Due(Action.RETRY, vm.next_retry_at, "retrying after a recoverable error")
    if vm.last_cycle_at is None:
        return Due(Action.CYCLE, now, "no cycle yet")
    return Due(
        Action.CYCLE, vm.last_cycle_at + timedelta(seconds=vm.copy_frequency_s), "copy interval"
    )


def app_consistent_due(app_consistent_h: int, last_app_at: datetime | None, now: datetime) -> bool:
    """Whether the cycle at ``now`` should be app-consistent.

    ``app_consistent_h`` 0 means never. Otherwise a cycle is app-consistent when no
    app-consistent point was taken yet, or the newest one (``last_app_at``) is at least
    ``app_consistent_h`` hours old.
    """
    if app_consistent_h < 0:
        raise ValueError(f"app-consistent frequency must be >= 0 hours, got {app_consistent_h}")
    if app_consistent_h == 0:
        return False
    return last_app_at is None or now - last_app_at >= timedelta(hours=app_consistent_h)


#: Bytes per second in one Mbit/s.
MBPS = 125_000


def bandwidth_limit(
    window: str, work_mbps: int | None, offhours_mbps: int | None, now: datetime
) -> int | None:
    """The policy's bandwidth limit at ``now`` in bytes/s, or None for unlimited.

    Inside the off-hours ``window`` (the policy's resync window, "HH:MM-HH:MM" UTC) the
    off-hours limit applies, outside it the work-hours limit; either may be None (unlimited).
    """
    mbps = offhours_mbps if in_window(window, now) else work_mbps
    if mbps is None:
        return None
    if mbps <= 0:
        raise ValueError(f"bandwidth limit must be a positive Mbit/s, got {mbps}")
    return mbps * MBPS


def next_in_window(window: str, at: datetime) -> datetime:
    """The first instant at or after ``at`` that falls inside ``window`` ("HH:MM-HH:MM" UTC)."""
    if in_window(window, at):
        return at
    start, _ = parse_window(window)
    at_utc = at.astimezone(UTC)
    candidate = at_utc.replace(hour=start.hour, minute=start.minute, second=0, microsecond=0)
    return candidate if candidate > at_utc else candidate + timedelta(days=1)


def over_threshold(
    pending: Mapping[str, int], sizes: Mapping[str, int], threshold: float = RESYNC_THRESHOLD
) -> list[str]:
    """Disks whose pending change exceeds ``threshold`` of their size, sorted by name.

    A disk missing from ``sizes`` or of size 0 is never over the threshold.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"resync threshold must be in (0, 1], got {threshold!r}")
    return sorted(d for d, n in pending.items() if sizes.get(d, 0) > 0 and n > threshold * sizes[d])
