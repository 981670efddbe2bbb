"""The seed's retry process: what a replication error means, and when to try again.

Two pure pieces, used by every replication path (cycles, initial copy, resync):

:func:`diagnose` / :func:`classify`
    the **one place** where an exception raised on the replication path gets its class.
    Rules, first match wins:

    1. the change log cannot be trusted (``BitmapError``), the disks changed
       (``DiskLayoutChanged``) or the change log passed the resync threshold
       (``ChangeLogTooLarge``) → *resync required* (recoverable: the resync fixes it);
    2. the seed's named non-recoverable cases → **non-recoverable**: disk chain corrupted
       (``IntegrityError``), invalid replica state (``FormatError``, ``ObjectNotFound``,
       ``ContainerNotFound``, ``VerificationFailed``), authentication failed
       (``StoreAuthError``: HTTP 401/403 or bad credentials; ``WrongKey``, ``KeyFileError``),
       authorization failed (``EACCES``/``EPERM``), VM not found (``VmNotFound``,
       ``UnknownVm``);
    3. the seed's named recoverable cases → **recoverable**: network errors (``NbdError``,
       ``StoreUnavailable``, a lost QMP monitor, ``ConnectionError``, ``TimeoutError``), low
       disk space (``StoreFull``, ``ENOSPC``/``EDQUOT``), low memory (``MemoryError``,
       ``ENOMEM``);
    4. any other siterecovery error → its own ``recoverable`` flag;
    5. any other exception → non-recoverable (an unexpected fault needs an operator: silent
       retries would hide it).

:func:`retry_delay` / :func:`next_retry_at`
    the backoff schedule: after the 1st, 2nd, 3rd, 4th, 5th failed attempt wait **1, 2, 4,
    8, 10 minutes**; after every later one **30 minutes**, for as long as the error lasts.

:func:`state_after`
    where a diagnosed failure moves a replicated VM (the vault applies it to every report).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from siterecovery.domain import ReplicationState
from siterecovery.errors import SiteRecoveryError
from siterecovery.hypervisor.errors import BitmapError, NbdError, QmpError, VmNotFound
from siterecovery.policies.states import REPLICATING_STATES, ErrorClass
from siterecovery.replication.errors import (
    ChangeLogTooLarge,
    DiskLayoutChanged,
    VerificationFailed,
)
from siterecovery.store.errors import (
    FormatError,
    IntegrityError,
    KeyFileError,
    ObjectNotFound,
    StoreFull,
    StoreUnavailable,
    WrongKey,
)
from siterecovery.store.wrappers import ContainerNotFound, StoreAuthError
from siterecovery.vault.errors import UnknownVm

#: Minutes to wait after the n-th failed attempt (n = 1..5); then :data:`STEADY_MINUTES`.
BACKOFF_MINUTES = (1, 2, 4, 8, 10)
STEADY_MINUTES = 30

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_DENIED = frozenset({errno.EACCES, errno.EPERM})


def retry_delay(attempt: int) -> timedelta:
    """How long to wait after failed attempt number ``attempt`` (1 = the first failure)."""
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be a positive integer, got {attempt!r}")
    minutes = BACKOFF_MINUTES[attempt - 1] if attempt <= len(BACKOFF_MINUTES) else STEADY_MINUTES
    return timedelta(minutes=minutes)


def next_retry_at(failed_at: datetime, attempt: int) -> datetime:
    """When to try again after failed attempt number ``attempt`` ended at ``failed_at``."""
    return failed_at + retry_delay(attempt)


@dataclass(frozen=True)
class Diagnosis:
    """What an error means for replication.

    ``error_class`` decides retry versus operator; ``cause`` is the seed's name for the case
    (shown in status and jobs); ``resync`` is true when only a resynchronization can fix it.
    """

    error_class: ErrorClass
    cause: str
    resync: bool = False

    @property
    def recoverable(self) -> bool:
        return self.error_class == ErrorClass.RECOVERABLE


R, N = ErrorClass.RECOVERABLE, ErrorClass.NON_RECOVERABLE


def diagnose(exc: BaseException) -> Diagnosis:
    """Classify ``exc`` by the rules in the module docstring. Pure; never raises."""
    if isinstance(exc, BitmapError):
        return Diagnosis(R, "change tracking lost", resync=True)
    if isinstance(exc, DiskLayoutChanged):
        return Diagnosis(R, "disks changed", resync=True)
    if isinstance(exc, ChangeLogTooLarge):
        return Diagnosis(R, "change log over the resync threshold", resync=True)
    named = _named_case(exc)
    if named is not None:
        return named
    if isinstance(exc, SiteRecoveryError):
        return Diagnosis(R if exc.recoverable else N, "replication error")
    return Diagnosis(N, f"unexpected error ({type(exc).__name__})")


def classify(exc: BaseException) -> ErrorClass:
    """Recoverable (retry on the backoff schedule) or non-recoverable (operator needed)."""
    return diagnose(exc).error_class


def _named_case(exc: BaseException) -> Diagnosis | None:
    """The seed's named cases, looked for in ``exc`` and the errors it was raised from.

    Each rule is tried along the whole chain before the next (non-recoverable, then low
    resources, then network), so a store error raised from "permission denied" is an
    authorization failure and one raised from ENOSPC is low disk space, not a network error.
    """
    chain = list(_chain(exc))
    for rule in (_non_recoverable_case, _resource_case, _network_case):
        for err in chain:
            found = rule(err)
            if found is not None:
                return found
    return None


def _non_recoverable_case(err: BaseException) -> Diagnosis | None:
    if isinstance(err, VmNotFound | UnknownVm):
        return Diagnosis(N, "VM not found")
    if isinstance(err, IntegrityError):
        return Diagnosis(N, "disk chain corrupted")
    if isinstance(err, FormatError | ObjectNotFound | ContainerNotFound | VerificationFailed):
        return Diagnosis(N, "invalid replica state")
    if isinstance(err, StoreAuthError | WrongKey | KeyFileError):
        return Diagnosis(N, "authentication failed")
    if _errno(err) in _DENIED:
        return Diagnosis(N, "authorization failed")
    return None


def _resource_case(err: BaseException) -> Diagnosis | None:
    if isinstance(err, StoreFull) or _errno(err) in _FULL:
        return Diagnosis(R, "low disk space")
    if isinstance(err, MemoryError) or _errno(err) == errno.ENOMEM:
        return Diagnosis(R, "low memory")
    return None


def _network_case(err: BaseException) -> Diagnosis | None:
    if isinstance(err, NbdError | StoreUnavailable | ConnectionError | TimeoutError):
        return Diagnosis(R, "network error")
    if isinstance(err, QmpError) and _monitor_lost(err):
        # QEMU is down or restarting: when it is back, the cycle either works or finds its
        # bitmaps inconsistent and asks for a resync.
        return Diagnosis(R, "VM not reachable")
    return None


def _monitor_lost(err: QmpError) -> bool:
    """A QMP error caused by the connection (not by QEMU refusing a command)."""
    cause = err.__cause__
    if cause is None:
        return False
    from qemu.qmp import ExecuteError

    return not isinstance(cause, ExecuteError)


def _errno(err: BaseException) -> int | None:
    return err.errno if isinstance(err, OSError) else None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the errors it was explicitly raised from, outermost first, each once.

    Only ``__cause__`` is followed: an implicit context may be an unrelated error that was
    being handled when this one happened.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


S = ReplicationState


def state_after(state: ReplicationState, diagnosis: Diagnosis) -> ReplicationState | None:
    """The state a failure diagnosed as ``diagnosis`` moves a VM in ``state`` to (None: stay).

    =========================================  ==============================================
    failure                                    from → to
    =========================================  ==============================================
    only a resync fixes it                     a replicating state or *error* → *resync
                                               required*
    non-recoverable                            a replicating state or *enabling protection*
                                               → *error* (``siterecovery resync VM`` or
                                               ``unprotect VM`` get out of it)
    recoverable, during a resync               *resyncing* → *resync required* (retried in
                                               the window)
    recoverable                                stays, retried on the backoff schedule
    any, during a drill                        stays *test failover running*: the error is
                                               recorded (a non-recoverable one stops cycles)
                                               and the drill keeps its way out (cleanup);
                                               the next cycle after it finds the cause again
    =========================================  ==============================================
    """
    if state == S.TEST_FAILOVER_RUNNING:
        return None
    if diagnosis.resync and state in REPLICATING_STATES | {S.ERROR}:
        return S.RESYNC_REQUIRED
    if not diagnosis.recoverable and state in REPLICATING_STATES | {S.ENABLING_PROTECTION}:
        return S.ERROR
    if state == S.RESYNCING:
        return S.RESYNC_REQUIRED
    return None
