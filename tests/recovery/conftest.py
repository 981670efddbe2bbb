"""A protected VM on the embedded default, for recovery tests.

``protected_vm(name, mode=..., data_size=...)`` starts a primary QEMU VM (the demo guest; with
``paused`` its vCPUs never run, which is enough to replicate its disks), registers it (its
config is the shape QEMU reports, under ``nics`` and ``config`` when given), runs the enable
protection job and returns a :class:`Site` with everything a failover needs. ``machine``
passes further VmProcessSpec fields (machine type, CPUs, memory, extra args) and ``disks``
the guest devices of the ``system`` and ``data`` disks.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import pytest

from siterecovery.agent.embedded import EmbeddedAgent, EmbeddedFailover
from siterecovery.domain import DiskConfig
from siterecovery.hypervisor.guest import GuestImage, build_guest, guest_cmdline, make_disk
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec, live_processes
from siterecovery.recovery.replica import RecoveryHost
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import service
from siterecovery.vault.db import Database, open_database
from siterecovery.vault.models import SiteRole

MiB = 1 << 20


@dataclass
class Site:
    """The vault, the store and the services of one test, and the primary VMs it started."""

    root: Path
    db: Database
    store: ReplicaStore
    key_file: Path
    guest: GuestImage
    protection: EmbeddedAgent
    failover: EmbeddedFailover
    primaries: dict[str, QemuProcess]


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest(Path(platformdirs.user_cache_dir("siterecovery")) / "guest")


@pytest.fixture
def site(tmp_path: Path, guest_image: GuestImage) -> Iterator[Site]:
    root = tmp_path
    for sub in ("run", "recovery", "primary"):
        (root / sub).mkdir()
    db = open_database(f"sqlite:///{root / 'vault.db'}")
    keys = StoreKeys.generate()
    keys.save(root / "store.key")
    store = ReplicaStore.init(f"file://{root / 'store'}", keys)
    service.ensure_site(db, name="primary", role=SiteRole.PRIMARY)
    service.ensure_host(db, name="kvm1", site="primary")
    service.create_policy(db, name="p30", copy_frequency_s=30, retention_h=24)
    failover = EmbeddedFailover(
        db, store, root / "recovery", key_file=root / "store.key", run_dir=root / "run",
        host=RecoveryHost(memory_mib=4096, max_parallel=2),
    )  # fmt: skip
    s = Site(root, db, store, root / "store.key", guest_image,
             EmbeddedAgent(db, store, root / "run"), failover, {})  # fmt: skip
    yield s
    for proc in live_processes():
        proc.stop()
    for record_dir in (root / "recovery").glob("*/*"):
        from siterecovery.recovery.replica import ReplicaRecord, stop_replica

        record = ReplicaRecord.load(record_dir)
        if record is not None:
            stop_replica(record, None)
    db.close()


@pytest.fixture
def protected_vm(site: Site) -> Callable[..., QemuProcess]:
    def make(
        name: str,
        *,
        append: str | None = None,
        data_size: int = 32 * MiB,
        paused: bool = False,
        nics: list[dict[str, Any]] | None = None,
        boot_marker: bool = True,
        fill_mib: int = 0,
        machine: dict[str, Any] | None = None,
        disks: dict[str, DiskConfig] | None = None,
        config: dict[str, Any] | None = None,
    ) -> QemuProcess:
        workdir = site.root / "primary" / name
        workdir.mkdir()
        system, data = workdir / "system.qcow2", workdir / "data.qcow2"
        make_disk(system, 16 * MiB)
        make_disk(data, data_size)
        if fill_mib:  # distinct 1 MiB blocks of data, so a full restore has work to do
            cmds = [a for i in range(fill_mib) for a in ("-c", f"write -P {i % 251} {i}M 1M")]
            subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(data)], check=True,
                           capture_output=True)  # fmt: skip
        spec = VmProcessSpec(
            name=name, workdir=workdir,
            drives=[DriveSpec(n, path, disk=(disks or {}).get(n))
                    for n, path in (("system", system), ("data", data))],
            kernel=site.guest.kernel, initrd=site.guest.initrd,
            append=append or guest_cmdline("idle"), accel="tcg",
            **{**(machine or {}),
               "extra_args": [*(machine or {}).get("extra_args", []), *(["-S"] if paused else [])]},
        )  # fmt: skip
        vm = QemuProcess.start(spec)
        site.primaries[name] = vm
        if not paused and boot_marker:
            vm.wait_serial(r"^SR-BOOTED", 120)
        given = dict(config or {})
        if nics is not None:
            given["nics"] = nics
        site.protection.register_vm(host="kvm1", name=name, qmp_path=vm.qmp_path, config=given)
        site.protection.enable_protection(name, "p30")
        return vm

    return make
