"""siterecovery's side of each row, run as a child process so it is measured like the anchors.

Usage (the harness builds these command lines; each prints one JSON object on stdout)::

    python -P bench/ours.py init    --store URL --keys FILE [--block-size N]
    python -P bench/ours.py cycle   --store URL --keys FILE --qmp SOCK --run-dir DIR [--delta]
    python -P bench/ours.py restore --store URL --keys FILE --dest FILE
    python -P bench/ours.py resync  --store URL --keys FILE --qmp SOCK --run-dir DIR
    python -P bench/ours.py untrack --store URL --keys FILE --qmp SOCK --run-dir DIR
    python -P bench/ours.py usage   --store URL --keys FILE [--wipe]

- ``init`` creates an empty, unencrypted store (keys generated into ``--keys`` if absent);
- ``cycle`` runs one replication cycle of the disk served at ``--qmp`` (node ``d0``) through
  the real path, ``Replicator(ChangeTracker(...), ReplicaStore, vm).run_cycle(previous)``:
  initial (``previous=None``) by default, a delta on top of the newest point with ``--delta``;
  prints ``{"point", "bytes_read", "extents", "cycle_seconds"}``;
- ``restore`` writes disk ``d0`` of the newest point to ``--dest`` as a sparse raw image;
  prints ``{"point", "bytes", "written"}``;
- ``resync`` resynchronizes the disk against the newest point with the real
  ``Resyncer(ChangeTracker(...), ReplicaStore, vm).run(previous)`` (fixed-block checksum
  compare, only differing blocks sent); prints ``{"point", "bytes_read", "bytes_sent",
  "blocks_sent", "bytes_stored", "cycle_seconds"}``;
- ``untrack`` drops the disk's change tracking (``ChangeTracker.stop_tracking``), so later
  writes are not tracked (the resync row's divergence); prints ``{}``;
- ``usage`` sums the store's objects (any scheme: it lists through the backend, so it works
  for ``s3://`` and ``azure://`` too); prints ``{"bytes_stored", "objects"}``; with ``--wipe``
  it then deletes every object (the next run starts from an empty prefix).

Credentials of ``s3://`` and ``azure://`` stores come from the environment, as in production.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from siterecovery.hypervisor.tracking import ChangeTracker
from siterecovery.replication.engine import Replicator
from siterecovery.replication.resync import Resyncer
from siterecovery.store.backend import open_backend
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore

VM = "bench"
DISK = "d0"
RELATIONSHIP = "be0c4001"


def _keys(path: Path) -> StoreKeys:
    if not path.exists():
        StoreKeys.generate(with_data_key=False).save(path)
    return StoreKeys.load(path)


def init(args: argparse.Namespace) -> dict[str, Any]:
    # plaintext, as measured in docs/benchmarks.md (the keys have no data key)
    ReplicaStore.init(args.store, _keys(args.keys), block_size=args.block_size, encrypted=False)
    return {"store": args.store}


def cycle(args: argparse.Namespace) -> dict[str, Any]:
    store = ReplicaStore.open(args.store, _keys(args.keys))
    previous = store.list_points(VM)[-1] if args.delta else None
    result = Replicator(_tracker(args), store, VM).run_cycle(previous)
    return {
        "point": result.point.point_id,
        "bytes_read": result.bytes_read,
        "extents": sum(d.extents for d in result.disks),
        "cycle_seconds": result.duration_s,
    }


def _tracker(args: argparse.Namespace) -> ChangeTracker:
    return ChangeTracker(args.qmp, args.run_dir, RELATIONSHIP, nodes={DISK: "d0"})


def resync(args: argparse.Namespace) -> dict[str, Any]:
    store = ReplicaStore.open(args.store, _keys(args.keys))
    result = Resyncer(_tracker(args), store, VM).run(store.list_points(VM)[-1])
    return {
        "point": result.point.point_id,
        "bytes_read": result.bytes_read,
        "bytes_sent": result.bytes_sent,
        "blocks_sent": result.blocks_sent,
        "bytes_stored": result.bytes_stored,
        "cycle_seconds": result.duration_s,
    }


def untrack(args: argparse.Namespace) -> dict[str, Any]:
    _tracker(args).stop_tracking()
    return {}


def usage(args: argparse.Namespace) -> dict[str, Any]:
    backend = open_backend(args.store)
    objects = list(backend.list())
    if args.wipe:
        for info in objects:
            backend.delete(info.key)
    return {"bytes_stored": sum(info.size for info in objects), "objects": len(objects)}


def restore(args: argparse.Namespace) -> dict[str, Any]:
    store = ReplicaStore.open(args.store, _keys(args.keys))
    point = store.list_points(VM)[-1]
    stats = store.restore_disk(point, DISK, args.dest, overwrite=True)
    return {"point": point.point_id, "bytes": stats.disk_size, "written": stats.bytes_written}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -P bench/ours.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("init", "cycle", "restore", "resync", "untrack", "usage"):
        cmd = sub.add_parser(name)
        cmd.add_argument(
            "--store", required=True, help="replica store URL (file://, s3://, azure://)"
        )
        cmd.add_argument("--keys", type=Path, required=True, help="store key file")
    sub.choices["init"].add_argument("--block-size", type=int, default=1 << 20)
    sub.choices["cycle"].add_argument("--qmp", type=Path, required=True)
    sub.choices["cycle"].add_argument("--run-dir", type=Path, required=True)
    sub.choices["cycle"].add_argument("--delta", action="store_true")
    for name in ("resync", "untrack"):
        sub.choices[name].add_argument("--qmp", type=Path, required=True)
        sub.choices[name].add_argument("--run-dir", type=Path, required=True)
    sub.choices["usage"].add_argument("--wipe", action="store_true")
    sub.choices["restore"].add_argument("--dest", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "init": init,
        "cycle": cycle,
        "restore": restore,
        "resync": resync,
        "untrack": untrack,
        "usage": usage,
    }
    json.dump(handlers[args.command](args), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
