"""``ReplicaStore``: the replica store as the rest of siterecovery uses it.

Object layout under the store root (see docs/store-format.md)::

    siterecovery-store.json              store config (format version, block size, key check)
    chunks/<2 hex>/<64 hex>              base image blocks, content-addressed, shared by all
    indexes/<vm>/<disk>/<id>             base index: block -> chunk or zero
    segments/<vm>/<disk>/<id>            delta segment: one disk's dirty extents of a cycle
    points/<vm>/<point_id>.json          recovery point manifest, published last

Writers store chunks, indexes and segments that nothing refers to until
:meth:`ReplicaStore.publish_point` checks they exist and publishes the manifest with a
create-only put: a recovery point exists exactly when everything it names exists.

``keys/<fingerprint>.json`` holds the passphrase-wrapped copy of the keys, when one was
made (:mod:`siterecovery.store.keycopy`).

:meth:`ReplicaStore.open` and :meth:`ReplicaStore.init` take ``wrap``, a function applied to
the backend before anything is read, e.g. ``lambda b: wrap_backend(b, retry=RetryPolicy())``
(retry, bandwidth limit, metrics: :mod:`siterecovery.store.wrappers`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from siterecovery.domain import Consistency, validate_name
from siterecovery.store.backend import Backend, open_backend
from siterecovery.store.codec import Codec
from siterecovery.store.context import StoreContext, zeros
from siterecovery.store.errors import (
    ObjectExists,
    ObjectNotFound,
    StoreInputError,
)
from siterecovery.store.keycopy import put_key_copy
from siterecovery.store.keys import (
    CONFIG_KEY,
    StoreConfig,
    StoreKeys,
    utc_text,
    validate_block_size,
)
from siterecovery.store.keywrap import ScryptParams, check_new_passphrase
from siterecovery.store.leases import acquire_lease
from siterecovery.store.manifest import DiskChain, PointManifest
from siterecovery.store.points import PointScan, load_point, publish_point, scan_points
from siterecovery.store.reader import ChainReader, RestoreStats, restore_disk
from siterecovery.store.verify import VerifyReport, verify_store
from siterecovery.store.writers import BaseWriter, SegmentWriter

__all__ = ["BackendWrap", "ReplicaStore"]

#: Applied to a store's backend when it is opened (retry, throttling, metrics wrappers).
BackendWrap = Callable[[Backend], Backend]


def _open_wrapped(url: str, wrap: BackendWrap | None) -> Backend:
    backend = open_backend(url)
    return wrap(backend) if wrap is not None else backend


def _default_workers() -> int:
    return max(2, min(4, os.cpu_count() or 1))


class ReplicaStore:
    """An opened replica store. Build one with :meth:`init` or :meth:`open`.

    Thread-safe: writers, readers and the verifier may run concurrently from several threads.
    ``workers`` and ``max_in_flight`` bound the parallelism and memory of each writer/reader.
    """

    def __init__(
        self,
        backend: Backend,
        keys: StoreKeys,
        config: StoreConfig,
        *,
        workers: int | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.backend = backend
        self.config = config
        self._keys = keys
        data_key = keys.data_key if config.encrypted else None
        codec = Codec(keys.hash_key, data_key, encrypt=config.encrypted)
        n = workers or _default_workers()
        self._ctx = StoreContext(backend, codec, config.block_size, n, max_in_flight or 2 * n)

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def encrypted(self) -> bool:
        return self.config.encrypted

    @property
    def context(self) -> StoreContext:
        """The opened store's internals, for the store's own maintenance modules (garbage
        collection, compaction); not for use outside ``siterecovery.store``."""
        return self._ctx

    # -- creation -------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        url: str,
        keys: StoreKeys,
        *,
        block_size: int = 1 << 20,
        encrypted: bool = True,
        passphrase: str | None = None,
        scrypt: ScryptParams | None = None,
        wrap: BackendWrap | None = None,
        **options: Any,
    ) -> ReplicaStore:
        """Create a store at ``url`` (which must be empty) and return it opened.

        ``encrypted`` (the default, DESIGN §6) seals every object with AES-256-GCM under
        the keys' data key; ``encrypted=False`` stores plaintext with MACs (opt out only
        knowingly: anyone who can read the store then reads the disks). With ``passphrase``,
        a copy of ``keys`` wrapped under it is stored in ``keys/`` (see :meth:`put_key_copy`),
        so the keys can be recovered from the store.
        Raises ``StoreInputError`` if a store or any other object is already there, the block
        size is invalid, the passphrase too short, or ``encrypted`` is asked for without a
        data key in ``keys``.
        """
        validate_block_size(block_size)
        if passphrase is not None:
            check_new_passphrase(passphrase)
        if encrypted and keys.data_key is None:
            raise StoreInputError(
                "an encrypted store needs keys with a data key",
                hint="generate keys with StoreKeys.generate(with_data_key=True), or pass "
                "encrypted=False",
            )
        backend = _open_wrapped(url, wrap)
        if backend.stat(CONFIG_KEY) is not None:
            raise StoreInputError(
                f"a replica store already exists at {url}", hint="open it instead"
            )
        if next(iter(backend.list("")), None) is not None:
            raise StoreInputError(
                f"{url} is not empty", hint="create the replica store in an empty location"
            )
        config = StoreConfig(block_size, encrypted, utc_text(datetime.now(UTC)))
        store = cls(backend, keys, config, **options)
        try:
            backend.put(CONFIG_KEY, config.to_bytes(keys, store._ctx.codec), create_only=True)
        except ObjectExists as exc:
            raise StoreInputError(f"a replica store was just created at {url}") from exc
        if passphrase is not None:
            store.put_key_copy(passphrase, scrypt=scrypt)
        return store

    @classmethod
    def open(
        cls, url: str, keys: StoreKeys, *, wrap: BackendWrap | None = None, **options: Any
    ) -> ReplicaStore:
        """Open the store at ``url``: ``ObjectNotFound`` if there is none, ``WrongKey`` if
        ``keys`` are not its keys, ``FormatError`` if it is of a newer format. ``wrap`` is
        applied to the backend first, so the config read is already retried/throttled."""
        backend = _open_wrapped(url, wrap)
        try:
            raw = backend.get(CONFIG_KEY)
        except ObjectNotFound as exc:
            raise ObjectNotFound(
                f"no replica store at {url}", hint="check the URL, or create a store there"
            ) from exc
        return cls(backend, keys, StoreConfig.from_bytes(raw, keys, url), **options)

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the keys the store was opened with (no secret)."""
        return self._keys.fingerprint

    def put_key_copy(self, passphrase: str, *, scrypt: ScryptParams | None = None) -> str:
        """Store (or atomically replace) the copy of this store's keys wrapped under
        ``passphrase`` in ``keys/<fingerprint>.json``; read back and checked. Returns its
        key. ``StoreInputError`` (nothing written) if the passphrase is too short."""
        return put_key_copy(self.backend, self._keys, passphrase, scrypt=scrypt)

    # -- writing --------------------------------------------------------------------

    def begin_base(self, vm: str, disk: str, size: int, *, repair: bool = False) -> BaseWriter:
        """Start a full image of ``disk`` (``size`` bytes); see :class:`BaseWriter`.

        With ``repair``, a chunk already in the store is read and checked before it is
        reused, and replaced (atomically) when it is damaged: a resync written this way
        repairs every recovery point that shares the damaged chunk."""
        vm, disk = validate_name("VM", vm), validate_name("disk", disk)
        return BaseWriter(self._ctx, vm, disk, size, repair=repair)

    def begin_segment(self, vm: str, disk: str, size: int) -> SegmentWriter:
        """Start one cycle's delta of ``disk``; see :class:`SegmentWriter`."""
        return SegmentWriter(self._ctx, validate_name("VM", vm), validate_name("disk", disk), size)

    def publish_point(
        self,
        vm: str,
        disks: Mapping[str, DiskChain],
        *,
        consistency: str | Consistency,
        vm_config: dict[str, Any],
        created_at: datetime | None = None,
    ) -> PointManifest:
        """Publish a recovery point of ``vm`` made of ``disks`` (name -> chain).

        Every object the chains name must exist (checked first); the manifest is then put
        create-only, so the point appears whole or not at all. ``created_at`` defaults to now.
        """
        return publish_point(
            self._ctx,
            vm,
            disks,
            consistency=consistency,
            vm_config=vm_config,
            created_at=created_at,
            known=self._ctx.known,
        )

    # -- reading --------------------------------------------------------------------

    def scan_points(self, vm: str) -> PointScan:
        """Every manifest of ``vm``: the loadable ones (oldest first) and the damaged ones."""
        return scan_points(self._ctx, vm)

    def list_points(self, vm: str) -> list[PointManifest]:
        """The recovery points of ``vm``, oldest first. If any manifest is damaged this
        raises its error (naming the point and how many are damaged) rather than hide it;
        use :meth:`scan_points` to get the good ones as well."""
        scan = self.scan_points(vm)
        if scan.damaged:
            first = scan.damaged[0].error
            raise type(first)(
                f"{len(scan.damaged)} damaged recovery point manifest(s) of VM {vm}; first: "
                f"{first.message}",
                hint=first.hint,
            )
        return scan.ok

    def load_point(self, vm: str, point_id: str) -> PointManifest:
        """One recovery point, verified (``ObjectNotFound`` if it does not exist)."""
        return load_point(self._ctx, vm, point_id)

    def restore_disk(
        self,
        point: PointManifest,
        disk: str,
        dest: Path,
        *,
        fmt: str = "raw",
        progress: Callable[[int, int], None] | None = None,
        overwrite: bool = False,
    ) -> RestoreStats:
        """Write ``disk`` of ``point`` to ``dest`` as a sparse raw or a qcow2 image, every
        piece verified; ``dest`` appears only when complete. ``progress(done, total)`` is
        called in bytes after each block. Refuses an existing ``dest`` unless ``overwrite``."""
        reader = ChainReader(self._ctx, point, disk)
        # A restore may outlive the GC safety delay: its lease pins the chain it reads.
        roots = [ref.key for ref in point.disks[disk].refs()]
        with acquire_lease(self.backend, "restore", vm=point.vm, roots=roots):
            return restore_disk(reader, Path(dest), fmt=fmt, progress=progress, overwrite=overwrite)

    def read_disk(self, point: PointManifest, disk: str) -> Iterator[tuple[int, bytes]]:
        """Verified ``(offset, data)`` pieces covering the whole disk in order, one per block
        (the last may be short). Zero blocks are included as zero bytes (a shared object, so
        they cost no memory); :meth:`read_blocks` flags them as None instead."""
        reader = ChainReader(self._ctx, point, disk)  # fails now, not on first next()

        def pieces() -> Iterator[tuple[int, bytes]]:
            for offset, data in reader.blocks():
                length = min(reader.block_size, reader.size - offset)
                yield offset, data if data is not None else zeros(length)

        return pieces()

    def open_disk(self, point: PointManifest, disk: str) -> ChainReader:
        """Random access to ``disk`` of ``point``: ``reader.block(i)`` returns block ``i``
        (``reader.block_size`` bytes, the last may be short) verified, or None if it is all
        zeros. The index and segment headers are loaded and checked now; the reader is
        thread-safe (instant recovery serves it over NBD from several connections)."""
        return ChainReader(self._ctx, point, disk)

    def read_blocks(self, point: PointManifest, disk: str) -> Iterator[tuple[int, bytes | None]]:
        """Like :meth:`read_disk`, but zero blocks come as ``None``."""
        return ChainReader(self._ctx, point, disk).blocks()

    def subblock_checksums(self, point: PointManifest, disk: str) -> list[bytes | None]:
        """Keyed 16-byte checksums of every 64 KiB sub-block of ``disk`` at ``point``, taken
        from the index and segment headers without reading data (for resync's fixed-block
        compare: hash the source with the same key, send what differs). None marks a
        sub-block whose checksum is unknown because a segment changed it only partly."""
        return ChainReader(self._ctx, point, disk).subblock_sums()

    def subblock_checksum(self, data: bytes) -> bytes:
        """The checksum :meth:`subblock_checksums` uses, for one piece of source data."""
        return self._ctx.codec.subblock_sums(data)

    def verify(self, *, deep: bool = False) -> VerifyReport:
        """Check every manifest and the objects it names (deep: read and verify all of them).
        Problems are reported, not raised; only failures to reach the store raise."""
        return verify_store(self._ctx, deep=deep)
