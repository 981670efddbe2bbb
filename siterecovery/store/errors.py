"""Errors of the replica store layer::

    StoreError
    ├── ObjectNotFound      a named object is not in the store            (not recoverable)
    ├── ObjectExists        a create-only put found the object present     (not recoverable)
    ├── IntegrityError      hash / MAC / auth-tag mismatch, truncation     (not recoverable)
    ├── StoreUnavailable    I/O or network failure                         (recoverable)
    │   └── StoreFull       no space left on the store (ENOSPC)            (recoverable)
    ├── FormatError         unknown or newer format version, bad structure (not recoverable)
    ├── WrongKey            the keys do not belong to this store           (not recoverable)
    ├── KeyFileError        the key file is missing, unreadable or malformed
    └── StoreInputError     bad request to the store (also an InputError, exit 2)
        ├── InvalidKey      an object key breaks the key rules
        └── UnknownScheme   a store URL names a scheme no backend registered

Backends convert ``OSError`` and client-library exceptions into these at their boundary with
``raise ... from exc``, so callers above the store only ever see this tree.
"""

from __future__ import annotations

from siterecovery.errors import InputError, StoreError

__all__ = [
    "FormatError",
    "IntegrityError",
    "InvalidKey",
    "KeyFileError",
    "ObjectExists",
    "ObjectNotFound",
    "StoreError",
    "StoreFull",
    "StoreInputError",
    "StoreUnavailable",
    "UnknownScheme",
    "WrongKey",
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


class KeyFileError(StoreError):
    """The store key file is missing, unreadable or malformed."""

    hint = "restore the key file from its backup (see docs/store-format.md)"


class StoreInputError(StoreError, InputError):
    """A caller asked the store for something invalid; nothing was changed."""

    exit_code = 2
    hint = InputError.hint


class InvalidKey(StoreInputError):
    """An object key breaks the key rules (see ``siterecovery.store.backend.validate_key``)."""


class UnknownScheme(StoreInputError):
    """A store URL uses a scheme for which no backend is registered."""

    hint = "use one of the supported store URL schemes listed in the message"
