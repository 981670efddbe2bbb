"""Failover RTO for the benchmark: a protected demo guest, then one unplanned failover per run.

Setup (untimed, in the benchmark process, :func:`build_site`): an embedded vault (SQLite) and a
``file://`` store under ``ROOT``; for each ``(vm, data image)`` a primary QEMU VM of the demo
guest (``build_guest``: the host kernel with a busybox initramfs, 256 MiB memory, TCG) with
a 16 MiB system disk and a copy of the data image (qcow2) as data disk, paused (``-S``:
replicating the disks needs no running vCPU), registered and protected (the *enable
protection* job, whose initial replication fills the store); then the primary is killed, as
in a lost site. The vault database is kept as ``vault.template.db``; every run starts from a
copy of it, so each failover starts from *protected*.

Timed run (a child process, run by path: it imports only siterecovery)::

    python -P bench/rto.py failover --root ROOT --vm NAME --mode instant|full

runs ``EmbeddedFailover.unplanned(vm)`` with the recovery mode given (no hydration, so the
instant replica keeps reading the store) and prints one JSON object::

    {"running_s": s, "first_output_s": s, "booted_s": s, "mode": str, "point": str}

- ``running_s``: the call → it returned: the replica's QEMU answers on QMP with its vCPUs
  running (for ``full``, after every disk was restored and verified);
- ``first_output_s``: the call → the first byte on the replica's serial console (the kernel
  boots ``quiet``, so this is ``/init`` reporting);
- ``booted_s``: the call → ``SR-BOOTED`` (the guest booted and found its disks).

The replica VM and its NBD server are stopped before the process exits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from siterecovery.agent.embedded import EmbeddedAgent, EmbeddedFailover
from siterecovery.hypervisor.guest import GuestImage, build_guest, guest_cmdline, make_disk
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec
from siterecovery.recovery import instant
from siterecovery.recovery.failover import FailoverOptions
from siterecovery.recovery.replica import RecoveryHost, RecoveryMode
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import service
from siterecovery.vault.db import Database, open_database
from siterecovery.vault.models import SiteRole

POLICY = "bench"
BOOT_TIMEOUT_S = 180.0


def _db(root: Path) -> Database:
    return open_database(f"sqlite:///{root / 'vault.db'}")


def _store(root: Path) -> ReplicaStore:
    return ReplicaStore.open(f"file://{root / 'store'}", StoreKeys.load(root / "store.key"))


def _primary(
    root: Path, guest: GuestImage, vm: str, data: Path
) -> tuple[QemuProcess, dict[str, Any]]:
    workdir = root / "primary" / vm
    workdir.mkdir(parents=True)
    system, disk = workdir / "system.qcow2", workdir / "data.qcow2"
    make_disk(system, 16 << 20)
    subprocess.run(["cp", "--sparse=always", str(data), str(disk)], check=True)
    spec = VmProcessSpec(
        name=vm, workdir=workdir,
        drives=[DriveSpec("system", system), DriveSpec("data", disk)],
        kernel=guest.kernel, initrd=guest.initrd, append=guest_cmdline("idle"), accel="tcg",
        extra_args=["-S"],
    )  # fmt: skip
    config: dict[str, Any] = {
        "cpus": 1, "memory_mib": spec.memory_mib,
        "boot": {"kernel": str(spec.kernel), "initrd": str(spec.initrd), "append": spec.append},
        "disks": [{"name": "system"}, {"name": "data"}],
    }  # fmt: skip
    return QemuProcess.start(spec), config


def build_site(root: Path, guest_cache: Path, disks: dict[str, Path]) -> None:
    """Make ``root`` hold a vault and a store with every VM of ``disks`` (name → data qcow2)
    protected and its primary killed; see the module docstring."""
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("run", "recovery", "primary"):
        (root / sub).mkdir(parents=True)
    guest = build_guest(guest_cache)
    keys = StoreKeys.generate()
    keys.save(root / "store.key")
    store = ReplicaStore.init(f"file://{root / 'store'}", keys, encrypted=False)  # as measured
    db = _db(root)
    try:
        service.ensure_site(db, name="primary", role=SiteRole.PRIMARY)
        service.ensure_host(db, name="bench-host", site="primary")
        service.create_policy(db, name=POLICY, copy_frequency_s=300, retention_h=24)
        protection = EmbeddedAgent(db, store, root / "run")
        for vm, data in disks.items():
            primary, config = _primary(root, guest, vm, data)
            try:
                protection.register_vm(host="bench-host", name=vm, qmp_path=primary.qmp_path,
                                       config=config)  # fmt: skip
                protection.enable_protection(vm, POLICY)
            finally:
                primary.kill()
    finally:
        db.close()
    shutil.copyfile(root / "vault.db", root / "vault.template.db")


def reset(root: Path) -> None:
    """Back to the state after :func:`build_site`: every VM protected, no replica."""
    for sub in ("recovery", "run"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir()
    shutil.copyfile(root / "vault.template.db", root / "vault.db")


def failover(root: Path, vm: str, mode: RecoveryMode) -> dict[str, Any]:
    """One timed unplanned failover of ``vm``; see the module docstring for the figures."""
    db = _db(root)
    try:
        service_ = EmbeddedFailover(
            db, _store(root), root / "recovery", key_file=root / "store.key",
            run_dir=root / "run", host=RecoveryHost(memory_mib=4096, max_parallel=2),
        )  # fmt: skip
        opts = FailoverOptions(mode=mode, append=guest_cmdline("idle"), hydrate=False)
        started = time.monotonic()
        outcome = service_.unplanned(vm, options=opts)
        running = time.monotonic() - started
        try:
            first = _first_output(outcome.process, started)
            outcome.process.wait_serial(r"^SR-BOOTED", BOOT_TIMEOUT_S)
            booted = time.monotonic() - started
        finally:
            outcome.process.stop()
            instant.stop_pid(outcome.record.server_pid)
    finally:
        db.close()
    return {"running_s": running, "first_output_s": first, "booted_s": booted,
            "mode": str(mode), "point": outcome.point.point_id}  # fmt: skip


def _first_output(process: QemuProcess, started: float) -> float:
    while not process.serial_text().strip():
        if not process.alive() or time.monotonic() - started > BOOT_TIMEOUT_S:
            raise RuntimeError(f"the replica printed nothing: {process.serial_text()[-500:]}")
        time.sleep(0.01)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -P bench/rto.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("failover")
    cmd.add_argument("--root", type=Path, required=True)
    cmd.add_argument("--vm", required=True)
    cmd.add_argument("--mode", choices=[str(m) for m in RecoveryMode], required=True)
    args = parser.parse_args(argv)
    json.dump(failover(args.root, args.vm, RecoveryMode(args.mode)), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
