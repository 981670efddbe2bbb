"""The replica store: where replicated disks and recovery points live.

Public API (everything else in this package is internal)::

    ReplicaStore.init(url, keys, *, block_size=1 << 20, encrypted=True, passphrase=None,
                      wrap=None) -> ReplicaStore
    ReplicaStore.open(url, keys, *, wrap=None) -> ReplicaStore
    store.put_key_copy(passphrase) -> str       passphrase-wrapped keys kept in keys/
    recover_keys(url, passphrase, *, wrap=None) -> StoreKeys
    store.begin_base(vm, disk, size, *, repair=False) -> BaseWriter
                                                           .write(offset, data) .commit() .abort()
    store.begin_segment(vm, disk, size) -> SegmentWriter   .add(offset, data) .commit() .abort()
    store.publish_point(vm, {disk: DiskChain}, consistency=, vm_config=, created_at=None)
    store.list_points(vm) / scan_points(vm) / load_point(vm, point_id)
    store.restore_disk(point, disk, dest, fmt="raw"|"qcow2", progress=None)
    store.read_disk(point, disk) / read_blocks(point, disk)
    store.verify(deep=False) -> VerifyReport
    repair_plan(report) -> [RepairAction] / damaged_vms(report) -> {vm: reason}
    StoreKeys.generate() / .save(path, *, passphrase=None) / StoreKeys.load(path, passphrase)
    inspect_key_file(path) -> KeyFileInfo                  (wrapping, fingerprint; no secret)
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
    ContainerNotFound,
    FormatError,
    IntegrityError,
    InvalidKey,
    KeyFileError,
    MaintenanceRefused,
    ObjectExists,
    ObjectNotFound,
    PassphraseRequired,
    StoreAuthError,
    StoreFull,
    StoreInputError,
    StoreUnavailable,
    UnknownScheme,
    WrongKey,
    WrongPassphrase,
)
from siterecovery.store.keycopy import recover_keys
from siterecovery.store.keys import KeyFileInfo, StoreKeys, inspect_key_file
from siterecovery.store.keywrap import ScryptParams
from siterecovery.store.manifest import DiskChain, DiskRef, PointManifest, SegmentRef
from siterecovery.store.points import DamagedPoint, PointScan
from siterecovery.store.reader import RestoreStats
from siterecovery.store.repair import RepairAction, damaged_vms, repair_plan
from siterecovery.store.repository import ReplicaStore
from siterecovery.store.verify import DamagedObject, VerifyReport
from siterecovery.store.writers import BaseWriter, SegmentWriter, WriteStats

__all__ = [
    "Backend",
    "BaseWriter",
    "ContainerNotFound",
    "DamagedObject",
    "DamagedPoint",
    "DiskChain",
    "DiskRef",
    "FormatError",
    "IntegrityError",
    "InvalidKey",
    "KeyFileError",
    "KeyFileInfo",
    "MaintenanceRefused",
    "ObjectExists",
    "ObjectInfo",
    "ObjectNotFound",
    "PassphraseRequired",
    "PointManifest",
    "PointScan",
    "RepairAction",
    "ReplicaStore",
    "RestoreStats",
    "ScryptParams",
    "SegmentRef",
    "SegmentWriter",
    "StoreAuthError",
    "StoreFull",
    "StoreInputError",
    "StoreKeys",
    "StoreUnavailable",
    "UnknownScheme",
    "VerifyReport",
    "WriteStats",
    "WrongKey",
    "WrongPassphrase",
    "damaged_vms",
    "inspect_key_file",
    "open_backend",
    "recover_keys",
    "register_scheme",
    "repair_plan",
    "supported_schemes",
    "validate_key",
]
