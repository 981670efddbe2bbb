"""Errors of the replica store layer::

    StoreError
    ├── ObjectNotFound      a named object is not in the store            (not recoverable)
    ├── ObjectExists        a create-only put found the object present     (not recoverable)
    ├── IntegrityError      hash / MAC / auth-tag mismatch, truncation     (not recoverable)
    ├── StoreUnavailable    I/O or network failure                         (recoverable)
    │   └── StoreFull       no space left on the store (ENOSPC)            (recoverable)
    ├── FormatError         unknown or newer format version, bad structure (not recoverable)
    ├── WrongKey            the keys do not belong to this store           (not recoverable)
    │   └── WrongPassphrase the passphrase does not unlock the wrapped keys
    ├── KeyFileError        the key file is missing, unreadable or malformed
    │   └── PassphraseRequired  the keys are passphrase-protected and no passphrase was given
    ├── StoreAuthError      the store refused the credentials                (not recoverable)
    ├── ContainerNotFound   the container / bucket of the store URL is missing
    ├── MaintenanceRefused  prune / gc / compaction cannot prove a change is safe
    └── StoreInputError     bad request to the store (also an InputError, exit 2)
        ├── InvalidKey      an object key breaks the key rules
        └── UnknownScheme   a store URL names a scheme no backend registered

Backends convert ``OSError`` and client-library exceptions into these at their boundary with
``raise ... from exc``, so callers above the store only ever see this tree.
"""

from __future__ import annotations

from siterecovery.errors import InputError, StoreError

__all__ = [
    "ContainerNotFound",
    "FormatError",
    "IntegrityError",
    "InvalidKey",
    "KeyFileError",
    "MaintenanceRefused",
    "ObjectExists",
    "ObjectNotFound",
    "PassphraseRequired",
    "StoreAuthError",
    "StoreError",
    "StoreFull",
    "StoreInputError",
    "StoreUnavailable",
    "UnknownScheme",
    "WrongKey",
    "WrongPassphrase",
]


class ObjectNotFound(StoreError):
    """An object the caller named is not in the store."""

    exit_code = 3
    hint = "run `siterecovery store verify` to see which recovery points are affected"


class ObjectExists(StoreError):
    """A create-only put found an object already stored under that key."""


class IntegrityError(StoreError):
    """An object is corrupt: its hash, MAC or authentication tag does not match, or it is
    truncated. Corrupt data is never returned."""

    hint = (
        "the replica store holds damaged data: run `siterecovery store verify --deep` and "
        "resynchronize the affected VMs"
    )


class StoreUnavailable(StoreError):
    """The store could not be reached or an I/O operation failed; a retry may succeed."""

    recoverable = True
    hint = "check that the store location is reachable and writable; the operation is retried"


class StoreFull(StoreUnavailable):
    """The store has no space left."""

    hint = "free space on the replica store (shorten retention, run `siterecovery store gc`)"


class FormatError(StoreError):
    """An object or the store has an unknown or newer format, or a malformed structure."""

    hint = "upgrade siterecovery if the store was written by a newer version"


class WrongKey(StoreError):
    """The keys given do not belong to this replica store."""

    hint = "use the key file that was saved when the store was created"


class WrongPassphrase(WrongKey):
    """The passphrase does not unlock the wrapped store keys; nothing was read or changed."""

    hint = (
        "check the passphrase (SITERECOVERY_PASSPHRASE, --passphrase-file or the prompt); "
        "without it, use the plain key file or its backup (see docs/operations.md)"
    )


class KeyFileError(StoreError):
    """The store key file is missing, unreadable or malformed."""

    hint = (
        "restore the key file from its backup, or recover it from the store with "
        "`siterecovery store key recover` (see docs/operations.md)"
    )


class PassphraseRequired(KeyFileError):
    """The store keys are protected by a passphrase and none was given."""

    hint = (
        "set SITERECOVERY_PASSPHRASE, pass --passphrase-file, or run the command in a terminal "
        "to be asked for it"
    )


class StoreAuthError(StoreError):
    """The store refused the credentials (HTTP 401/403, bad signature, bad or missing key).
    Retrying cannot help until an operator fixes the credentials."""

    recoverable = False
    hint = (
        "check the store credentials: AZURE_STORAGE_CONNECTION_STRING or "
        "SITERECOVERY_AZURE_CONFIG for azure://, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
        "the AWS config files for s3:// (see docs/backends.md)"
    )


class ContainerNotFound(StoreError):
    """The Azure container or S3 bucket named in the store URL does not exist. Backends
    never create it on their own: a typo must not silently start a new, empty store."""

    recoverable = False
    hint = "create the container/bucket first, or fix its name in the store URL"


class MaintenanceRefused(StoreError):
    """A maintenance operation (prune, garbage collection, compaction) refused to change the
    store because it cannot prove the change is safe; nothing was deleted."""

    exit_code = 4
    hint = (
        "run `siterecovery store verify` to see what is damaged; repair or remove the damaged "
        "recovery points (resynchronize the VM), then run the operation again"
    )


class StoreInputError(StoreError, InputError):
    """A caller asked the store for something invalid; nothing was changed."""

    exit_code = 2
    hint = InputError.hint


class InvalidKey(StoreInputError):
    """An object key breaks the key rules (see ``siterecovery.store.backend.validate_key``)."""


class UnknownScheme(StoreInputError):
    """A store URL uses a scheme for which no backend is registered."""

    hint = "use one of the supported store URL schemes listed in the message"
