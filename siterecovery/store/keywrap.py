"""Passphrase wrapping of secret key material (scrypt + AES-256-GCM).

A wrapped secret is a JSON object (the rest of a key document around it is the caller's)::

    {"wrapping": "scrypt-aes256gcm",
     "kdf": {"name": "scrypt", "salt": "<32 hex>", "n": 131072, "r": 8, "p": 1},
     "nonce": "<24 hex>", "wrapped": "<hex>", ...other fields of the document...}

* key encryption key (KEK) = scrypt(passphrase UTF-8, salt, n, r, p), 32 bytes;
* ``wrapped`` = AES-256-GCM(KEK, nonce, secret, AAD), ciphertext followed by the 16-byte tag;
* AAD = canonical JSON (sorted keys, no spaces, ASCII) of the document **without**
  ``wrapped``: every other field (format, version, fingerprint, the KDF parameters, the
  nonce) is authenticated, so lowering the scrypt cost or swapping fields makes unwrapping
  fail like a wrong passphrase does.

A wrong passphrase and a tampered document cannot be told apart (both fail the tag): both
raise :class:`~siterecovery.store.errors.WrongPassphrase`, before anything else is read.
KDF parameters read from a document are bounded (:meth:`ScryptParams.check`) so a crafted
file cannot make a reader allocate gigabytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from siterecovery.store.errors import KeyFileError, StoreInputError, WrongPassphrase

__all__ = [
    "DEFAULT_SCRYPT",
    "MIN_PASSPHRASE_LEN",
    "WRAPPING",
    "ScryptParams",
    "check_new_passphrase",
    "kdf_params",
    "unwrap_secret",
    "wrap_secret",
]

#: The ``wrapping`` value of passphrase-wrapped documents.
WRAPPING: Final = "scrypt-aes256gcm"
#: New passphrases must be at least this long (existing ones are accepted as they are).
MIN_PASSPHRASE_LEN: Final = 8
_SALT_LEN: Final = 16
_NONCE_LEN: Final = 12
#: 128 * n * r bytes of memory: the most a document may make a reader spend (1 GiB).
_MAX_MEMORY: Final = 1 << 30


@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost parameters. The default (n=2^17, r=8, p=1: 128 MiB, about half a second)
    follows current guidance for interactive logins; tests pass cheaper ones."""

    n: int = 1 << 17
    r: int = 8
    p: int = 1

    def check(self, where: str) -> ScryptParams:
        """Return self if the parameters are sane (n a power of two from 2^10, r 1-32,
        p 1-16, at most 1 GiB of memory); else ``KeyFileError`` naming ``where``."""
        ok = (
            all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.r, self.p))
            and self.n >= 1 << 10
            and not self.n & (self.n - 1)
            and 1 <= self.r <= 32
            and 1 <= self.p <= 16
            and 128 * self.n * self.r <= _MAX_MEMORY
        )
        if not ok:
            raise KeyFileError(f"{where} has invalid scrypt parameters {self!r}")
        return self


#: The parameters new wrappings use (module-level so tests can make them cheap).
DEFAULT_SCRYPT = ScryptParams()


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _kek(passphrase: str, salt: bytes, params: ScryptParams) -> bytes:
    kdf = Scrypt(salt=salt, length=32, n=params.n, r=params.r, p=params.p)
    return kdf.derive(passphrase.encode("utf-8"))


def check_new_passphrase(passphrase: str) -> str:
    """Return ``passphrase`` if it may protect keys; ``StoreInputError`` if it is too short."""
    if not isinstance(passphrase, str) or len(passphrase) < MIN_PASSPHRASE_LEN:
        raise StoreInputError(
            f"the passphrase is too short (at least {MIN_PASSPHRASE_LEN} characters)",
            hint="choose a longer passphrase; a few random words are easy to keep",
        )
    return passphrase


def wrap_secret(
    secret: bytes, passphrase: str, fields: dict[str, Any], params: ScryptParams | None = None
) -> dict[str, Any]:
    """A document holding ``fields`` plus ``secret`` wrapped under ``passphrase`` (see the
    module docstring). ``fields`` must not use the names this module adds."""
    params = (params or DEFAULT_SCRYPT).check("the requested wrapping")
    check_new_passphrase(passphrase)
    salt, nonce = os.urandom(_SALT_LEN), os.urandom(_NONCE_LEN)
    doc = {
        **fields,
        "wrapping": WRAPPING,
        "kdf": {"name": "scrypt", "salt": salt.hex(), "n": params.n, "r": params.r, "p": params.p},
        "nonce": nonce.hex(),
    }
    sealed = AESGCM(_kek(passphrase, salt, params)).encrypt(nonce, secret, _canonical(doc))
    return {**doc, "wrapped": sealed.hex()}


def kdf_params(doc: dict[str, Any], where: str) -> ScryptParams:
    """The scrypt parameters a wrapped document names, checked."""
    kdf = doc.get("kdf")
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
        raise KeyFileError(f"{where} names an unknown key derivation {kdf!r}")
    return ScryptParams(kdf.get("n", 0), kdf.get("r", 0), kdf.get("p", 0)).check(where)


def unwrap_secret(doc: dict[str, Any], passphrase: str, where: str) -> bytes:
    """The secret of a document made by :func:`wrap_secret`.

    ``KeyFileError`` if the document is malformed; ``WrongPassphrase`` if the passphrase
    does not unlock it (or the document was altered).
    """
    if doc.get("wrapping") != WRAPPING:
        raise KeyFileError(f"{where} is not wrapped with {WRAPPING}")
    params = kdf_params(doc, where)
    try:
        salt = bytes.fromhex(doc["kdf"]["salt"])
        nonce = bytes.fromhex(doc["nonce"])
        sealed = bytes.fromhex(doc["wrapped"])
    except (KeyError, TypeError, ValueError) as exc:
        raise KeyFileError(f"{where} is malformed: {exc}") from exc
    if len(nonce) != _NONCE_LEN or len(salt) < 8:
        raise KeyFileError(f"{where} is malformed: bad salt or nonce length")
    aad = _canonical({k: v for k, v in doc.items() if k != "wrapped"})
    try:
        return AESGCM(_kek(passphrase, salt, params)).decrypt(nonce, sealed, aad)
    except InvalidTag as exc:
        raise WrongPassphrase(f"the passphrase does not unlock {where}") from exc
