"""Rows of the recovery-side features: resync without tracking, and failover RTO.

**Resync** (``resync``): the template is A as qcow2, served by qemu-storage-daemon, initially
replicated into a ``file://`` store; then its change tracking is dropped
(``ChangeTracker.stop_tracking``) and the 1 % change is written through the daemon, so the
store and the disk diverge by exactly the change and *nothing tracked it* (a lost bitmap,
a crash). Each run copies the template (disk and store, untimed), serves it, and runs the
real ``Resyncer.run`` (checksums of every 64 KiB block against the store's, only differing
blocks sent). The anchor is ``rsync --inplace --no-whole-file`` from A' onto a copy of A,
the same pair of states. The first run's recovery point is restored and compared with A'
(sha256) before the figures count.

**Failover RTO** (``failover-rto``): see :mod:`bench.rto`. Four contenders — instant recovery
and full restore, each for a data disk of the base size (A) and of the large sparse size
(the sparse variant: the same data, the rest holes) — each a child process doing one
unplanned failover from *protected*. The table shows the RTO figures measured inside it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import platformdirs

from bench import contenders as anchors
from bench import rto
from bench.contenders import copy_tree, reset_dir, run_quiet, stored_figures, tree_size
from bench.daemon import ServedDisk, served, to_qcow2
from bench.harness import BenchError, Contender, Figures, run_row
from bench.rows import (
    OURS,
    Bench,
    _row,
    _run,
    _store_args,
    _worker,
    ensure_image,
    init_store,
    sha256_file,
    use_source,
)
from bench.workload import WorkloadSpec

RTO_WORKER = Path(__file__).resolve().parent / "rto.py"


class OursResync:
    """Resyncs of a disk that diverged from its replica by the change, without tracking."""

    def __init__(self, bench: Bench, spec: WorkloadSpec, raw: Path, root: Path) -> None:
        self.bench, self.root = bench, reset_dir(root)
        self.keys = root / "keys.json"
        self.template_store, self.template_qcow2 = root / "template-store", root / "template.qcow2"
        self.store, self.qcow2 = root / "store", root / "disk.qcow2"
        self.disk: ServedDisk | None = None
        self.checked = False
        to_qcow2(raw, self.template_qcow2)
        init_store(self.template_store, self.keys, bench.block_size)
        with served(self.template_qcow2, root / "qsd-template") as disk:
            run_quiet(self._argv("cycle", self.template_store, disk))
            run_quiet(self._argv("untrack", self.template_store, disk))
            disk.apply_change(spec, root / "change")  # not tracked: the bitmap is gone
        self.template_size = tree_size(self.template_store)[1]

    def _argv(self, command: str, store: Path, disk: ServedDisk) -> list[str]:
        return _worker(command, *_store_args(store, self.keys), "--qmp", str(disk.qmp),
                       "--run-dir", str(disk.workdir))  # fmt: skip

    def prepare(self) -> None:
        self.close()
        run_quiet(["cp", "--sparse=always", str(self.template_qcow2), str(self.qcow2)])
        copy_tree(self.template_store, self.store)
        self.disk = ServedDisk.start(self.qcow2, self.root / "qsd")

    def argv(self) -> list[str]:
        if self.disk is None:
            raise BenchError("the resync contender was not prepared")
        return self._argv("resync", self.store, self.disk)

    def collect(self, stdout: str) -> Figures:
        doc = json.loads(stdout)
        figures = {k: float(doc[k]) for k in ("bytes_read", "bytes_sent", "cycle_seconds")}
        figures.update(stored_figures(self.store))
        figures["bytes_shipped"] = max(0.0, figures["bytes_allocated"] - self.template_size)
        if not self.checked:
            self._check_restore()
        return figures

    def _check_restore(self) -> None:
        """The resynced point must restore to A' exactly (else the row fails)."""
        dest = self.root / "check.raw"
        run_quiet(_worker("restore", *_store_args(self.store, self.keys), "--dest", str(dest)))
        same = sha256_file(dest) == sha256_file(self.bench.source)
        dest.unlink()
        if not same:
            raise BenchError("the resynced recovery point differs from the changed image")
        self.checked = True

    def contender(self) -> Contender:
        return Contender(
            name=OURS,
            role="ours",
            argv=self.argv,
            prepare=self.prepare,
            collect=self.collect,
            note="Resyncer: 64 KiB block checksums against the store's, differing blocks sent",
        )

    def close(self) -> None:
        if self.disk is not None:
            self.disk.stop()
            self.disk = None


def _rsync_sent_as_sent(contender: Contender) -> Contender:
    """rsync's ``Total bytes sent`` also as ``bytes_sent`` (the resync row's column)."""
    collect = contender.collect

    def collect_sent(stdout: str) -> Figures:
        figures = collect(stdout)
        if "bytes_shipped" in figures:
            figures["bytes_sent"] = figures["bytes_shipped"]
        return figures

    contender.collect = collect_sent
    return contender


def resync_row(bench: Bench) -> dict[str, Any]:
    title = "Resync after the 1 % divergence without tracking (vs rsync delta)"
    use_source(bench, changed=True)
    ours = OursResync(bench, bench.spec, bench.image, bench.work / "ours-resync")
    try:
        results = _run(
            bench,
            title,
            [
                ours.contender(),
                _rsync_sent_as_sent(anchors.rsync_delta(bench.places, bench.image)),
            ],
        )
    finally:
        ours.close()
    return _row(
        "resync",
        title,
        results,
        columns=["io_read_bytes", "bytes_read", "bytes_sent", "bytes_shipped"],
        note="The change was written after tracking was dropped, so the resync must find it "
        "by comparing every block. disk read = bytes siterecovery read over NBD (holes "
        "skipped); sent = plain bytes of the differing blocks (ours), rsync's Total bytes "
        "sent (rsync); shipped = growth of the store (compressed) or rsync's bytes sent. The "
        "first resynced point was restored and matched A' (sha256).",
    )


# -- failover RTO ----------------------------------------------------------------------------


def _rto_contender(root: Path, vm: str, mode: str, label: str, role: str) -> Contender:
    def collect(stdout: str) -> Figures:
        doc = json.loads(stdout)
        return {k: float(doc[k]) for k in ("running_s", "first_output_s", "booted_s")}

    def argv() -> list[str]:
        return [sys.executable, "-P", str(RTO_WORKER), "failover", "--root", str(root),
                "--vm", vm, "--mode", mode]  # fmt: skip

    return Contender(
        name=label,
        role=role,
        argv=argv,
        prepare=lambda: rto.reset(root),
        collect=collect,
        note=f"EmbeddedFailover.unplanned, {mode}",
    )


def failover_row(bench: Bench) -> dict[str, Any]:
    small, large = bench.spec, bench.large
    title = (
        f"Failover RTO (instant recovery and full restore), {_size(small.size)} and "
        f"{_size(large.size)} data disks"
    )
    root = bench.work / "rto"
    images = {"small": (small, bench.image), "large": (large, bench.work / "large.raw")}
    disks: dict[str, Path] = {}
    for name, (spec, raw) in images.items():
        ensure_image(raw, spec, bench.log)
        disks[f"vm-{name}"] = bench.work / f"rto-{name}.qcow2"
        to_qcow2(raw, disks[f"vm-{name}"])
    bench.log("== failover RTO: protecting the primaries (untimed)")
    rto.build_site(root, Path(platformdirs.user_cache_dir("siterecovery")) / "guest", disks)
    for path in disks.values():
        path.unlink()
    contenders: list[Contender] = []
    for mode in ("instant", "full"):
        for name, (spec, _) in images.items():
            role = "ours" if not contenders else "anchor"  # instant at the base size leads
            label = f"{mode} @ {_size(spec.size)}"
            contenders.append(_rto_contender(root, f"vm-{name}", mode, label, role))
    runs, warmup = min(bench.runs, 3), min(bench.warmup, 1)
    bench.log(f"== {title}")
    try:
        results = run_row(contenders, runs=runs, warmup=warmup, log=bench.log)
    finally:
        shutil.rmtree(root / "recovery", ignore_errors=True)
    return _row(
        "failover-rto",
        title,
        results,
        columns=["running_s", "first_output_s", "booted_s"],
        ratio_of="first_output_s",
        ratio_title=f"first output: instant @ {_size(small.size)} / this",
        process_time=False,
        note="The demo guest (host kernel + busybox initramfs, 256 MiB, TCG: no KVM here) "
        "with a 16 MiB system disk and the reference image as data disk (the large one is "
        "the sparse variant: same data, the rest holes), protected into a file:// store, "
        "primary killed, then EmbeddedFailover.unplanned. running = command → the replica's "
        "QEMU runs (full restore: after every disk was restored and verified); first output "
        "= command → the guest's first serial output; booted = command → SR-BOOTED. Instant "
        f"recovery does not hydrate. {runs} timed runs per contender.",
    )


def _size(size: int) -> str:
    return f"{size >> 30} GiB" if size % (1 << 30) == 0 else f"{size >> 20} MiB"
