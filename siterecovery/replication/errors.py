"""Errors of the replication and recovery layer::

    ReplicationError
    ├── DiskLayoutChanged      a disk was added, removed or resized while protected
    ├── VerificationFailed     a recovered VM's data differs from what the primary wrote
    ├── FailoverError          a failover step failed; the source is left as it was
    └── ChangeLogTooLarge      the pending change passed the resync threshold -> resync
"""

from __future__ import annotations

from siterecovery.errors import ReplicationError


class DiskLayoutChanged(ReplicationError):
    """The VM's disks no longer match its recovery points."""

    hint = "resynchronize the VM (`siterecovery resync VM`) so a new base is taken"


class VerificationFailed(ReplicationError):
    """Recovered data does not match what the primary acknowledged."""

    hint = "do not use this recovery point; run `siterecovery store verify --deep`"


class FailoverError(ReplicationError):
    """A failover step failed; the source VM is untouched."""

    hint = "read the job's failed task for the cause, fix it, and run the failover again"


class ChangeLogTooLarge(ReplicationError):
    """A disk's pending change exceeds the resync threshold of its size: a resync sends less."""

    recoverable = True
    hint = (
        "the VM is resynchronized in its policy's resync window, "
        "or now with `siterecovery resync VM`"
    )


class DrillCheckFailed(FailoverError):
    """A drill's check (console pattern, TCP port) did not pass: the replica is kept for
    inspection until the drill is cleaned up."""

    hint = "look at the replica (`siterecovery failover status VM`), then `siterecovery " \
        "failover cleanup VM`"
