"""The replica store: where replicated disks and recovery points live.

Public API (everything else in this package is internal)::

    ReplicaStore.init(url, keys, *, block_size=1 << 20, encrypted=False) -> ReplicaStore
    ReplicaStore.open(url, keys) -> ReplicaStore
    store.begin_base(vm, disk, size) -> BaseWriter         .write(offset, data) .commit() .abort()
    store.begin_segment(vm, disk, size) -> SegmentWriter   .add(offset, data) .commit() .abort()
    store.publish_point(vm, {disk: DiskChain}, consistency=, vm_config=, created_at=None)
    store.list_points(vm) / scan_points(vm) / load_point(vm, point_id)
    store.restore_disk(point, disk, dest, fmt="raw"|"qcow2", progress=None)
    store.read_disk(point, disk) / read_blocks(point, disk)
    store.verify(deep=False) -> VerifyReport
    StoreKeys.generate() / .save(path) / StoreKeys.load(path)
    open_backend(url) / register_scheme(scheme, factory)     (file://, memory:// built in)

The on-store format is specified in docs/store-format.md; errors in
:mod:`siterecovery.store.errors`.
"""

from siterecovery.store.backend import (
    Backend,
    ObjectInfo,
    open_backend,
    register_scheme,
    supported_schemes,
    validate_key,
)
from siterecovery.store.errors import (
    FormatError,
    IntegrityError,
    InvalidKey,
    KeyFileError,
    ObjectExists,
    ObjectNotFound,
    StoreFull,
    StoreInputError,
    StoreUnavailable,
    UnknownScheme,
    WrongKey,
)
from siterecovery.store.keys import StoreKeys
from siterecovery.store.manifest import DiskChain, DiskRef, PointManifest, SegmentRef
from siterecovery.store.points import DamagedPoint, PointScan
from siterecovery.store.reader import RestoreStats
from siterecovery.store.repository import ReplicaStore
from siterecovery.store.verify import DamagedObject, VerifyReport
from siterecovery.store.writers import BaseWriter, SegmentWriter, WriteStats

__all__ = [
    "Backend",
    "BaseWriter",
    "DamagedObject",
    "DamagedPoint",
    "DiskChain",
    "DiskRef",
    "FormatError",
    "IntegrityError",
    "InvalidKey",
    "KeyFileError",
    "ObjectExists",
    "ObjectInfo",
    "ObjectNotFound",
    "PointManifest",
    "PointScan",
    "ReplicaStore",
    "RestoreStats",
    "SegmentRef",
    "SegmentWriter",
    "StoreFull",
    "StoreInputError",
    "StoreKeys",
    "StoreUnavailable",
    "UnknownScheme",
    "VerifyReport",
    "WriteStats",
    "WrongKey",
    "open_backend",
    "register_scheme",
    "supported_schemes",
    "validate_key",
]
