"""The passphrase-wrapped copy of the store keys kept in the store itself.

``keys/<fingerprint>.json`` holds the keys wrapped under a passphrase: the same document
as a protected key file (``siterecovery.store.keys``, wrapping ``scrypt-aes256gcm``). It is
never stored unwrapped. With it, an operator who lost the key file recovers the keys from
the store URL and the passphrase alone (:func:`recover_keys`); an operator who forgot the
passphrase still has the key file, and sets a new one (:func:`put_key_copy` replaces the
copy atomically: a replacing put is atomic on every backend, so readers see the old copy or
the new one, never a mix). Garbage collection, retention and verification never touch
``keys/``.

Because the copy sits next to the data, its strength is the passphrase's: choose a long one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from siterecovery.store.backend import Backend, open_backend
from siterecovery.store.errors import (
    IntegrityError,
    KeyFileError,
    ObjectNotFound,
    WrongKey,
    WrongPassphrase,
)
from siterecovery.store.keys import (
    CONFIG_KEY,
    KeyFileInfo,
    StoreConfig,
    StoreKeys,
    inspect_key_document,
)
from siterecovery.store.keywrap import ScryptParams

__all__ = [
    "KEYS_PREFIX",
    "KeyCopy",
    "copy_key",
    "find_key_copy",
    "put_key_copy",
    "recover_keys",
]

KEYS_PREFIX = "keys/"


def copy_key(fingerprint: str) -> str:
    """The store key of the wrapped copy of the key set ``fingerprint``."""
    return f"{KEYS_PREFIX}{fingerprint}.json"


@dataclass(frozen=True)
class KeyCopy:
    """A wrapped copy of keys found in a store (nothing unlocked)."""

    key: str
    info: KeyFileInfo


def _parse(backend: Backend, key: str) -> tuple[dict[str, object], KeyFileInfo]:
    where = f"key copy {key} in {backend.url}"
    try:
        doc = json.loads(backend.get(key))
    except ValueError as exc:
        raise KeyFileError(f"{where} is not valid JSON") from exc
    info = inspect_key_document(doc, where)
    if not info.protected:  # a plain copy next to the data would defeat encryption
        raise KeyFileError(f"{where} is not passphrase-protected; delete it")
    return doc, info


def put_key_copy(
    backend: Backend, keys: StoreKeys, passphrase: str, *, scrypt: ScryptParams | None = None
) -> str:
    """Store ``keys`` wrapped under ``passphrase`` at :func:`copy_key`, replacing an earlier
    copy atomically, then read it back and unlock it (``IntegrityError`` if that fails).
    Returns the object key."""
    key = copy_key(keys.fingerprint)
    doc = keys.to_document(passphrase, scrypt=scrypt)
    backend.put(key, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    stored, _ = _parse(backend, key)
    if StoreKeys.from_document(stored, key, passphrase) != keys:
        raise IntegrityError(f"the key copy {key} in {backend.url} did not read back")
    return key


def find_key_copy(backend: Backend, fingerprint: str) -> KeyCopy | None:
    """The wrapped copy of the key set ``fingerprint`` in the store, or None."""
    key = copy_key(fingerprint)
    try:
        _, info = _parse(backend, key)
    except ObjectNotFound:
        return None
    return KeyCopy(key, info)


def recover_keys(
    url: str, passphrase: str, *, wrap: Callable[[Backend], Backend] | None = None
) -> StoreKeys:
    """The keys of the store at ``url``, unlocked from its wrapped copy with ``passphrase``
    and checked against the store config (so they are known to open the store).

    Raises ``ObjectNotFound`` if there is no store at ``url``, ``KeyFileError`` if it holds
    no key copy, ``WrongPassphrase`` if the passphrase unlocks none of its copies. Reads
    nothing but the config and ``keys/``, and changes nothing.
    """
    backend = open_backend(url)
    backend = wrap(backend) if wrap is not None else backend
    try:
        config = backend.get(CONFIG_KEY)
    except ObjectNotFound as exc:
        raise ObjectNotFound(f"no replica store at {url}", hint="check the store URL") from exc
    copies = [i.key for i in backend.list(KEYS_PREFIX) if i.key.endswith(".json")]
    if not copies:
        raise KeyFileError(
            f"the replica store at {url} holds no passphrase-protected copy of its keys",
            hint="restore the key file from its backup; a copy is made by `vault init "
            "--passphrase` or `siterecovery store key passphrase`",
        )
    for key in copies:
        doc, _ = _parse(backend, key)
        try:
            keys = StoreKeys.from_document(doc, f"key copy {key}", passphrase)
            StoreConfig.from_bytes(config, keys, url)
        except WrongKey:  # WrongPassphrase, or a copy of another store's keys
            continue
        return keys
    raise WrongPassphrase(f"the passphrase unlocks no key copy of the replica store at {url}")
