"""The DR loop as an operator runs it, once per door: embedded, and as services.

The same scenario runs against two doors (DESIGN §2, "one core, two doors"):

- ``embedded``: the work directory's vault opened in this process; the operator's verbs run
  the agent's code in-process (:mod:`siterecovery.agent.embedded`) and scheduled cycles come
  from ``siterecovery run``'s loop (:class:`siterecovery.agent.loop.Runner`) in a thread;
- ``service``: ``vault serve`` over TLS, a primary host's agent and a recovery host's agent
  as separate processes with their own work directories, driven through the operators' API.

Two real guests write acknowledged records (the demo writer: each record is announced on the
console only once it is on the virtual disk) and are protected with a 30 s copy frequency:

- **vm-a**: a drill with a console check while scheduled cycles keep producing points, its
  cleanup, a planned failover (zero loss: every acknowledged record is in the replica), commit;
- **vm-b**: the primary is killed, an unplanned failover to an older point, change point to
  the newest, commit: every record the replica holds is one the guest acknowledged, byte for
  byte, and the newer point holds more.

Every replica's QEMU runs the source's machine type, memory and CPU count, and its NIC keeps
its MAC. Failback runs only embedded today (its agent handler is the next step of the work).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from agent.test_failover_agent import Sites, key_file, start_agent
from api.vaultproc import VaultProcess, init_vault

from siterecovery.agent.embedded import EmbeddedAgent, EmbeddedFailover
from siterecovery.agent.loop import Runner
from siterecovery.agent.runner import register
from siterecovery.domain import FailoverKind
from siterecovery.hypervisor.guest import (
    GuestImage,
    build_guest,
    guest_cmdline,
    make_disk,
    parse_console,
)
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec
from siterecovery.recovery import instant
from siterecovery.recovery.failover import FailoverOptions
from siterecovery.recovery.replica import Probe, RecoveryHost, ReplicaRecord, stop_replica
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import networks, points, service
from siterecovery.vault.db import Database, open_database
from siterecovery.vault.errors import Conflict
from siterecovery.vault.models import SiteRole

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
MiB = 1 << 20
MAC = "52:54:00:5a:00:01"
SEEDS = {"vm-a": 11, "vm-b": 12}


class Door(Protocol):
    """What the scenario asks of the system; both doors answer the same way."""

    def protect(self, vm: str) -> None: ...
    def state(self, vm: str) -> str: ...
    def points(self, vm: str) -> list[str]: ...
    def failover(self, vm: str, kind: FailoverKind, point: str | None,
                 options: FailoverOptions) -> dict[str, Any]: ...  # fmt: skip
    def follow_up(self, vm: str, operation: str, point: str | None = None
                  ) -> dict[str, Any]: ...  # fmt: skip
    def replica(self, vm: str, *, test: bool = False) -> ReplicaRecord: ...


# ---- the embedded door ---------------------------------------------------------------------


@dataclass
class EmbeddedDoor:
    db: Database
    agent: EmbeddedAgent
    failovers: EmbeddedFailover
    loop: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def protect(self, vm: str) -> None:
        job, _ = _retry_busy(lambda: self.agent.enable_protection(vm, "p30"))
        assert job.state == "succeeded", job

    def run_scheduled_cycles(self) -> None:
        """``siterecovery run`` in a thread: cycles on the policy's schedule."""
        runner = Runner(self.agent)
        self.loop = threading.Thread(
            target=runner.run_forever, args=(self.stop,), kwargs={"tick_s": 1.0}, daemon=True
        )
        self.loop.start()

    def state(self, vm: str) -> str:
        return str(service.get_protection(self.db, vm=vm).state)

    def points(self, vm: str) -> list[str]:
        return [p.point_id for p in points.list_points(self.db, vm=vm)]

    def failover(self, vm: str, kind: FailoverKind, point: str | None,
                 options: FailoverOptions) -> dict[str, Any]:  # fmt: skip
        opts = FailoverOptions(point=point or "latest", append=options.append,
                               probe=options.probe, hydrate=options.hydrate)  # fmt: skip
        outcome = _retry_busy(lambda: self.failovers.failover(vm, kind, opts))
        return _job_doc(outcome.job)

    def follow_up(self, vm: str, operation: str, point: str | None = None) -> dict[str, Any]:
        if operation == "cleanup":
            return _job_doc(_retry_busy(lambda: self.failovers.cleanup(vm)))
        if operation == "commit":
            return _job_doc(_retry_busy(lambda: self.failovers.commit(vm)))
        assert point is not None
        return _job_doc(_retry_busy(lambda: self.failovers.change_point(vm, point)).job)

    def replica(self, vm: str, *, test: bool = False) -> ReplicaRecord:
        record = self.failovers.replica(vm, test=test)
        assert record is not None
        return record


def _retry_busy(call: Callable[[], Any], timeout: float = 120) -> Any:
    """Run ``call``, again while a scheduled cycle holds the VM (the operator would retry)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except Conflict:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _job_doc(record: Any) -> dict[str, Any]:
    from siterecovery.cli.output import to_jsonable

    doc: dict[str, Any] = to_jsonable(record)
    return doc


# ---- the service door ----------------------------------------------------------------------


@dataclass
class ServiceDoor(Sites):
    """The operators' API of a real vault, with the sites' agents as processes."""

    def wait_job(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        return super().wait_job(job_id, timeout)

    def protect(self, vm: str) -> None:
        job = self.wait_job(self.api("POST", f"/v1/vms/{vm}/protect", {"policy": "p30"})["id"])
        assert job["state"] == "succeeded", job

    def state(self, vm: str) -> str:
        return str(self.api("GET", f"/v1/vms/{vm}")["state"])

    def points(self, vm: str) -> list[str]:
        return [p["point_id"] for p in self.api("GET", f"/v1/vms/{vm}/points")]

    def failover(self, vm: str, kind: FailoverKind, point: str | None,
                 options: FailoverOptions) -> dict[str, Any]:  # fmt: skip
        opts = options.details()
        opts.pop("hydrate", None)  # the agent hydrates committed replicas in the background
        body = {"kind": str(kind), "point": point, "options": opts}
        return self.wait_job(self.api("POST", f"/v1/vms/{vm}/failover", body)["id"])

    def follow_up(self, vm: str, operation: str, point: str | None = None) -> dict[str, Any]:
        body = {"point": point} if point else None
        return self.wait_job(self.api("POST", f"/v1/vms/{vm}/failover/{operation}", body)["id"])

    def replica(self, vm: str, *, test: bool = False) -> ReplicaRecord:
        slot = "test" if test else "failover"
        record = ReplicaRecord.load(self.dirs["dr1"] / "recovery" / vm / slot)
        assert record is not None
        return record


# ---- the guests and the fixtures -----------------------------------------------------------


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    import platformdirs

    return build_guest(Path(platformdirs.user_cache_dir("siterecovery")) / "guest")


def start_guest(vmdir: Path, guest: GuestImage, vm: str) -> QemuProcess:
    """The demo writer on two qcow2 disks and one NIC, with a fixed machine shape."""
    workdir = vmdir / vm
    workdir.mkdir(parents=True)
    system, data = workdir / "system.qcow2", workdir / "data.qcow2"
    make_disk(system, 16 * MiB)
    make_disk(data, 32 * MiB)
    spec = VmProcessSpec(
        name=vm, workdir=workdir, drives=[DriveSpec("system", system), DriveSpec("data", data)],
        kernel=guest.kernel, initrd=guest.initrd, memory_mib=320, cpus=1,
        append=guest_cmdline("writer", seed=SEEDS[vm], interval_ms=150), accel="tcg",
        extra_args=["-netdev", "user,id=prod", "-device",
                    f"virtio-net-pci,netdev=prod,mac={MAC}"],
    )  # fmt: skip
    process = QemuProcess.start(spec)
    process.wait_serial(r"^SR-WROTE 2 ", 120)
    return process


def map_networks(db: Database) -> None:
    networks.create_network(db, name="prod-dr", kind="user", subnet="10.10.0.0/24")
    networks.create_network(db, name="drill", kind="isolated", subnet="10.20.0.0/24")
    networks.map_network(db, source="prod", recovery="prod-dr", test="drill")


@dataclass
class World:
    door: Door
    primaries: dict[str, QemuProcess]
    recovery_dir: Path


@pytest.fixture(params=["embedded", "service"])
def world(request: pytest.FixtureRequest, tmp_path: Path, guest: GuestImage) -> Iterator[World]:
    vmdir = tmp_path / "vms"
    primaries = {vm: start_guest(vmdir, guest, vm) for vm in SEEDS}
    try:
        if request.param == "embedded":
            yield from _embedded(tmp_path, primaries)
        else:
            yield from _service(tmp_path, vmdir, primaries)
    finally:
        for vm in primaries.values():
            vm.stop()


def _embedded(root: Path, primaries: dict[str, QemuProcess]) -> Iterator[World]:
    db = open_database(f"sqlite:///{root / 'vault.db'}")
    keys = StoreKeys.generate()
    keys.save(root / "store.key")
    store = ReplicaStore.init(f"file://{root / 'store'}", keys)
    service.ensure_site(db, name="primary", role=SiteRole.PRIMARY)
    service.ensure_host(db, name="kvm1", site="primary")
    service.create_policy(db, name="p30", copy_frequency_s=30, retention_h=24)
    map_networks(db)
    agent = EmbeddedAgent(db, store, root / "run", recovery_dir=root / "recovery",
                          key_file=root / "store.key")  # fmt: skip
    for name, vm in primaries.items():
        agent.register_vm(host="kvm1", name=name, qmp_path=vm.qmp_path, config={})
    failovers = EmbeddedFailover(db, store, root / "recovery", key_file=root / "store.key",
                                 run_dir=root / "run",
                                 host=RecoveryHost(memory_mib=4096))  # fmt: skip
    door = EmbeddedDoor(db, agent, failovers)
    try:
        yield World(door, primaries, root / "recovery")
    finally:
        door.stop.set()
        if door.loop is not None:
            door.loop.join(timeout=120)
        _stop_replicas(root / "recovery")
        db.close()


def _service(root: Path, vmdir: Path, primaries: dict[str, QemuProcess]) -> Iterator[World]:
    vault = VaultProcess(init_vault(root / "vault")).start("--heartbeat-timeout", "60s")
    dirs = {"kvm1": root / "kvm1", "dr1": root / "dr1"}
    agents = []
    try:
        register(dirs["kvm1"], key_file(vault, root / "kvm1.key", "kvm1", "dc1", "primary"),
                 host="kvm1", qmp_globs=[str(vmdir / "*" / "*.qmp")],
                 store_key_file=vault.settings.key_file)  # fmt: skip
        register(dirs["dr1"], key_file(vault, root / "dr1.key", "dr1", "dr", "recovery"),
                 host="dr1", store_key_file=vault.settings.key_file)  # fmt: skip
        db = open_database(vault.settings.vault_url)
        try:
            map_networks(db)
        finally:
            db.close()
        door = ServiceDoor(vault, vault.token("admin", "admin"), dirs)
        door.api("POST", "/v1/policies", {"name": "p30", "copy_frequency_s": 30})
        agents = [start_agent(d) for d in dirs.values()]
        door.wait("the agent to report the VMs",
                  lambda: len(door.api("GET", "/v1/vms")) == len(primaries))  # fmt: skip
        yield World(door, primaries, dirs["dr1"] / "recovery")
    finally:
        for proc in agents:
            proc.terminate()
            proc.wait(timeout=60)
        _stop_replicas(dirs["dr1"] / "recovery")
        vault.stop()


def _stop_replicas(recovery_dir: Path) -> None:
    for slot in recovery_dir.glob("*/*"):
        record = ReplicaRecord.load(slot)
        if record is not None:
            stop_replica(record, None)


# ---- checks --------------------------------------------------------------------------------


def wait_until(what: str, probe: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def assert_same_machine(record: ReplicaRecord) -> None:
    """The replica's QEMU runs the source's shape: memory, CPU count and the NIC's MAC."""
    argv = cmdline(record.pid)
    assert argv[argv.index("-m") + 1] == "320", argv
    assert argv[argv.index("-smp") + 1].split(",")[0] == "1", argv
    assert any(f"mac={MAC}" in a for a in argv), argv


def replica_records(record: ReplicaRecord, timeout: float = 180) -> dict[int, str]:
    """The records the replica's guest reads back (verify mode), by index."""
    log = Path(record.serial)
    text = wait_until(f"{record.vm}'s replica to verify",
                      lambda: "SR-VERIFY-DONE" in (log.read_text(errors="replace")
                                                   if log.exists() else "")
                      and log.read_text(errors="replace"), timeout)  # fmt: skip
    console = parse_console(text)
    assert not console.errors, console.errors
    return console.have


def assert_only_acknowledged(have: dict[int, str], acked: dict[int, str]) -> None:
    """The replica holds a prefix of what the guest acknowledged, byte for byte: the records
    0..n of one instant, and at most the one write in flight when the primary was lost."""
    present = sorted(i for i in have if i in acked)
    assert present == list(range(len(present))), present
    assert all(have[i] == acked[i] for i in present), "a record differs"
    assert set(have) - set(acked) <= {max(acked) + 1}, sorted(set(have) - set(acked))


# ---- the scenario --------------------------------------------------------------------------


def test_the_dr_loop(world: World) -> None:
    door = world.door
    for vm in SEEDS:
        door.protect(vm)
        assert door.state(vm) == "protected"
    if isinstance(door, EmbeddedDoor):
        door.run_scheduled_cycles()
    # The replicas read back their records and keep running (commit needs a live replica).
    verify = {vm: guest_cmdline("verify", seed=seed, stay=1) for vm, seed in SEEDS.items()}

    # A drill with a console check; scheduled cycles keep producing points meanwhile.
    check = Probe("serial", pattern=r"^SR-BOOTED", timeout_s=120)
    drill = door.failover("vm-a", FailoverKind.TEST, "latest", FailoverOptions(probe=check))
    assert drill["state"] == "succeeded", drill
    evidence = next(t for t in drill["tasks"] if t["name"] == "run drill check")["details"]
    assert evidence["evidence"]["matched"] == "SR-BOOTED"
    assert door.state("vm-a") == "test failover running"
    assert_same_machine(door.replica("vm-a", test=True))
    before = len(door.points("vm-a"))
    wait_until("a scheduled cycle during the drill", lambda: len(door.points("vm-a")) > before,
               timeout=90)  # fmt: skip
    assert door.state("vm-a") == "test failover running"
    cleanup = door.follow_up("vm-a", "cleanup")
    assert cleanup["state"] == "succeeded" and door.state("vm-a") == "protected"
    assert not (world.recovery_dir / "vm-a" / "test").exists()

    # A planned failover: zero data loss.
    planned = door.failover("vm-a", FailoverKind.PLANNED, None,
                            FailoverOptions(append=verify["vm-a"]))  # fmt: skip
    assert planned["state"] == "succeeded", planned
    assert door.state("vm-a") == "failed over"
    acked = parse_console(world.primaries["vm-a"].serial_text()).wrote
    record = door.replica("vm-a")
    assert_same_machine(record)
    have = replica_records(record)
    assert set(acked) <= set(have) and all(have[i] == acked[i] for i in acked)
    assert door.follow_up("vm-a", "commit")["state"] == "succeeded"
    assert door.state("vm-a") == "committed"

    # The primary of vm-b is lost: unplanned failover to an older point, then the newest.
    wait_until("two points of vm-b", lambda: len(door.points("vm-b")) >= 2, timeout=90)
    world.primaries["vm-b"].kill()
    acked_b = parse_console(world.primaries["vm-b"].serial_text()).wrote
    older, newest = door.points("vm-b")[-2], door.points("vm-b")[-1]
    unplanned = door.failover("vm-b", FailoverKind.UNPLANNED, older,
                              FailoverOptions(append=verify["vm-b"], hydrate=False))
    assert unplanned["state"] == "succeeded", unplanned
    first = door.replica("vm-b")
    assert first.point_id == older and door.state("vm-b") == "failed over"
    assert_same_machine(first)
    have_older = replica_records(first)
    assert_only_acknowledged(have_older, acked_b)
    changed = door.follow_up("vm-b", "change-point", newest)
    assert changed["state"] == "succeeded", changed
    second = door.replica("vm-b")
    assert second.point_id == newest and not instant.pid_alive(first.pid)
    have_newest = replica_records(second)
    assert_only_acknowledged(have_newest, acked_b)
    assert len(have_newest) > len(have_older)
    assert door.follow_up("vm-b", "commit")["state"] == "succeeded"
    assert door.state("vm-b") == "committed"
