"""Errors of the hypervisor layer (QEMU, QMP, NBD, guest images)::

    HypervisorError
    ├── QmpError               a QMP command failed or the monitor went away
    ├── NbdError               NBD protocol or connection failure (recoverable)
    │   └── NbdServerError     the server answered an NBD error code
    ├── BitmapError            change tracking state cannot be trusted -> resync
    ├── VmNotFound             no such VM on this host (non-recoverable)
    ├── ProcessError           a QEMU process failed to start or died
    └── ShapeError             a VM's machine cannot be described for the recovery side
"""

from __future__ import annotations

from siterecovery.errors import HypervisorError


class QmpError(HypervisorError):
    """A QMP command failed, or the QMP socket could not be reached."""

    hint = "check that the VM is running and its QMP socket path is right"


class NbdError(HypervisorError):
    """The NBD connection or protocol failed; a retry may succeed."""

    recoverable = True
    hint = "the export may have gone away; the cycle will be retried"


class NbdServerError(NbdError):
    """The NBD server answered a request with an error code (``errno`` attribute)."""

    def __init__(self, message: str, *, errno: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.errno = errno


class BitmapError(HypervisorError):
    """A dirty bitmap is missing, inconsistent or foreign: its changes cannot be trusted."""

    hint = "the VM must be resynchronized: run `siterecovery resync VM`"


class VmNotFound(HypervisorError):
    """The VM does not exist on this host."""

    exit_code = 3
    hint = "run `siterecovery vm list` to see the VMs this host's agent can reach"


class ProcessError(HypervisorError):
    """A QEMU process failed to start, or exited unexpectedly."""

    hint = "read the process log named in the message"


class ShapeError(HypervisorError):
    """The running VM has a device siterecovery cannot describe (so cannot start elsewhere)."""

    hint = (
        "attach the disk or NIC with a supported device model (see docs/recovery.md, "
        "'The replica VM is the same machine'), then register the VM again"
    )
