"""Store keys, the key file that holds them, and the store config object.

Key file, plain (JSON, mode 0600, written atomically; the vault owns it)::

    {"format": "siterecovery-store-keys", "version": 2, "wrapping": "none",
     "fingerprint": "<16 hex>", "hash_key": "<64 hex>", "data_key": "<64 hex>" | null}

Key file, passphrase-protected (``siterecovery.store.keywrap`` specifies the wrapping)::

    {"format": "siterecovery-store-keys", "version": 2, "wrapping": "scrypt-aes256gcm",
     "fingerprint": "<16 hex>", "has_data_key": true,
     "kdf": {"name": "scrypt", "salt": "<hex>", "n": 131072, "r": 8, "p": 1},
     "nonce": "<24 hex>", "wrapped": "<hex of AES-256-GCM(hash_key || data_key)>"}

The same wrapped document is what the store keeps under ``keys/<fingerprint>.json``
(:mod:`siterecovery.store.keycopy`). Version 1 files (plain only, no fingerprint) are still
read. ``fingerprint`` is a one-way derivation of the hash key (it reveals nothing about the
keys) that names a key set in messages and in the store. Loading refuses wrappings and
versions it does not know.

Store config ``siterecovery-store.json`` at the store root::

    {"format": "siterecovery-store", "version": 1, "block_size": 1048576,
     "encrypted": false, "key_check": "<hex>", "data_key_check": "<hex>" | null,
     "created": "2024-05-01T12:00:00.000000Z", "mac": "<hex>"}

``key_check`` is the keyed hash of a fixed string, so opening with another hash key is
detected before anything else is read (``WrongKey``); ``data_key_check`` (encrypted stores)
is a one-way derivation of the data key for the same purpose. ``mac`` covers the canonical
JSON of every other field.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from siterecovery import fsutil
from siterecovery.store.codec import KEY_LEN, SUBBLOCK_SIZE, Codec, derive_key
from siterecovery.store.errors import (
    FormatError,
    IntegrityError,
    KeyFileError,
    PassphraseRequired,
    StoreInputError,
    WrongKey,
)
from siterecovery.store.keywrap import (
    WRAPPING,
    ScryptParams,
    kdf_params,
    unwrap_secret,
    wrap_secret,
)

__all__ = [
    "CONFIG_KEY",
    "PASSPHRASE_ENV",
    "STORE_VERSION",
    "KeyFileInfo",
    "Passphrase",
    "StoreConfig",
    "StoreKeys",
    "canonical_json",
    "inspect_key_document",
    "inspect_key_file",
    "read_key_file",
    "resolve_passphrase",
    "utc_text",
    "write_private_file",
]

KEY_FILE_FORMAT: Final = "siterecovery-store-keys"
KEY_FILE_VERSION: Final = 2
CONFIG_KEY: Final = "siterecovery-store.json"
STORE_FORMAT: Final = "siterecovery-store"
STORE_VERSION: Final = 1
MIN_BLOCK_SIZE: Final = SUBBLOCK_SIZE
MAX_BLOCK_SIZE: Final = 64 << 20


def canonical_json(doc: dict[str, Any]) -> bytes:
    """The bytes a MAC covers: sorted keys, no spaces, ASCII only."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def utc_text(when: datetime) -> str:
    """``when`` as UTC ISO-8601 with microseconds and a ``Z`` suffix."""
    if when.tzinfo is None:
        raise StoreInputError(
            f"timestamp {when!r} has no time zone", hint="pass an aware UTC datetime"
        )
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


#: The environment variable a passphrase-protected key file's passphrase is taken from when
#: the caller passes none (unattended agents; interactive commands may prompt instead).
PASSPHRASE_ENV: Final = "SITERECOVERY_PASSPHRASE"

#: A passphrase, a function asked for one only when it is needed, or None (then
#: :data:`PASSPHRASE_ENV` is used).
Passphrase = str | Callable[[], str] | None


def resolve_passphrase(passphrase: Passphrase, where: str) -> str:
    """The passphrase to unwrap ``where`` with: the given one, the callable's answer, else
    ``$SITERECOVERY_PASSPHRASE``; ``PassphraseRequired`` when there is none."""
    if callable(passphrase):
        passphrase = passphrase()
    if passphrase is None:
        passphrase = os.environ.get(PASSPHRASE_ENV)
    if not passphrase:
        raise PassphraseRequired(f"{where} is protected by a passphrase and none was given")
    return passphrase


@dataclass(frozen=True)
class KeyFileInfo:
    """What a key document says about itself without being unlocked (no secret)."""

    where: str
    version: int
    wrapping: str
    fingerprint: str | None
    has_data_key: bool
    kdf: ScryptParams | None = None

    @property
    def protected(self) -> bool:
        return self.wrapping != "none"


@dataclass(frozen=True, repr=False)
class StoreKeys:
    """The secrets of one replica store: ``hash_key`` keys every hash; ``data_key`` (when
    not None) encrypts objects with AES-256-GCM. Losing them loses the store."""

    hash_key: bytes
    data_key: bytes | None = None

    def __post_init__(self) -> None:
        for name, key in (("hash_key", self.hash_key), ("data_key", self.data_key)):
            if key is not None and (not isinstance(key, bytes) or len(key) != KEY_LEN):
                raise WrongKey(f"{name} must be {KEY_LEN} bytes")

    def __repr__(self) -> str:  # never print secrets
        return (
            f"StoreKeys(fingerprint={self.fingerprint}, "
            f"data_key={'<set>' if self.data_key else None})"
        )

    @property
    def fingerprint(self) -> str:
        """16 hex characters naming this key set; a one-way derivation of the hash key."""
        return derive_key(self.hash_key, "key fingerprint")[:8].hex()

    @classmethod
    def generate(cls, *, with_data_key: bool = True) -> StoreKeys:
        """Fresh random keys (``secrets``); a data key only when ``with_data_key``."""
        data_key = secrets.token_bytes(KEY_LEN) if with_data_key else None
        return cls(secrets.token_bytes(KEY_LEN), data_key)

    # -- documents ------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The plain key document (secrets in hex)."""
        return {
            **self._header(),
            "wrapping": "none",
            "hash_key": self.hash_key.hex(),
            "data_key": self.data_key.hex() if self.data_key else None,
        }

    def _header(self) -> dict[str, Any]:
        return {
            "format": KEY_FILE_FORMAT,
            "version": KEY_FILE_VERSION,
            "fingerprint": self.fingerprint,
        }

    def to_document(
        self, passphrase: str | None = None, *, scrypt: ScryptParams | None = None
    ) -> dict[str, Any]:
        """The key document: plain without ``passphrase``, else wrapped under it."""
        if passphrase is None:
            return self.to_json()
        fields = {**self._header(), "has_data_key": self.data_key is not None}
        secret = self.hash_key + (self.data_key or b"")
        return wrap_secret(secret, passphrase, fields, scrypt)

    @classmethod
    def from_document(cls, doc: Any, where: str, passphrase: Passphrase = None) -> StoreKeys:
        """The keys of a key document (plain, or wrapped: then ``passphrase`` is resolved
        with :func:`resolve_passphrase`). ``KeyFileError`` if malformed or of an unknown
        version or wrapping, ``PassphraseRequired`` / ``WrongPassphrase`` for a wrapped
        one without the right passphrase."""
        info = inspect_key_document(doc, where)
        if info.protected:
            secret = unwrap_secret(doc, resolve_passphrase(passphrase, where), where)
            if len(secret) not in (KEY_LEN, 2 * KEY_LEN):
                raise KeyFileError(f"{where} holds malformed keys ({len(secret)} bytes)")
            keys = cls(secret[:KEY_LEN], secret[KEY_LEN:] or None)
        else:
            keys = cls._plain(doc, where)
        if info.fingerprint is not None and info.fingerprint != keys.fingerprint:
            raise KeyFileError(f"{where} is corrupt: its fingerprint does not match its keys")
        return keys

    @classmethod
    def _plain(cls, doc: dict[str, Any], where: str) -> StoreKeys:
        try:
            hash_key = bytes.fromhex(doc["hash_key"])
            data_key = bytes.fromhex(doc["data_key"]) if doc.get("data_key") else None
            return cls(hash_key, data_key)
        except (KeyError, TypeError, ValueError, WrongKey) as exc:
            raise KeyFileError(f"{where} holds malformed keys: {exc}") from exc

    # -- files ----------------------------------------------------------------------

    def save(
        self,
        path: Path,
        *,
        passphrase: str | None = None,
        scrypt: ScryptParams | None = None,
        replace: bool = False,
    ) -> None:
        """Write the key file atomically with mode 0600, wrapped under ``passphrase`` when
        one is given. Refuses to replace an existing file (a replaced key file would orphan
        the store it belonged to) unless ``replace`` (used to re-wrap the same keys)."""
        doc = self.to_document(passphrase, scrypt=scrypt)
        write_private_file(path, (json.dumps(doc, indent=2) + "\n").encode(), replace=replace)

    @classmethod
    def load(cls, path: Path, passphrase: Passphrase = None) -> StoreKeys:
        """Read a key file written by :meth:`save` (or a version 1 file). A protected file
        is unlocked with ``passphrase`` (see :func:`resolve_passphrase`)."""
        return cls.from_document(read_key_file(path), f"key file {path}", passphrase)


def write_private_file(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (:func:`fsutil.write_private`:
    ``link`` -- never replacing -- or ``rename`` when ``replace``). ``KeyFileError`` if
    ``path`` exists and not ``replace``, or on I/O errors."""
    try:
        fsutil.write_private(path, data, replace=replace)
    except FileExistsError as exc:
        raise KeyFileError(
            f"key file {path} already exists", hint="choose another path; never overwrite keys"
        ) from exc
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from exc


def read_key_file(path: Path) -> dict[str, Any]:
    """The parsed JSON of a key file; ``KeyFileError`` if missing, unreadable or not JSON."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file {path} does not exist") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise KeyFileError(f"key file {path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise KeyFileError(f"{path} is not a siterecovery store key file")
    return doc


def inspect_key_document(doc: Any, where: str) -> KeyFileInfo:
    """Check a key document's format, version and wrapping; describe it without unlocking."""
    if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
        raise KeyFileError(f"{where} is not a siterecovery store key file")
    version, wrapping = doc.get("version"), doc.get("wrapping")
    known = {1: ("none",), 2: ("none", WRAPPING)}
    if version not in known or wrapping not in known[version]:
        raise KeyFileError(
            f"{where} has version {version!r} wrapping {wrapping!r}, which this siterecovery "
            "cannot read",
            hint="upgrade siterecovery",
        )
    fingerprint = doc.get("fingerprint")
    if fingerprint is not None and not (
        isinstance(fingerprint, str) and re.fullmatch(r"[0-9a-f]{16}", fingerprint)
    ):
        raise KeyFileError(f"{where} has a malformed fingerprint")
    if wrapping == "none":
        return KeyFileInfo(where, version, wrapping, fingerprint, bool(doc.get("data_key")))
    if fingerprint is None:
        raise KeyFileError(f"{where} is malformed: a wrapped key document needs a fingerprint")
    has_data_key = doc.get("has_data_key") is True
    return KeyFileInfo(where, version, wrapping, fingerprint, has_data_key, kdf_params(doc, where))


def inspect_key_file(path: Path) -> KeyFileInfo:
    """:func:`inspect_key_document` of the key file at ``path`` (nothing is unlocked)."""
    return inspect_key_document(read_key_file(path), f"key file {path}")


def data_key_check(data_key: bytes) -> str:
    """A one-way value proving a data key is the right one (hex)."""
    return derive_key(data_key, "data key check").hex()


def validate_block_size(block_size: int) -> int:
    """Block sizes are powers of two from 64 KiB to 64 MiB."""
    if (
        not isinstance(block_size, int)
        or block_size & (block_size - 1)
        or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
    ):
        raise StoreInputError(
            f"invalid block size {block_size!r}",
            hint="use a power of two from 64 KiB to 64 MiB (default 1 MiB)",
        )
    return block_size


@dataclass(frozen=True)
class StoreConfig:
    """The parsed ``siterecovery-store.json``."""

    block_size: int
    encrypted: bool
    created: str
    version: int = STORE_VERSION

    def to_bytes(self, keys: StoreKeys, codec: Codec) -> bytes:
        doc: dict[str, Any] = {
            "format": STORE_FORMAT,
            "version": self.version,
            "block_size": self.block_size,
            "encrypted": self.encrypted,
            "key_check": codec.key_check(),
            "data_key_check": data_key_check(keys.data_key)
            if self.encrypted and keys.data_key
            else None,
            "created": self.created,
        }
        doc["mac"] = codec.mac(canonical_json(doc))
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes, keys: StoreKeys, where: str) -> StoreConfig:
        """Parse and check the config: format and version first, then the keys, then the
        MAC. Raises ``FormatError``, ``WrongKey`` or ``IntegrityError``."""
        doc = _parse_config(raw, where)
        codec = Codec(keys.hash_key, keys.data_key, encrypt=False)
        if doc.get("key_check") != codec.key_check():
            raise WrongKey(f"the keys do not belong to the replica store at {where}")
        encrypted = doc.get("encrypted")
        if encrypted and (
            keys.data_key is None or doc.get("data_key_check") != data_key_check(keys.data_key)
        ):
            raise WrongKey(
                f"the data key does not belong to the encrypted replica store at {where}"
            )
        mac = doc.pop("mac", None)
        if mac != codec.mac(canonical_json(doc)):
            raise IntegrityError(f"store config {CONFIG_KEY} at {where} is corrupt: MAC mismatch")
        try:
            return cls(validate_block_size(doc["block_size"]), bool(encrypted), str(doc["created"]))
        except (KeyError, StoreInputError) as exc:
            raise FormatError(f"store config at {where} is malformed: {exc}") from exc


def _parse_config(raw: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise FormatError(f"store config {CONFIG_KEY} at {where} is not valid JSON") from exc
    if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
        raise FormatError(f"{where} does not hold a siterecovery replica store config")
    version = doc.get("version")
    if not isinstance(version, int) or version < 1:
        raise FormatError(f"store config at {where} has an invalid version {version!r}")
    if version > STORE_VERSION:
        raise FormatError(
            f"the replica store at {where} has format version {version}, newer than the "
            f"newest this siterecovery reads ({STORE_VERSION})",
            hint="upgrade siterecovery to open this store",
        )
    return doc
