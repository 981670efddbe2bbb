"""Errors of the vault layer (desired state, jobs, database)::

    VaultError
    ├── InvalidTransition      a replicated VM is not in a state that allows the operation
    ├── InvalidJobState        a job or task is not in a state that allows the operation
    ├── Conflict               the thing already exists, or exists differently
    ├── SchemaTooNew           the database was written by a newer siterecovery
    └── DatabaseUnavailable    the database cannot be reached or is busy (recoverable)
    InputError
    ├── LimitExceeded          a free-form JSON value is too deep or too large
    └── TimeOutOfRange         a reported time is before the VM's protection or in the future
    NotFoundError
    ├── UnknownSite, UnknownHost, UnknownVm, UnknownPolicy, UnknownJob, UnknownPoint
    └── VmNotProtected         the VM exists but protection is not enabled

Other bad arguments raise :class:`siterecovery.errors.InputError`. Every vault call runs in one
transaction, so any of these errors means nothing was changed.
"""

from __future__ import annotations

from collections.abc import Iterable

from siterecovery.errors import InputError, NotFoundError, VaultError


def _quoted(states: Iterable[str]) -> str:
    names = sorted(f"'{s}'" for s in states)
    if len(names) < 2:
        return names[0] if names else "(no state)"
    return f"{', '.join(names[:-1])} or {names[-1]}"


class InvalidTransition(VaultError):
    """A replicated VM's state does not allow the requested operation.

    The message names the VM, its current state, the operation (``"protect it"``, ``"move it
    to 'committed'"``...) and the states it must be in.
    """

    hint = "run `siterecovery status VM` to see the VM's state and the running jobs"

    def __init__(self, *, vm: str, current: str, operation: str, required: Iterable[str]) -> None:
        self.vm = vm
        self.current = current
        self.operation = operation
        self.required = frozenset(required)
        super().__init__(
            f"VM {vm!r} is '{current}': cannot {operation}; it must be {_quoted(self.required)}"
        )

    @classmethod
    def rebuilt(cls, message: str, *, hint: str | None = None) -> InvalidTransition:
        """The error as an API client rebuilds it from its message (fields unknown)."""
        error = cls.__new__(cls)
        VaultError.__init__(error, message, hint=hint)
        error.vm, error.current, error.operation, error.required = "", "", "", frozenset()
        return error


class InvalidJobState(VaultError):
    """A job or one of its tasks is not in a state that allows the requested operation."""

    hint = "run `siterecovery job show ID` to see the job's tasks and their states"


class Conflict(VaultError):
    """The thing to create already exists, or exists with different settings."""

    hint = "choose another name, or use the existing one"


class SchemaTooNew(VaultError):
    """The database schema is newer than this version of siterecovery understands."""

    hint = "upgrade siterecovery to the version that wrote this database"


class DatabaseUnavailable(VaultError):
    """The vault database cannot be opened or is busy; a retry may succeed."""

    recoverable = True
    hint = "check the database URL, that the database is reachable, and its permissions"


class LimitExceeded(InputError):
    """A free-form JSON value is nested too deep or too large (see :mod:`.limits`)."""

    hint = "send less: keep free-form JSON shallow and small (limits in docs/api.md)"


class TimeOutOfRange(InputError):
    """A reported time is out of range: before the VM's protection started, beyond the
    vault's clock plus the allowed skew, or not representable in UTC."""

    hint = "check the host's clock (NTP) and the time the agent reports"


class UnknownSite(NotFoundError):
    """No site with this name is registered in the vault."""

    hint = "register the site first"


class UnknownHost(NotFoundError):
    """No host with this name is registered in the vault."""

    hint = "register the host with `siterecovery agent register`"


class UnknownVm(NotFoundError):
    """No VM with this name is known to the vault."""

    hint = "run `siterecovery vm list` to see the VMs the agents report"


class UnknownPolicy(NotFoundError):
    """No replication policy with this name exists."""

    hint = "create it with `siterecovery policy create NAME ...`"


class UnknownJob(NotFoundError):
    """No job with this id exists."""

    hint = "run `siterecovery jobs` to see job ids"


class UnknownPoint(NotFoundError):
    """No recovery point with this id exists for the VM."""

    hint = "run `siterecovery points VM` to see the VM's recovery points"


class VmNotProtected(NotFoundError):
    """The VM exists but protection is not enabled for it."""

    hint = "enable protection with `siterecovery protect VM --policy NAME`"
