"""What is due when: the pure scheduler, with explicit clocks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from siterecovery.domain import ReplicationState as S
from siterecovery.policies.schedule import (
    Action,
    VmSchedule,
    decide,
    next_in_window,
    over_threshold,
)
from siterecovery.policies.states import ErrorClass

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
WINDOW = "18:30-06:00"


def at(hh: int, mm: int = 0, day: int = 1) -> datetime:
    return datetime(2024, 5, day, hh, mm, tzinfo=UTC)


def vm(state: S = S.PROTECTED, **kw: object) -> VmSchedule:
    return VmSchedule(state=state, copy_frequency_s=300, resync_window=WINDOW, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("schedule", "action", "due_at"),
    [
        (vm(), Action.CYCLE, NOW),
        (vm(last_cycle_at=at(11, 58)), Action.CYCLE, at(12, 3)),
        (vm(last_cycle_at=at(11, 50)), Action.CYCLE, at(11, 55)),
        (vm(error_class=ErrorClass.RECOVERABLE, next_retry_at=at(12, 4),
            last_cycle_at=at(11, 58)), Action.RETRY, at(12, 4)),
        (vm(error_class=ErrorClass.NON_RECOVERABLE), Action.NONE, None),
        (vm(S.ERROR), Action.NONE, None),
        (vm(S.RESYNC_REQUIRED), Action.RESYNC, at(18, 30)),
        (vm(S.RESYNC_REQUIRED, error_class=ErrorClass.RECOVERABLE, next_retry_at=at(19, 0)),
         Action.RESYNC, at(19, 0)),
        (vm(S.RESYNC_REQUIRED, error_class=ErrorClass.NON_RECOVERABLE), Action.RESYNC,
         at(18, 30)),
        (vm(S.INITIAL_REPLICATION, error_class=ErrorClass.RECOVERABLE, next_retry_at=at(12, 1)),
         Action.RETRY, at(12, 1)),
        (vm(S.INITIAL_REPLICATION), Action.NONE, None),
        (vm(S.RESYNCING), Action.NONE, None),
        (vm(S.FAILED_OVER), Action.NONE, None),
        # A drill never stops replication (DESIGN §5): cycles and retries go on.
        (vm(S.TEST_FAILOVER_RUNNING, last_cycle_at=at(11, 58)), Action.CYCLE, at(12, 3)),
        (vm(S.TEST_FAILOVER_RUNNING, error_class=ErrorClass.RECOVERABLE,
            next_retry_at=at(12, 4)), Action.RETRY, at(12, 4)),
    ],
)
def test_decide_table(schedule: VmSchedule, action: Action, due_at: datetime | None) -> None:
    due = decide(schedule, NOW)
    assert (due.action, due.at) == (action, due_at)


def test_ready_only_once_due() -> None:
    due = decide(vm(last_cycle_at=at(11, 58)), NOW)
    assert not due.ready(NOW)
    assert due.ready(NOW + timedelta(minutes=3))
    assert not decide(vm(S.ERROR), NOW).ready(NOW + timedelta(days=1))


def test_resync_required_is_due_now_inside_the_window() -> None:
    inside = at(23, 15)
    assert decide(vm(S.RESYNC_REQUIRED), inside).at == inside
    early = at(3, 0, day=2)
    assert decide(vm(S.RESYNC_REQUIRED), early).at == early


@pytest.mark.parametrize(
    ("window", "when", "expected"),
    [
        (WINDOW, at(12), at(18, 30)),
        (WINDOW, at(18, 30), at(18, 30)),
        (WINDOW, at(6, 0), at(18, 30)),
        (WINDOW, at(5, 59), at(5, 59)),
        ("01:00-02:00", at(3), at(1, 0, day=2)),
        ("01:00-02:00", at(0, 59), at(1, 0)),
    ],
)
def test_next_in_window(window: str, when: datetime, expected: datetime) -> None:
    assert next_in_window(window, when) == expected


def test_over_threshold() -> None:
    sizes = {"a": 100, "b": 100, "c": 0}
    assert over_threshold({"a": 50, "b": 51, "c": 9}, sizes) == ["b"]
    assert over_threshold({"a": 11, "b": 9, "x": 99}, sizes, 0.1) == ["a"]
    with pytest.raises(ValueError):
        over_threshold({}, sizes, 0)
