"""The pure rules: transition table, health, resync window."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, time

import pytest

from siterecovery.domain import Health, ReplicationState
from siterecovery.errors import InputError
from siterecovery.policies.states import (
    TRANSITIONS,
    ErrorClass,
    allowed_transitions,
    compute_health,
    default_rpo_threshold_s,
    in_window,
    parse_window,
    sources_of,
)

S = ReplicationState

#: DESIGN §4 chains, each step of which must be allowed.
CHAINS = [
    [S.UNPROTECTED, S.ENABLING_PROTECTION, S.INITIAL_REPLICATION, S.PROTECTED],
    [S.PROTECTED, S.RESYNC_REQUIRED, S.RESYNCING, S.PROTECTED],
    [S.PROTECTED, S.TEST_FAILOVER_RUNNING, S.PROTECTED],
    [S.PROTECTED, S.FAILING_OVER, S.FAILED_OVER, S.COMMITTED],
    [S.FAILING_OVER, S.PROTECTED],
    [
        S.COMMITTED,
        S.FAILING_BACK,
        S.FAILED_BACK,
        S.COMMITTED_BACK,
        S.REVERSE_REPLICATING,
        S.PROTECTED,
    ],
]

FORBIDDEN = [
    (S.UNPROTECTED, S.PROTECTED),
    (S.ENABLING_PROTECTION, S.PROTECTED),
    (S.PROTECTED, S.COMMITTED),
    (S.PROTECTED, S.FAILED_OVER),
    (S.PROTECTED, S.REVERSE_REPLICATING),
    (S.TEST_FAILOVER_RUNNING, S.FAILING_OVER),
    (S.FAILED_OVER, S.PROTECTED),
    (S.COMMITTED, S.PROTECTED),
    (S.FAILED_OVER, S.UNPROTECTED),
    (S.FAILING_OVER, S.UNPROTECTED),
    (S.RESYNCING, S.UNPROTECTED),
    (S.COMMITTED_BACK, S.PROTECTED),
    (S.ERROR, S.COMMITTED),
]


def test_every_state_has_a_row_and_no_self_loops() -> None:
    assert set(TRANSITIONS) == set(ReplicationState)
    for state, targets in TRANSITIONS.items():
        assert state not in targets


@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: " > ".join(c))
def test_design_chains_are_allowed(chain: list[ReplicationState]) -> None:
    for current, target in itertools.pairwise(chain):
        assert target in allowed_transitions(current), f"{current} -> {target}"


@pytest.mark.parametrize(
    "state", sorted({S.INITIAL_REPLICATION, S.PROTECTED, S.RESYNCING, S.REVERSE_REPLICATING})
)
def test_replicating_states_can_fail(state: ReplicationState) -> None:
    assert {S.ERROR, S.RESYNC_REQUIRED} <= allowed_transitions(state)


@pytest.mark.parametrize(("current", "target"), FORBIDDEN)
def test_forbidden_transitions(current: ReplicationState, target: ReplicationState) -> None:
    assert target not in allowed_transitions(current)
    assert current not in sources_of(target)


def test_every_state_is_reachable_from_unprotected() -> None:
    seen, frontier = {S.UNPROTECTED}, [S.UNPROTECTED]
    while frontier:
        for target in allowed_transitions(frontier.pop()):
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(ReplicationState)


def test_allowed_transitions_accepts_the_value() -> None:
    assert allowed_transitions("failed over") == frozenset({S.COMMITTED})  # type: ignore[arg-type]


T = 900.0
HEALTH_CASES = [
    # state, rpo_s, last error class, expected health, words in the reason
    (S.PROTECTED, 60.0, None, Health.NORMAL, "within"),
    (S.PROTECTED, 900.0, None, Health.NORMAL, "within"),
    (S.PROTECTED, 901.0, None, Health.WARNING, "exceeds the threshold"),
    (S.PROTECTED, 1800.0, None, Health.WARNING, "exceeds the threshold"),
    (S.PROTECTED, 1801.0, None, Health.CRITICAL, "2x"),
    (S.PROTECTED, None, None, Health.WARNING, "no recovery point"),
    (S.PROTECTED, 60.0, ErrorClass.RECOVERABLE, Health.WARNING, "retrying"),
    (S.PROTECTED, 60.0, ErrorClass.NON_RECOVERABLE, Health.CRITICAL, "operator"),
    (S.PROTECTED, 5000.0, ErrorClass.RECOVERABLE, Health.CRITICAL, "RPO"),
    (S.ERROR, 10.0, None, Health.CRITICAL, "operator"),
    (S.RESYNC_REQUIRED, 10.0, None, Health.WARNING, "resynchronization"),
    (S.RESYNC_REQUIRED, 10.0, ErrorClass.NON_RECOVERABLE, Health.CRITICAL, "operator"),
    (S.RESYNCING, 1000.0, None, Health.WARNING, "exceeds"),
    (S.REVERSE_REPLICATING, 10.0, None, Health.NORMAL, "within"),
    (S.TEST_FAILOVER_RUNNING, 2000.0, None, Health.CRITICAL, "RPO"),
    (S.INITIAL_REPLICATION, None, None, Health.NORMAL, "initial replication"),
    (S.ENABLING_PROTECTION, None, None, Health.NORMAL, "enabling protection"),
    (S.FAILED_OVER, 99999.0, None, Health.NORMAL, "failed over"),
    (S.COMMITTED, None, None, Health.NORMAL, "committed"),
    (S.INITIAL_REPLICATION, None, ErrorClass.RECOVERABLE, Health.NORMAL, "initial"),
]


@pytest.mark.parametrize(("state", "rpo", "error_class", "health", "words"), HEALTH_CASES)
def test_compute_health(
    state: ReplicationState,
    rpo: float | None,
    error_class: ErrorClass | None,
    health: Health,
    words: str,
) -> None:
    got, reason = compute_health(state, rpo, T, error_class)
    assert got == health
    assert words in reason


def test_compute_health_needs_a_positive_threshold() -> None:
    with pytest.raises(ValueError, match="threshold"):
        compute_health(S.PROTECTED, 1.0, 0, None)


def test_default_threshold() -> None:
    assert [default_rpo_threshold_s(f) for f in (30, 300, 900)] == [900, 900, 1800]


def test_parse_window() -> None:
    assert parse_window("18:30-06:00") == (time(18, 30), time(6, 0))
    assert parse_window("00:00-23:59") == (time(0, 0), time(23, 59))


@pytest.mark.parametrize(
    "window", ["", "18:30", "18:30-6:00", "24:00-06:00", "18:60-06:00", "06:00-06:00", "a-b"]
)
def test_bad_windows(window: str) -> None:
    with pytest.raises(InputError, match="window"):
        parse_window(window)


@pytest.mark.parametrize(
    ("window", "hour", "minute", "inside"),
    [
        ("18:30-06:00", 18, 30, True),
        ("18:30-06:00", 23, 59, True),
        ("18:30-06:00", 0, 0, True),
        ("18:30-06:00", 6, 0, False),
        ("18:30-06:00", 12, 0, False),
        ("01:00-05:00", 1, 0, True),
        ("01:00-05:00", 5, 0, False),
        ("01:00-05:00", 0, 59, False),
    ],
)
def test_in_window(window: str, hour: int, minute: int, inside: bool) -> None:
    assert in_window(window, datetime(2025, 1, 1, hour, minute, tzinfo=UTC)) is inside
