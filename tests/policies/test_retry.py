"""The retry schedule (a table) and the one classification of replication errors."""

from __future__ import annotations

import errno
from datetime import UTC, datetime, timedelta

import pytest

from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.hypervisor.errors import BitmapError, NbdError, QmpError, VmNotFound
from siterecovery.policies.retry import classify, diagnose, next_retry_at, retry_delay
from siterecovery.policies.states import ErrorClass
from siterecovery.replication.errors import ChangeLogTooLarge, DiskLayoutChanged
from siterecovery.store.errors import (
    FormatError,
    IntegrityError,
    ObjectNotFound,
    StoreFull,
    StoreUnavailable,
    WrongKey,
)
from siterecovery.store.wrappers import ContainerNotFound, StoreAuthError
from siterecovery.vault.errors import DatabaseUnavailable, UnknownVm

R, N = ErrorClass.RECOVERABLE, ErrorClass.NON_RECOVERABLE


@pytest.mark.parametrize(
    ("attempt", "minutes"),
    [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (6, 30), (7, 30), (50, 30)],
)
def test_backoff_schedule(attempt: int, minutes: int) -> None:
    assert retry_delay(attempt) == timedelta(minutes=minutes)


def test_retry_times_follow_each_failure() -> None:
    t = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    times = []
    for attempt in range(1, 8):
        t = next_retry_at(t, attempt)
        times.append(t.strftime("%H:%M"))
    assert times == ["12:01", "12:03", "12:07", "12:15", "12:25", "12:55", "13:25"]


@pytest.mark.parametrize("attempt", [0, -1, True, 1.5])
def test_bad_attempt_is_refused(attempt: object) -> None:
    with pytest.raises(ValueError):
        retry_delay(attempt)  # type: ignore[arg-type]


def _raised_from(outer: SiteRecoveryError, inner: BaseException) -> SiteRecoveryError:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except SiteRecoveryError as caught:
        return caught


def _qmp_lost() -> QmpError:
    return _raised_from(QmpError("QMP query-block failed: monitor went away"),
                        ConnectionResetError("reset"))  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("exc", "cls", "cause", "resync"),
    [
        (BitmapError("bitmap inconsistent"), R, "change tracking lost", True),
        (DiskLayoutChanged("disk added"), R, "disks changed", True),
        (ChangeLogTooLarge("60 %"), R, "change log over the resync threshold", True),
        (IntegrityError("bad MAC"), N, "disk chain corrupted", False),
        (FormatError("newer format"), N, "invalid replica state", False),
        (ObjectNotFound("segment gone"), N, "invalid replica state", False),
        (WrongKey("not this store's key"), N, "authentication failed", False),
        (StoreAuthError("access denied (403)"), N, "authentication failed", False),
        (ContainerNotFound("no bucket"), N, "invalid replica state", False),
        (PermissionError(errno.EACCES, "Permission denied"), N, "authorization failed", False),
        (VmNotFound("no VM"), N, "VM not found", False),
        (UnknownVm("no VM"), N, "VM not found", False),
        (StoreUnavailable("connection refused"), R, "network error", False),
        (NbdError("export went away"), R, "network error", False),
        (ConnectionRefusedError(), R, "network error", False),
        (TimeoutError(), R, "network error", False),
        (StoreFull("no space"), R, "low disk space", False),
        (OSError(errno.ENOSPC, "No space left on device"), R, "low disk space", False),
        (MemoryError(), R, "low memory", False),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), R, "low memory", False),
        (DatabaseUnavailable("busy"), R, "replication error", False),
        (InputError("bad"), N, "replication error", False),
        (QmpError("QMP transaction failed: refused"), N, "replication error", False),
        (RuntimeError("bug"), N, "unexpected error (RuntimeError)", False),
    ],
)
def test_classification_table(
    exc: BaseException, cls: ErrorClass, cause: str, resync: bool
) -> None:
    d = diagnose(exc)
    assert (d.error_class, d.cause, d.resync) == (cls, cause, resync)
    assert classify(exc) == cls


def test_causes_are_followed_and_denial_wins_over_network() -> None:
    denied = _raised_from(StoreUnavailable("cannot store x"), PermissionError(errno.EACCES, "x"))
    assert diagnose(denied).cause == "authorization failed"
    full = _raised_from(StoreUnavailable("cannot store x"), OSError(errno.ENOSPC, "full"))
    assert (diagnose(full).error_class, diagnose(full).cause) == (R, "low disk space")


def test_a_lost_qmp_monitor_is_retried() -> None:
    d = diagnose(_qmp_lost())
    assert (d.error_class, d.cause) == (R, "VM not reachable")


def test_implicit_context_is_not_a_cause() -> None:
    try:
        try:
            raise IntegrityError("unrelated damage seen during cleanup")
        except IntegrityError:
            raise StoreUnavailable("network down") from None
    except StoreUnavailable as exc:
        assert diagnose(exc).cause == "network error"
