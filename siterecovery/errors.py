"""The root of siterecovery's exception trees.

Every error the product raises derives from :class:`SiteRecoveryError` and knows three things:
whether a retry can help (``recoverable``), what the operator should do (``hint``), and which
process exit code the CLI maps it to (``exit_code``). Each layer has its own subtree, defined in
that layer's ``errors`` module; third-party exceptions are converted at the layer boundary with
``raise ... from exc`` so nothing above a layer ever sees a foreign exception::

    SiteRecoveryError
    ├── InputError                 bad path, size, name, flag, payload (exit 2)
    ├── NotFoundError              a named thing does not exist (exit 3)
    ├── StoreError                 replica store layer        (siterecovery.store.errors)
    ├── HypervisorError            QEMU / QMP / NBD layer      (siterecovery.hypervisor.errors)
    ├── VaultError                 vault state and jobs        (siterecovery.vault.errors)
    └── ReplicationError           cycles and recovery         (siterecovery.replication.errors)

The seed's retry rule is expressed by ``recoverable``: recoverable errors (network, low disk
space, low memory) are retried on the backoff schedule; non-recoverable ones (corrupt chain,
invalid replica state, authentication, authorization, VM not found) make health critical.
"""

from __future__ import annotations


class SiteRecoveryError(Exception):
    """Base of every siterecovery error.

    Subclasses set the class attributes; instances may override ``hint`` per raise.
    """

    recoverable: bool = False
    exit_code: int = 1
    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.message

    def describe(self) -> str:
        """The message followed by the hint, as shown to an operator."""
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class InputError(SiteRecoveryError):
    """Bad input from a user or a caller: nothing was changed."""

    exit_code = 2
    hint = "check the value and run the command again"


class NotFoundError(SiteRecoveryError):
    """A named VM, policy, job, recovery point or object does not exist."""

    exit_code = 3


class StoreError(SiteRecoveryError):
    """Root of the replica store layer's errors."""

    exit_code = 4


class HypervisorError(SiteRecoveryError):
    """Root of the hypervisor (QEMU, QMP, NBD) layer's errors."""

    exit_code = 5


class VaultError(SiteRecoveryError):
    """Root of the vault layer's errors."""

    exit_code = 6


class ReplicationError(SiteRecoveryError):
    """Root of the replication and recovery layer's errors."""

    exit_code = 7
