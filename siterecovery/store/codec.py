"""Content ids, checksums, MACs and the sealed object envelope.

Every hash in the store is keyed with the store's ``hash_key`` (BLAKE3 keyed mode), so names
and checksums leak nothing about the data to someone without the key file. Purposes other
than chunk ids use keys derived from ``hash_key`` with BLAKE3's key derivation mode, so no two
purposes share a key.

Sealed object envelope (all integers big-endian)::

    offset  size  field
    0       4     magic b"SRO1"
    4       1     flags: bit 0 = payload is zstd-compressed, bit 1 = AES-256-GCM;
                  other bits must be 0 (an unknown bit is a newer format -> FormatError)
    5       8     plain_len: length of the original data (u64)
    13      ...   body
      AES-256-GCM:  nonce (12 random bytes) || ciphertext || tag (16)
                    AAD = the 13 header bytes || the object name (UTF-8)
      otherwise:    payload || mac (32), mac = keyed BLAKE3 over
                    header || u16 len(name) || name || payload

``payload`` is the zstd frame of the data (level 3 by default), or the data itself when
compression would not make it smaller. The object name (its store key, or ``key#part`` for
parts of a larger object) is bound into the MAC / AAD, so an object copied to another name
does not decode. :meth:`Codec.unseal` checks all of it and raises ``IntegrityError`` naming
the object on any mismatch or truncation; corrupt data is never returned.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Final

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from siterecovery.store.errors import FormatError, IntegrityError, WrongKey

__all__ = [
    "CHUNK_ID_LEN",
    "KEY_LEN",
    "SUBBLOCK_SIZE",
    "SUM_LEN",
    "Codec",
    "derive_key",
]

MAGIC: Final = b"SRO1"
FLAG_ZSTD: Final = 0x01
FLAG_AES: Final = 0x02
_KNOWN_FLAGS: Final = FLAG_ZSTD | FLAG_AES
_HEADER = struct.Struct(">4sBQ")
_NONCE_LEN: Final = 12
_TAG_LEN: Final = 16
_MAC_LEN: Final = 32

#: Length of store keys (hash key, data key) in bytes.
KEY_LEN: Final = 32
#: Length of a chunk id in hex characters.
CHUNK_ID_LEN: Final = 64
#: Granularity of the fixed-block checksums used by resync.
SUBBLOCK_SIZE: Final = 64 * 1024
#: Length of one sub-block checksum in bytes.
SUM_LEN: Final = 16

_KEY_CHECK_TEXT: Final = b"siterecovery key check v1"


def derive_key(master: bytes, purpose: str) -> bytes:
    """A 32-byte key for ``purpose`` derived from ``master`` (BLAKE3 derive_key mode)."""
    h = blake3.blake3(derive_key_context=f"siterecovery 2024 {purpose}")
    h.update(master)
    return bytes(h.digest())


_tls = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread and level is cheap and reused.
    cache: dict[int, zstandard.ZstdCompressor] = _tls.__dict__.setdefault("zc", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_tls, "zd"):
        _tls.zd = zstandard.ZstdDecompressor()
    return _tls.zd  # type: ignore[no-any-return]


class Codec:
    """Hashing and sealing with one store's keys. Thread-safe.

    ``encrypt`` selects AES-256-GCM for new objects (needs ``data_key``); unseal accepts both
    kinds but refuses an encrypted object without a data key.
    """

    def __init__(
        self, hash_key: bytes, data_key: bytes | None, *, encrypt: bool, level: int = 3
    ) -> None:
        if len(hash_key) != KEY_LEN or (data_key is not None and len(data_key) != KEY_LEN):
            raise WrongKey(f"store keys must be {KEY_LEN} bytes long")
        if encrypt and data_key is None:
            raise WrongKey("this store is encrypted but the keys hold no data key")
        self._hash_key = hash_key
        self._aes = AESGCM(data_key) if data_key is not None else None
        self._encrypt = encrypt
        self._level = level
        self._sum_key = derive_key(hash_key, "subblock checksum")
        self._seal_key = derive_key(hash_key, "sealed object mac")
        self._mac_key = derive_key(hash_key, "document mac")
        self._digest_key = derive_key(hash_key, "object digest")

    # -- hashes ---------------------------------------------------------------------

    def chunk_id(self, data: bytes | memoryview) -> str:
        """The content id of a block: keyed BLAKE3 of the plaintext, 64 hex characters."""
        return str(blake3.blake3(data, key=self._hash_key).hexdigest())

    def subblock_sums(self, data: bytes | memoryview) -> bytes:
        """Concatenated 16-byte keyed checksums of each 64 KiB piece of ``data`` (the last
        piece may be short). Equal pieces at any offset have equal checksums."""
        view = memoryview(data)
        return b"".join(
            blake3.blake3(view[i : i + SUBBLOCK_SIZE], key=self._sum_key).digest(length=SUM_LEN)
            for i in range(0, len(view), SUBBLOCK_SIZE)
        )

    def mac(self, data: bytes) -> str:
        """A keyed MAC (hex) for documents such as manifests and the store config."""
        return str(blake3.blake3(data, key=self._mac_key).hexdigest())

    def digest(self, data: bytes | memoryview) -> str:
        """The keyed digest (hex) of a stored object's bytes, as recorded in references."""
        h = self.digest_hasher()
        h.update(data)
        return str(h.hexdigest())

    def digest_hasher(self) -> blake3.blake3:
        """An incremental hasher producing :meth:`digest` (for reading objects in ranges)."""
        return blake3.blake3(key=self._digest_key)

    def key_check(self) -> str:
        """The store config's proof that a hash key is the right one (hex)."""
        return str(blake3.blake3(_KEY_CHECK_TEXT, key=self._hash_key).hexdigest())

    # -- envelope -------------------------------------------------------------------

    def seal(self, name: str, data: bytes | memoryview, *, compress: bool = True) -> bytes:
        """Wrap ``data`` in the envelope for the object called ``name``."""
        flags, payload = 0, bytes(data)
        if compress and payload:
            packed = _compressor(self._level).compress(payload)
            if len(packed) < len(payload):
                flags, payload = FLAG_ZSTD, packed
        if self._encrypt:
            flags |= FLAG_AES
        header = _HEADER.pack(MAGIC, flags, len(data))
        if self._encrypt:
            assert self._aes is not None
            nonce = os.urandom(_NONCE_LEN)
            aad = header + name.encode()
            return header + nonce + self._aes.encrypt(nonce, payload, aad)
        return header + payload + self._trailer(name, header, payload)

    def _trailer(self, name: str, header: bytes, payload: bytes | memoryview) -> bytes:
        h = blake3.blake3(header, key=self._seal_key)
        encoded = name.encode()
        h.update(struct.pack(">H", len(encoded)) + encoded)
        h.update(payload)
        return bytes(h.digest())

    def unseal(self, name: str, blob: bytes) -> bytes:
        """Check and open an envelope; return the original data.

        Raises ``IntegrityError`` (naming ``name``) when the object is truncated, altered,
        was sealed under another name or with other keys; ``FormatError`` for unknown flags.
        """
        if len(blob) < _HEADER.size:
            raise IntegrityError(f"object {name} is corrupt: truncated ({len(blob)} bytes)")
        magic, flags, plain_len = _HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise IntegrityError(f"object {name} is corrupt: bad magic {magic!r}")
        if flags & ~_KNOWN_FLAGS:
            raise FormatError(
                f"object {name} uses unknown envelope flags {flags:#04x}: "
                "written by a newer siterecovery?"
            )
        header, body = blob[: _HEADER.size], memoryview(blob)[_HEADER.size :]
        if flags & FLAG_AES:
            payload = self._decrypt(name, header, body)
        else:
            payload = self._check_trailer(name, header, body)
        return self._unpack(name, flags, plain_len, payload)

    def _decrypt(self, name: str, header: bytes, body: memoryview) -> bytes:
        if self._aes is None:
            raise WrongKey(f"object {name} is encrypted and the keys hold no data key")
        if len(body) < _NONCE_LEN + _TAG_LEN:
            raise IntegrityError(f"object {name} is corrupt: truncated")
        nonce, sealed = bytes(body[:_NONCE_LEN]), bytes(body[_NONCE_LEN:])
        try:
            return self._aes.decrypt(nonce, sealed, header + name.encode())
        except InvalidTag as exc:
            raise IntegrityError(
                f"object {name} is corrupt: authentication tag mismatch (altered, truncated, "
                "or stored under another name)"
            ) from exc

    def _check_trailer(self, name: str, header: bytes, body: memoryview) -> bytes:
        if len(body) < _MAC_LEN:
            raise IntegrityError(f"object {name} is corrupt: truncated")
        payload, mac = body[:-_MAC_LEN], bytes(body[-_MAC_LEN:])
        if self._trailer(name, header, payload) != mac:
            raise IntegrityError(
                f"object {name} is corrupt: MAC mismatch (altered, truncated, or stored under "
                "another name)"
            )
        return bytes(payload)

    @staticmethod
    def _unpack(name: str, flags: int, plain_len: int, payload: bytes) -> bytes:
        if flags & FLAG_ZSTD:
            try:
                data = _decompressor().decompress(payload, max_output_size=plain_len)
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"object {name} is corrupt: {exc}") from exc
        else:
            data = payload
        if len(data) != plain_len:
            raise IntegrityError(
                f"object {name} is corrupt: {len(data)} bytes decoded, {plain_len} expected"
            )
        return bytes(data)
