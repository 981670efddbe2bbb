"""Pure rules of the replicated VM: the state machine (DESIGN §4), health, the resync window.

Nothing here touches the database; the service applies these rules inside transactions.

The transition table, in words::

    unprotected → enabling protection → initial replication → protected
    protected ⇄ resync required → resyncing → protected
    protected → test failover running → protected             (cleanup)
    protected → failing over → failed over → committed
    failing over → protected                                  (a failover that failed midway)
    committed → failing back → failed back → committed back → reverse replicating → protected
    failing back → committed                                  (a failback that failed midway)
    replicating states → error | resync required;  error → resync required | protected
    a VM may be unprotected when no recovery operation is running

An unplanned failover is also allowed from *resync required* and *error*: in a disaster the
primary is usually what failed, and the latest recovery point is still good.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from datetime import UTC, datetime, time

from siterecovery.domain import Health, ReplicationState
from siterecovery.errors import InputError

S = ReplicationState


class ErrorClass(enum.StrEnum):
    """Whether a retry can help with a replicated VM's last error (DESIGN §4)."""

    RECOVERABLE = "recoverable"
    NON_RECOVERABLE = "non-recoverable"


#: States in which cycles ship changes; a cycle failure moves them to error or resync required.
REPLICATING_STATES = frozenset(
    {
        S.INITIAL_REPLICATION,
        S.PROTECTED,
        S.RESYNCING,
        S.REVERSE_REPLICATING,
        S.TEST_FAILOVER_RUNNING,  # replication keeps running during a drill
    }
)

#: States from which protection may be disabled: no recovery operation is in flight.
UNPROTECTABLE_STATES = frozenset(
    {
        S.ENABLING_PROTECTION,
        S.INITIAL_REPLICATION,
        S.PROTECTED,
        S.RESYNC_REQUIRED,
        S.ERROR,
        S.COMMITTED,
        S.COMMITTED_BACK,
    }
)

_BASE: Mapping[ReplicationState, frozenset[ReplicationState]] = {
    S.UNPROTECTED: frozenset({S.ENABLING_PROTECTION}),
    S.ENABLING_PROTECTION: frozenset({S.INITIAL_REPLICATION, S.ERROR}),
    S.INITIAL_REPLICATION: frozenset({S.PROTECTED}),
    S.PROTECTED: frozenset({S.RESYNC_REQUIRED, S.TEST_FAILOVER_RUNNING, S.FAILING_OVER}),
    S.RESYNC_REQUIRED: frozenset({S.RESYNCING, S.FAILING_OVER, S.ERROR}),
    S.RESYNCING: frozenset({S.PROTECTED}),
    S.TEST_FAILOVER_RUNNING: frozenset({S.PROTECTED}),
    S.FAILING_OVER: frozenset({S.FAILED_OVER, S.PROTECTED}),
    S.FAILED_OVER: frozenset({S.COMMITTED}),
    S.COMMITTED: frozenset({S.FAILING_BACK}),
    S.FAILING_BACK: frozenset({S.FAILED_BACK, S.COMMITTED}),
    S.FAILED_BACK: frozenset({S.COMMITTED_BACK}),
    S.COMMITTED_BACK: frozenset({S.REVERSE_REPLICATING}),
    S.REVERSE_REPLICATING: frozenset({S.PROTECTED}),
    S.ERROR: frozenset({S.RESYNC_REQUIRED, S.PROTECTED, S.FAILING_OVER}),
}


def _build_table() -> dict[ReplicationState, frozenset[ReplicationState]]:
    table = {state: set(targets) for state, targets in _BASE.items()}
    for state in REPLICATING_STATES:
        table[state] |= {S.ERROR, S.RESYNC_REQUIRED}
    for state in UNPROTECTABLE_STATES:
        table[state].add(S.UNPROTECTED)
    return {state: frozenset(targets - {state}) for state, targets in table.items()}


#: state → the states it may move to. Every ReplicationState is a key.
TRANSITIONS: Mapping[ReplicationState, frozenset[ReplicationState]] = _build_table()


def allowed_transitions(state: ReplicationState) -> frozenset[ReplicationState]:
    """The states a replicated VM in ``state`` may move to (never ``state`` itself)."""
    return TRANSITIONS[ReplicationState(state)]


def sources_of(target: ReplicationState) -> frozenset[ReplicationState]:
    """The states from which ``target`` may be reached: what an error message asks for."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


def is_allowed(current: ReplicationState, target: ReplicationState) -> bool:
    """Whether ``current → target`` is in the transition table."""
    return target in allowed_transitions(current)


#: States where no cycles are expected, so the RPO says nothing about health.
_RPO_IRRELEVANT = frozenset(
    {
        S.UNPROTECTED,
        S.ENABLING_PROTECTION,
        S.INITIAL_REPLICATION,
        S.FAILING_OVER,
        S.FAILED_OVER,
        S.COMMITTED,
        S.FAILING_BACK,
        S.FAILED_BACK,
        S.COMMITTED_BACK,
    }
)

#: RPO beyond this many thresholds is critical, beyond one threshold a warning.
CRITICAL_RPO_FACTOR = 2


def compute_health(
    state: ReplicationState,
    rpo_s: float | None,
    threshold_s: float,
    last_error_class: ErrorClass | None,
) -> tuple[Health, str]:
    """Health of a replicated VM and the reason shown to the operator. Pure.

    ``rpo_s`` is the age of the newest recovery point (None: no point yet); ``threshold_s`` the
    RPO threshold. Rules, first match wins:

    1. state *error* or a non-recoverable last error → critical (an operator is needed);
    2. *resync required* → warning (the resync runs in the policy's window);
    3. states without cycles (enabling, initial replication, failover/failback phases) → normal;
    4. RPO over ``CRITICAL_RPO_FACTOR`` times the threshold → critical; over threshold → warning;
       no recovery point yet → warning;
    5. a recoverable last error → warning (being retried);
    6. otherwise normal.
    """
    if threshold_s <= 0:
        raise ValueError(f"RPO threshold must be positive, got {threshold_s}")
    if state == S.ERROR:
        return Health.CRITICAL, "replication stopped on an error: an operator is needed"
    if last_error_class == ErrorClass.NON_RECOVERABLE:
        return Health.CRITICAL, "the last error cannot be fixed by retrying: an operator is needed"
    if state == S.RESYNC_REQUIRED:
        return Health.WARNING, "resynchronization required"
    if state in _RPO_IRRELEVANT:
        return Health.NORMAL, f"{state}"
    return _rpo_health(rpo_s, threshold_s, last_error_class)


def _rpo_health(
    rpo_s: float | None, threshold_s: float, last_error_class: ErrorClass | None
) -> tuple[Health, str]:
    if rpo_s is None:
        return Health.WARNING, "no recovery point yet"
    if rpo_s > CRITICAL_RPO_FACTOR * threshold_s:
        return (
            Health.CRITICAL,
            f"RPO {rpo_s:.0f}s exceeds {CRITICAL_RPO_FACTOR}x the threshold {threshold_s:.0f}s",
        )
    if rpo_s > threshold_s:
        return Health.WARNING, f"RPO {rpo_s:.0f}s exceeds the threshold {threshold_s:.0f}s"
    if last_error_class == ErrorClass.RECOVERABLE:
        return Health.WARNING, "retrying after a recoverable error"
    return Health.NORMAL, f"RPO {rpo_s:.0f}s within the threshold {threshold_s:.0f}s"


def default_rpo_threshold_s(copy_frequency_s: int) -> int:
    """The RPO threshold for a policy: 15 minutes, or two copy intervals if that is longer."""
    return max(900, 2 * copy_frequency_s)


_WINDOW_RE = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)\Z")


def parse_window(window: str) -> tuple[time, time]:
    """Parse an off-hours window ``"HH:MM-HH:MM"`` (24 h, UTC; may wrap midnight).

    Raises :class:`InputError` for another format or an empty window (start == end).
    """
    match = _WINDOW_RE.fullmatch(window) if isinstance(window, str) else None
    if match is None:
        raise InputError(
            f"invalid resync window {window!r}",
            hint='use "HH:MM-HH:MM" in 24-hour UTC time, e.g. "18:30-06:00"',
        )
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = time(h1, m1), time(h2, m2)
    if start == end:
        raise InputError(f"resync window {window!r} is empty: start and end are the same")
    return start, end


def in_window(window: str, at: datetime) -> bool:
    """Whether the aware datetime ``at`` falls inside ``window`` (start inclusive, end not)."""
    start, end = parse_window(window)
    now = at.astimezone(UTC).time().replace(tzinfo=None)
    if start < end:
        return start <= now < end
    return now >= start or now < end
