"""Store keys, the key file that holds them, and the store config object.

Key file (JSON, mode 0600, written atomically; the vault owns it)::

    {"format": "siterecovery-store-keys", "version": 1, "wrapping": "none",
     "hash_key": "<64 hex>", "data_key": "<64 hex>" | null}

``wrapping`` is the seam for passphrase protection: ``"none"`` is the only value today; a
later version may store the keys encrypted under a passphrase-derived key and name the KDF
here. Loading refuses wrappings it does not know.

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
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from siterecovery.store.codec import KEY_LEN, SUBBLOCK_SIZE, Codec, derive_key
from siterecovery.store.errors import (
    FormatError,
    IntegrityError,
    KeyFileError,
    StoreInputError,
    WrongKey,
)

__all__ = [
    "CONFIG_KEY",
    "STORE_VERSION",
    "StoreConfig",
    "StoreKeys",
    "canonical_json",
    "utc_text",
]

KEY_FILE_FORMAT: Final = "siterecovery-store-keys"
KEY_FILE_VERSION: Final = 1
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
            f"StoreKeys(hash_key=<{KEY_LEN} bytes>, data_key={'<set>' if self.data_key else None})"
        )

    @classmethod
    def generate(cls, *, with_data_key: bool = True) -> StoreKeys:
        """Fresh random keys (``secrets``); a data key only when ``with_data_key``."""
        data_key = secrets.token_bytes(KEY_LEN) if with_data_key else None
        return cls(secrets.token_bytes(KEY_LEN), data_key)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": KEY_FILE_FORMAT,
            "version": KEY_FILE_VERSION,
            "wrapping": "none",
            "hash_key": self.hash_key.hex(),
            "data_key": self.data_key.hex() if self.data_key else None,
        }

    def save(self, path: Path) -> None:
        """Write the key file atomically with mode 0600; refuses to replace an existing one
        (a replaced key file would orphan the store it belonged to)."""
        data = (json.dumps(self.to_json(), indent=2) + "\n").encode()
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, path)
        except FileExistsError as exc:
            raise KeyFileError(
                f"key file {path} already exists", hint="choose another path; never overwrite keys"
            ) from exc
        except OSError as exc:
            raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> StoreKeys:
        """Read a key file written by :meth:`save`."""
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError as exc:
            raise KeyFileError(f"key file {path} does not exist") from exc
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
        except ValueError as exc:
            raise KeyFileError(f"key file {path} is not valid JSON: {exc}") from exc
        return cls._from_json(doc, path)

    @classmethod
    def _from_json(cls, doc: Any, path: Path) -> StoreKeys:
        if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
            raise KeyFileError(f"{path} is not a siterecovery store key file")
        if doc.get("version") != KEY_FILE_VERSION or doc.get("wrapping") != "none":
            raise KeyFileError(
                f"key file {path} has version {doc.get('version')!r} wrapping "
                f"{doc.get('wrapping')!r}, which this siterecovery cannot read",
                hint="upgrade siterecovery",
            )
        try:
            hash_key = bytes.fromhex(doc["hash_key"])
            data_key = bytes.fromhex(doc["data_key"]) if doc.get("data_key") else None
            return cls(hash_key, data_key)
        except (KeyError, TypeError, ValueError, WrongKey) as exc:
            raise KeyFileError(f"key file {path} holds malformed keys: {exc}") from exc


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
