"""siterecovery's side of each row, run as a child process so it is measured like the anchors.

Usage (the harness builds these command lines; each prints one JSON object on stdout)::

    python -P bench/ours.py init    --store URL --keys FILE [--block-size N]
    python -P bench/ours.py cycle   --store URL --keys FILE --qmp SOCK --run-dir DIR [--delta]
    python -P bench/ours.py restore --store URL --keys FILE --dest FILE

- ``init`` creates an empty, unencrypted store (keys generated into ``--keys`` if absent);
- ``cycle`` runs one replication cycle of the disk served at ``--qmp`` (node ``d0``) through
  the real path, ``Replicator(ChangeTracker(...), ReplicaStore, vm).run_cycle(previous)``:
  initial (``previous=None``) by default, a delta on top of the newest point with ``--delta``;
  prints ``{"point", "bytes_read", "extents", "cycle_seconds"}``;
- ``restore`` writes disk ``d0`` of the newest point to ``--dest`` as a sparse raw image;
  prints ``{"point", "bytes", "written"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from siterecovery.hypervisor.tracking import ChangeTracker
from siterecovery.replication.engine import Replicator
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
    ReplicaStore.init(args.store, _keys(args.keys), block_size=args.block_size)
    return {"store": args.store}


def cycle(args: argparse.Namespace) -> dict[str, Any]:
    store = ReplicaStore.open(args.store, _keys(args.keys))
    previous = store.list_points(VM)[-1] if args.delta else None
    tracker = ChangeTracker(args.qmp, args.run_dir, RELATIONSHIP, nodes={DISK: "d0"})
    result = Replicator(tracker, store, VM).run_cycle(previous)
    return {
        "point": result.point.point_id,
        "bytes_read": result.bytes_read,
        "extents": sum(d.extents for d in result.disks),
        "cycle_seconds": result.duration_s,
    }


def restore(args: argparse.Namespace) -> dict[str, Any]:
    store = ReplicaStore.open(args.store, _keys(args.keys))
    point = store.list_points(VM)[-1]
    stats = store.restore_disk(point, DISK, args.dest, overwrite=True)
    return {"point": point.point_id, "bytes": stats.disk_size, "written": stats.bytes_written}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -P bench/ours.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("init", "cycle", "restore"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--store", required=True, help="replica store URL (file://...)")
        cmd.add_argument("--keys", type=Path, required=True, help="store key file")
    sub.choices["init"].add_argument("--block-size", type=int, default=1 << 20)
    sub.choices["cycle"].add_argument("--qmp", type=Path, required=True)
    sub.choices["cycle"].add_argument("--run-dir", type=Path, required=True)
    sub.choices["cycle"].add_argument("--delta", action="store_true")
    sub.choices["restore"].add_argument("--dest", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"init": init, "cycle": cycle, "restore": restore}
    json.dump(handlers[args.command](args), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
