"""``siterecovery demo``: the whole DR loop on a tiny real guest, verified.

What it does, on the embedded default (SQLite vault + encrypted ``file://`` replica store,
under one work directory):

1. builds the demo guest (the host's kernel + a busybox initramfs) and starts the **primary
   VM** under QEMU with two qcow2 disks; the guest writes numbered 64 KiB records to its data
   disk and announces each one on the serial console once it is durable;
2. registers the VM in the vault, creates a policy and runs the *enable protection* job
   (check prerequisites, create replication relationship, start initial replication,
   finalize protection);
3. runs delta cycles while the guest keeps writing, noting before and after each cycle how
   many records the guest had acknowledged;
4. lists the recovery points, then **loses the primary site** (SIGKILL of the VM);
5. runs an **unplanned failover** to the latest point: materializes the disks on the
   recovery side and boots the replica VM, which reads its data disk and reports every
   record it finds;
6. **verifies**: every recovery point is restored on the host and must hold exactly the
   records the guest had acknowledged before that cycle (and nothing beyond what it wrote),
   byte for byte; the replica guest must report the same records as the latest point;
7. commits the failover, stops everything it started and prints a summary.

Crash consistency allows at most one record to be torn at a point's instant (the write in
flight); the checks accept exactly that and nothing more.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import platformdirs
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from siterecovery.agent.embedded import EmbeddedAgent, EmbeddedFailover
from siterecovery.domain import ReplicationState
from siterecovery.fsutil import CHILD_UMASK, open_private, private_dir
from siterecovery.hypervisor.guest import (
    RECORD_SIZE,
    build_guest,
    expected_record,
    guest_cmdline,
    make_disk,
    parse_console,
)
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec, probe_accel
from siterecovery.replication.engine import CycleResult
from siterecovery.settings import Settings
from siterecovery.store.manifest import PointManifest
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import points, service
from siterecovery.vault.db import Database, open_database
from siterecovery.vault.models import SiteRole
from siterecovery.vault.records import JobRecord
from siterecovery.workdir import init_workdir

VM = "demo-vm"
POLICY = "demo-30s"
SYSTEM_DISK_SIZE = 64 << 20
DATA_DISK_SIZE = 128 << 20
BOOT_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class DemoOptions:
    """Flags of ``siterecovery demo``."""

    workdir: Path
    keep: bool = False
    cycles: int = 4
    interval_s: float = 4.0
    accel: str | None = None
    seed: int = 0


@dataclass
class CycleNote:
    """One delta cycle as the demo saw it."""

    point_id: str
    duration_s: float
    bytes_read: int
    bytes_shipped: int
    acked_before: int
    acked_after: int


@dataclass
class DemoSummary:
    """The demo's result; ``--json`` prints exactly this."""

    verified: bool
    initial_replication_s: float
    cycle_s: float
    cycle_bytes_shipped: float
    rpo_s: float
    rto_s: float
    rto_first_output_s: float
    recovery_points: int
    points_verified: int
    records_acknowledged: int
    records_recovered: int
    failover_point: str
    interval_s: float
    accel: str
    workdir: str
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Demo:
    """One run of the demo; :meth:`run` returns the summary (never raises on a bad check)."""

    def __init__(self, options: DemoOptions, console: Console) -> None:
        self.opts = options
        self.console = console
        self.settings = Settings.embedded(options.workdir)
        self.seed = options.seed or secrets.randbelow(1 << 30) + 1
        self.stack = ExitStack()
        self.problems: list[str] = []
        self.cycles: list[CycleNote] = []
        self._acked: dict[str, tuple[int, int]] = {}

    # -- the walkthrough -------------------------------------------------------------------

    def run(self) -> DemoSummary:
        """Run every step; always stop what was started; remove the workdir unless kept."""
        with self.stack:
            summary = self._run()
        if not self.opts.keep:
            shutil.rmtree(self.settings.workdir, ignore_errors=True)
        return summary

    def _run(self) -> DemoSummary:
        accel = self.opts.accel or probe_accel()
        self._prepare_workdir()
        store = self._init_store()
        db = open_database(self.settings.vault_url)
        self.stack.callback(db.close)
        primary = self._start_primary(accel)
        protection = EmbeddedAgent(
            db, store, self.settings.run_dir, on_job=self._show_job_change, progress=None
        )
        self._register(db, protection, primary)
        before = len(parse_console(primary.serial_text()).wrote)
        initial = self._enable_protection(protection)
        after = len(parse_console(primary.serial_text()).wrote)
        self._acked = {initial.point.point_id: (before, after)}
        self._replicate(protection, primary)
        self._show_points(db)
        lost_at = self._lose_primary(primary)
        latest = points.latest_point(db, vm=VM)
        assert latest is not None
        rpo = (lost_at - latest.created_at).total_seconds()
        outcome, first_output_s, replica_log = self._failover(db, store, accel)
        points_ok = self._verify_points(store)
        acked = len(parse_console(primary.serial_text()).wrote)
        recovered = self._verify_replica(outcome.point, store, replica_log)
        verified = not self.problems
        if verified:
            service.transition(db, vm=VM, to_state=ReplicationState.COMMITTED,
                               reason="failover verified and committed by the demo")  # fmt: skip
        deltas = self.cycles or [CycleNote("", 0.0, 0, 0, 0, 0)]
        summary = DemoSummary(
            verified=verified,
            initial_replication_s=round(initial.duration_s, 3),
            cycle_s=round(sum(c.duration_s for c in deltas) / len(deltas), 3),
            cycle_bytes_shipped=round(sum(c.bytes_shipped for c in deltas) / len(deltas)),
            rpo_s=round(rpo, 3),
            rto_s=round(outcome.seconds_to_start, 3),
            rto_first_output_s=round(first_output_s, 3),
            recovery_points=len(store.list_points(VM)),
            points_verified=points_ok,
            records_acknowledged=acked,
            records_recovered=recovered,
            failover_point=outcome.point.point_id,
            interval_s=self.opts.interval_s,
            accel=accel,
            workdir=str(self.settings.workdir),
            problems=list(self.problems),
        )
        self._show_summary(summary)
        return summary

    # -- steps -----------------------------------------------------------------------------

    def _prepare_workdir(self) -> None:
        workdir = self.settings.workdir
        if workdir.exists() and any(workdir.iterdir()):
            shutil.rmtree(workdir)
        for path in (workdir, self.settings.run_dir, self.settings.recovery_dir):
            private_dir(path)
        self.console.rule("[bold]siterecovery demo")
        self.console.print(f"work directory: {workdir}   guest seed: {self.seed}")

    def _init_store(self) -> ReplicaStore:
        store = init_workdir(self.settings, pki=False)  # encrypted, as `vault init` makes it
        self.console.print(
            f"replica store: {store.url}, encrypted (key file {self.settings.key_file})"
        )
        return store

    def _start_primary(self, accel: str) -> QemuProcess:
        self.console.rule("primary site")
        cache = Path(platformdirs.user_cache_dir("siterecovery")) / "guest"
        with self.console.status("building the demo guest (host kernel + busybox initramfs)"):
            guest = build_guest(cache)
        primary_dir = private_dir(self.settings.workdir / "primary")
        system, data = primary_dir / "system.qcow2", primary_dir / "data.qcow2"
        _seed_system_disk(system, self.seed)
        make_disk(data, DATA_DISK_SIZE)
        spec = VmProcessSpec(
            name=VM, workdir=primary_dir,
            drives=[DriveSpec("system", system), DriveSpec("data", data)],
            kernel=guest.kernel, initrd=guest.initrd,
            append=guest_cmdline("writer", seed=self.seed, interval_ms=150), accel=accel,
        )  # fmt: skip
        started = time.monotonic()
        with self.console.status(f"booting the primary VM {VM} under {accel.upper()}"):
            vm = QemuProcess.start(spec)
            self.stack.callback(vm.stop)
            vm.wait_serial(r"^SR-BOOTED", BOOT_TIMEOUT_S)
        self.console.print(
            f"primary VM [bold]{VM}[/] booted in {time.monotonic() - started:.1f} s; "
            "its guest writes a 64 KiB record every 150 ms to its data disk"
        )
        self._vm_boot = {"kernel": str(guest.kernel), "initrd": str(guest.initrd)}
        return vm

    def _register(self, db: Database, protection: EmbeddedAgent, vm: QemuProcess) -> None:
        service.ensure_site(db, name="primary-site", role=SiteRole.PRIMARY)
        service.ensure_site(db, name="recovery-site", role=SiteRole.RECOVERY)
        service.ensure_host(db, name="primary-host", site="primary-site")
        config = {
            "cpus": vm.spec.cpus, "memory_mib": vm.spec.memory_mib,
            "boot": {**self._vm_boot, "append": vm.spec.append},
            "disks": [{"name": d.name, "fmt": d.fmt} for d in vm.spec.drives],
        }  # fmt: skip
        protection.register_vm(host="primary-host", name=VM, qmp_path=vm.qmp_path, config=config)
        service.create_policy(db, name=POLICY, copy_frequency_s=30, retention_h=24)
        self.console.print(
            f"policy [bold]{POLICY}[/]: copy frequency 30 s, retention 24 h "
            f"(the demo runs its cycles every {self.opts.interval_s:g} s to finish quickly)"
        )

    def _enable_protection(self, protection: EmbeddedAgent) -> CycleResult:
        self.console.rule("enable protection")
        with self._progress("initial replication") as callback:
            protection.progress = callback
            job, initial = protection.enable_protection(VM, POLICY)
        protection.progress = None
        self._show_job(job)
        self.console.print(
            f"initial replication: {_mib(initial.bytes_read)} read, "
            f"{_mib(initial.bytes_shipped)} stored, in {initial.duration_s:.2f} s"
        )
        return initial

    def _replicate(self, protection: EmbeddedAgent, vm: QemuProcess) -> None:
        self.console.rule("delta replication")
        table = Table("cycle", "point", "time", "read", "shipped", "records acked")
        for n in range(1, self.opts.cycles + 1):
            time.sleep(self.opts.interval_s)
            before = len(parse_console(vm.serial_text()).wrote)
            result = protection.replicate(VM)
            after = len(parse_console(vm.serial_text()).wrote)
            note = CycleNote(result.point.point_id, result.duration_s, result.bytes_read,
                             result.bytes_shipped, before, after)  # fmt: skip
            self.cycles.append(note)
            table.add_row(str(n), note.point_id, f"{note.duration_s:.2f} s",
                          _mib(note.bytes_read), _mib(note.bytes_shipped), str(before))  # fmt: skip
            self.console.print(
                f"cycle {n}: point {note.point_id}, {_mib(note.bytes_read)} read, "
                f"{_mib(note.bytes_shipped)} shipped in {note.duration_s:.2f} s"
            )
        self._acked.update({c.point_id: (c.acked_before, c.acked_after) for c in self.cycles})

    def _show_points(self, db: Database) -> None:
        table = Table("recovery point", "created (UTC)", "consistency", "shipped")
        for p in points.list_points(db, vm=VM):
            table.add_row(p.point_id, p.created_at.strftime("%H:%M:%S.%f")[:-3],
                          str(p.consistency), _mib(p.bytes_shipped))  # fmt: skip
        self.console.print(table)

    def _lose_primary(self, vm: QemuProcess) -> datetime:
        self.console.rule("disaster")
        time.sleep(min(self.opts.interval_s, 2.0))
        vm.kill()
        lost_at = datetime.now(UTC)
        self.console.print("[red]the primary site is lost[/]: VM killed with SIGKILL")
        return lost_at

    def _failover(
        self, db: Database, store: ReplicaStore, accel: str
    ) -> tuple[Any, float, Callable[[], str]]:
        self.console.rule("unplanned failover to the latest recovery point")
        failover = EmbeddedFailover(
            db, store, self.settings.recovery_dir, accel=accel, on_job=self._show_job_change
        )
        started = time.monotonic()
        with self._progress("materialize") as callback:
            failover.progress = callback
            outcome = failover.unplanned(VM, append=guest_cmdline("verify", seed=self.seed))
        self.stack.callback(outcome.process.stop)
        outcome.process.wait_serial(r"^SR-BOOTED", BOOT_TIMEOUT_S)
        first_output = time.monotonic() - started
        self._show_job(outcome.job)
        self.console.print(
            f"replica VM running {outcome.seconds_to_start:.2f} s after the failover command; "
            f"first guest output after {first_output:.2f} s"
        )
        outcome.process.wait_serial(r"^SR-VERIFY-DONE", BOOT_TIMEOUT_S)
        return outcome, first_output, outcome.process.serial_text

    def _verify_points(self, store: ReplicaStore) -> int:
        """Restore every point's data disk on the host and check it record by record."""
        self.console.rule("verification")
        checked = 0
        scratch = private_dir(self.settings.workdir / "verify")
        for point in store.list_points(VM):
            bounds = self._acked.get(point.point_id, (0, 0))
            found = _records_in_point(store, point, scratch / f"{point.point_id}.raw", self.seed)
            low, high = bounds
            if found.problem:
                self.problems.append(f"point {point.point_id}: {found.problem}")
            elif not low <= found.complete <= high + 1:
                self.problems.append(
                    f"point {point.point_id} holds {found.complete} records; the guest had "
                    f"acknowledged {low} before the cycle and {high} after it"
                )
            else:
                checked += 1
            self.console.print(
                f"point {point.point_id}: {found.complete} complete records "
                f"(acknowledged before the cycle: {low}, after: {high}) "
                + ("[green]ok[/]" if not found.problem else f"[red]{found.problem}[/]")
            )
        return checked

    def _verify_replica(
        self, point: PointManifest, store: ReplicaStore, serial: Callable[[], str]
    ) -> int:
        """The replica guest must report exactly the complete records of the point."""
        log = parse_console(serial())
        expected = {i: hashlib.sha256(expected_record(self.seed, i)).hexdigest()
                    for i in range(len(log.have))}  # fmt: skip
        scratch = self.settings.workdir / "verify" / "failover-point.raw"
        found = _records_in_point(store, point, scratch, self.seed)
        good = [i for i, digest in log.have.items() if expected.get(i) == digest]
        if len(good) != found.complete or log.verify_done is None:
            self.problems.append(
                f"the replica guest found {len(good)} intact records "
                f"(verify done: {log.verify_done}); the recovery point holds {found.complete}"
            )
        self.console.print(
            f"replica guest read back {len(good)} records, all byte-exact: "
            + ("[green]verified[/]" if not self.problems else "[red]NOT verified[/]")
        )
        return len(good)

    # -- output ----------------------------------------------------------------------------

    @contextmanager
    def _progress(self, what: str) -> Iterator[Callable[[str, int, int], None]]:
        """A progress bar per disk; the callback may be called from worker threads."""
        bars = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), console=self.console, transient=False,
        )  # fmt: skip
        tasks: dict[str, Any] = {}

        def callback(disk: str, done: int, total: int) -> None:
            if disk not in tasks:
                tasks[disk] = bars.add_task(f"{what} {disk}", total=total)
            bars.update(tasks[disk], completed=done, total=total)

        with bars:
            yield callback

    def _show_job_change(self, job: JobRecord) -> None:
        running = [t for t in job.tasks if str(t.state) == "running"]
        if running and running[0].progress == 0:
            self.console.print(f"  [dim]{job.kind}[/] > {running[0].name} ...")

    def _show_job(self, job: JobRecord) -> None:
        table = Table(title=f"job {job.kind} [{job.state}]", title_justify="left")
        for column in ("task", "state", "duration"):
            table.add_column(column)
        for task in job.tasks:
            took = ""
            if task.started_at and task.ended_at:
                took = f"{(task.ended_at - task.started_at).total_seconds():.2f} s"
            table.add_row(task.name, str(task.state), took)
        self.console.print(table)

    def _show_summary(self, s: DemoSummary) -> None:
        self.console.rule("summary")
        table = Table(show_header=False)
        rows = [
            ("initial replication", f"{s.initial_replication_s:.2f} s"),
            ("average delta cycle", f"{s.cycle_s:.2f} s, {_mib(int(s.cycle_bytes_shipped))}"),
            ("recovery points", str(s.recovery_points)),
            ("achieved RPO", f"{s.rpo_s:.2f} s (cycles every {s.interval_s:g} s)"),
            ("RTO: replica VM running", f"{s.rto_s:.2f} s"),
            ("RTO: first guest output", f"{s.rto_first_output_s:.2f} s ({s.accel.upper()})"),
            ("records acknowledged / recovered", f"{s.records_acknowledged} / "
                                                  f"{s.records_recovered}"),
            ("verified", "[green]yes[/]" if s.verified else "[red]NO[/]"),
        ]  # fmt: skip
        for name, value in rows:
            table.add_row(name, value)
        self.console.print(table)
        for problem in s.problems:
            self.console.print(f"[red]problem:[/] {problem}")


@dataclass(frozen=True)
class FoundRecords:
    """Records found on a restored data disk: complete ones, and what is wrong if anything."""

    complete: int
    problem: str = ""


def _records_in_point(
    store: ReplicaStore, point: PointManifest, dest: Path, seed: int
) -> FoundRecords:
    """Restore the data disk of ``point`` and count its complete records.

    Records 0..n-1 must be exactly :func:`expected_record`; slot n may be torn (each byte
    either zero or the expected byte: a write in flight at the instant); every later slot
    must be zero.
    """
    store.restore_disk(point, "data", dest)
    try:
        with dest.open("rb") as disk:
            return _scan_records(iter(lambda: disk.read(RECORD_SIZE), b""), seed)
    finally:
        dest.unlink(missing_ok=True)


def _scan_records(slots: Iterator[bytes], seed: int) -> FoundRecords:
    complete, torn = 0, False
    for i, slot in enumerate(slots):
        if not torn and slot == expected_record(seed, i):
            complete += 1
            continue
        if not any(slot):
            torn = True  # past the last record: the rest must be zero
            continue
        if torn:
            return FoundRecords(complete, f"slot {i} holds data after the last record")
        expected = expected_record(seed, i)
        if any(b and b != e for b, e in zip(slot, expected, strict=False)):
            return FoundRecords(complete, f"slot {i} holds bytes the guest never wrote")
        torn = True
    return FoundRecords(complete)


def _seed_system_disk(path: Path, seed: int) -> None:
    """A system disk with 16 MiB of data, so the initial copy has something to move."""
    raw = path.with_suffix(".raw")
    rng = random.Random(seed)
    with os.fdopen(open_private(raw, exclusive=True), "wb") as f:
        f.write(rng.randbytes(8 << 20))
        f.write(b"siterecovery demo system disk\n" * ((8 << 20) // 30))
        f.truncate(SYSTEM_DISK_SIZE)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                   check=True, umask=CHILD_UMASK)  # fmt: skip
    raw.unlink()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def run_demo(options: DemoOptions, *, console: Console | None = None) -> DemoSummary:
    """Run the demo and return its summary."""
    return Demo(options, console or Console()).run()


def summary_json(summary: DemoSummary) -> str:
    return json.dumps(summary.to_json(), indent=2, sort_keys=True)


__all__ = ["DemoOptions", "DemoSummary", "run_demo", "summary_json"]
