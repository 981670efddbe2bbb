"""The benchmark rows on ``file://``: which contenders run, from which state, what each records.

Every row returns a JSON-ready dict (schema in bench/README.md). A row that cannot run (the
restore row without the delta row's point) returns ``status: "not available yet: <why>"`` and
no numbers. Object-store rows are in :mod:`bench.rows_remote`, resync and failover RTO in
:mod:`bench.rows_recovery`; they build on the helpers here.

State flow (all under the work directory, prepared untimed):

- ``image.raw`` is the reference image A; ``src/disk.raw`` is the anchors' source, A or A' as
  each row asks (:func:`use_source`); ``base.qcow2`` is A as qcow2 for ours;
- the delta row builds templates once — ours: a qcow2 served by qemu-storage-daemon, initially
  replicated into a template store, then changed *through the daemon* (tracked) and stopped;
  restic/borg: a repository holding a backup of A — and copies them before every run;
- the restore row restores the newest point of the last delta run and checks its sha256
  against A' before timing anything.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import contenders as anchors
from bench.contenders import Places, copy_tree, reset_dir, run_quiet, stored_figures, tree_size
from bench.daemon import ServedDisk, to_qcow2
from bench.harness import BenchError, Contender, ContenderResult, Figures, Log, result_json, run_row
from bench.workload import WorkloadSpec, apply_change

OURS = "siterecovery"
#: run by path: it imports only siterecovery, so it works from any directory
WORKER = Path(__file__).resolve().parent / "ours.py"


@dataclass
class Bench:
    """One run's settings and places; rows read from it and never change the settings."""

    spec: WorkloadSpec
    large: WorkloadSpec
    work: Path
    runs: int
    warmup: int
    log: Log
    block_size: int = 1 << 20
    #: set by the delta row for the restore row: (store dir, keys file, qcow2 in state A')
    delta_state: tuple[Path, Path, Path] | None = None
    #: whether ``source`` holds A' (the change applied) rather than A; see :func:`use_source`
    source_changed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> Path:
        return self.work / "image.raw"

    @property
    def source(self) -> Path:
        return self.work / "src" / "disk.raw"

    @property
    def places(self) -> Places:
        return Places(self.source, self.work / "anchors")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- ours -----------------------------------------------------------------------------------


def _worker(*args: str) -> list[str]:
    # -P: do not put bench/ first on sys.path (its module names could shadow others)
    return [sys.executable, "-P", str(WORKER), *args]


def _store_args(store: Path, keys: Path) -> list[str]:
    return ["--store", f"file://{store}", "--keys", str(keys)]


def init_store(store: Path, keys: Path, block_size: int) -> None:
    reset_dir(store)
    run_quiet(_worker("init", *_store_args(store, keys), "--block-size", str(block_size)))


def _cycle_argv(store: Path, keys: Path, disk: ServedDisk, *, delta: bool) -> list[str]:
    argv = _worker(
        "cycle", *_store_args(store, keys), "--qmp", str(disk.qmp), "--run-dir", str(disk.workdir)
    )
    return [*argv, "--delta"] if delta else argv


def _worker_figures(stdout: str) -> Figures:
    doc = json.loads(stdout)
    return {k: float(v) for k, v in doc.items() if k in ("bytes_read", "extents", "cycle_seconds")}


class OursInitial:
    """Initial replication of the served ``base.qcow2`` into a fresh ``file://`` store."""

    def __init__(self, bench: Bench, qcow2: Path) -> None:
        root = bench.work / "ours-initial"
        self.store, self.keys, self.block_size = (
            root / "store",
            root / "keys.json",
            bench.block_size,
        )
        self.disk = ServedDisk.start(qcow2, root / "qsd")

    def contender(self) -> Contender:
        return Contender(
            name=OURS,
            role="ours",
            argv=lambda: _cycle_argv(self.store, self.keys, self.disk, delta=False),
            prepare=lambda: init_store(self.store, self.keys, self.block_size),
            collect=lambda out: {**_worker_figures(out), **stored_figures(self.store)},
            note="file:// store, unencrypted, zstd-3, 1 MiB blocks; disk served by "
            "qemu-storage-daemon (its memory is not counted)",
        )

    def close(self) -> None:
        self.disk.stop()


class OursDelta:
    """Delta cycles after the change, each from a copy of the same tracked state."""

    def __init__(self, bench: Bench, spec: WorkloadSpec, raw: Path, root: Path) -> None:
        self.root, self.spec = reset_dir(root), spec
        self.keys = root / "keys.json"
        self.template_store, self.template_qcow2 = root / "template-store", root / "template.qcow2"
        self.store, self.qcow2 = root / "store", root / "disk.qcow2"
        self.disk: ServedDisk | None = None
        to_qcow2(raw, self.template_qcow2)
        init_store(self.template_store, self.keys, bench.block_size)
        with_daemon = ServedDisk.start(self.template_qcow2, root / "qsd-template")
        try:
            run_quiet(_cycle_argv(self.template_store, self.keys, with_daemon, delta=False))
            with_daemon.apply_change(spec, root / "change")
        finally:
            with_daemon.stop()
        self.template_size = tree_size(self.template_store)[1]

    def prepare(self) -> None:
        self.close()
        run_quiet(["cp", "--sparse=always", str(self.template_qcow2), str(self.qcow2)])
        copy_tree(self.template_store, self.store)
        self.disk = ServedDisk.start(self.qcow2, self.root / "qsd")

    def argv(self) -> list[str]:
        if self.disk is None:
            raise BenchError("the delta contender was not prepared")
        return _cycle_argv(self.store, self.keys, self.disk, delta=True)

    def collect(self, stdout: str) -> Figures:
        figures = {**_worker_figures(stdout), **stored_figures(self.store)}
        figures["bytes_shipped"] = max(0.0, figures["bytes_allocated"] - self.template_size)
        return figures

    def contender(self, name: str = OURS, role: str = "ours") -> Contender:
        return Contender(
            name=name,
            role=role,
            argv=self.argv,
            prepare=self.prepare,
            collect=self.collect,
            note="delta cycle over the dirty bitmap (qcow2, persistent)",
        )

    def close(self) -> None:
        if self.disk is not None:
            self.disk.stop()
            self.disk = None


# -- rows -----------------------------------------------------------------------------------


def _row(
    row_id: str,
    title: str,
    results: Sequence[ContenderResult],
    *,
    data_bytes: int | None = None,
    note: str = "",
    ratio_title: str = "",
    columns: Sequence[str] = (),
    ratio_of: str | None = None,
    process_time: bool = True,
) -> dict[str, Any]:
    """A row's JSON record; ``ratio_of`` takes the ratio over that figure instead of the
    process time; ``process_time=False`` leaves time and MB/s out of the markdown table (the
    row's own figures say it better)."""
    ours = results[0]
    status = "ok" if ours.runs else f"failed: {ours.error}"
    return {
        "id": row_id,
        "title": title,
        "status": status,
        "note": note,
        "data_bytes": data_bytes,
        "ratio_title": ratio_title or "time ours/this",
        "columns": list(columns) or None,
        "process_time": process_time,
        "contenders": [result_json(r, ours, data_bytes, ratio_of) for r in results],
    }


def unavailable(row_id: str, title: str, why: str) -> dict[str, Any]:
    """A row whose feature does not exist yet: no numbers, only the reason."""
    return {
        "id": row_id,
        "title": title,
        "status": f"not available yet: {why}",
        "note": "",
        "data_bytes": None,
        "contenders": [],
    }


def per_change(contender: Contender, change_bytes: int) -> Contender:
    """``contender`` whose figures also hold ``shipped_per_change``: bytes shipped over the
    bytes the change wrote (1.0 = exactly the change)."""
    collect = contender.collect

    def with_ratio(stdout: str) -> Figures:
        figures = collect(stdout)
        if "bytes_shipped" in figures:
            figures["shipped_per_change"] = figures["bytes_shipped"] / change_bytes
        return figures

    contender.collect = with_ratio
    return contender


def _run(bench: Bench, title: str, contenders: list[Contender]) -> list[ContenderResult]:
    bench.log(f"== {title}")
    return run_row(contenders, runs=bench.runs, warmup=bench.warmup, log=bench.log)


def initial_row(bench: Bench) -> dict[str, Any]:
    title = "Initial replication into file:// (vs cp, qemu-img convert, rsync, restic, borg)"
    qcow2 = bench.work / "base.qcow2"
    to_qcow2(bench.image, qcow2)
    use_source(bench, changed=False)
    ours = OursInitial(bench, qcow2)
    places = bench.places
    try:
        results = _run(
            bench,
            title,
            [
                ours.contender(),
                anchors.cp_sparse(places),
                anchors.qemu_img_convert(places),
                anchors.rsync_full(places),
                anchors.restic_backup(places),
                anchors.borg_create(places),
            ],
        )
    finally:
        ours.close()
    return _row(
        "initial-file",
        title,
        results,
        data_bytes=bench.spec.size,
        columns=["bytes_stored", "bytes_allocated"],
        note="MB/s over the disk size; every contender reads its source from the page "
        "cache; stored = apparent size, allocated = blocks on disk.",
    )


def delta_row(bench: Bench) -> dict[str, Any]:
    title = "Delta cycle after the 1 % change (vs rsync delta, restic and borg incrementals)"
    places = bench.places
    templates = anchors.make_templates(places, bench.work / "templates")
    ours = OursDelta(bench, bench.spec, bench.image, bench.work / "ours-delta")
    use_source(bench, changed=True)  # the anchors' source becomes A'
    unchanged = bench.image
    try:
        contenders = [
            ours.contender(),
            anchors.rsync_delta(places, unchanged),
            anchors.restic_incremental(places, templates),
            anchors.borg_incremental(places, templates),
        ]
        results = _run(bench, title, [per_change(c, bench.spec.change_bytes) for c in contenders])
    finally:
        ours.close()
    bench.delta_state = (ours.store, ours.keys, ours.qcow2)
    return _row(
        "delta-file",
        title,
        results,
        note=(
            "read (rchar) = bytes through read syscalls of the contender's processes, program "
            "start-up included (Python reads its modules); disk read = bytes siterecovery read "
            "from the disk over NBD; shipped = rsync's bytes sent, or the growth of the "
            "store/repository's allocated size; shipped/change = shipped over the "
            f"{bench.spec.change_bytes >> 10} KiB changed (aim for ours: at most 1.1x)."
        ),
    )


def restore_row(bench: Bench) -> dict[str, Any]:
    title = "Restore of a recovery point to a raw image (vs qemu-img convert)"
    if bench.delta_state is None:
        return unavailable("restore", title, "the delta row did not leave a recovery point")
    store, keys, qcow2 = bench.delta_state
    use_source(bench, changed=True)
    dest = bench.work / "restore" / "disk.raw"
    reset_dir(dest.parent)
    restore_argv = _worker("restore", *_store_args(store, keys), "--dest", str(dest))
    run_quiet(restore_argv)
    if sha256_file(dest) != sha256_file(bench.source):
        raise BenchError("the restored image differs from the changed source image")
    ours = Contender(
        name=OURS,
        role="ours",
        argv=lambda: restore_argv,
        prepare=lambda: dest.unlink(missing_ok=True),
        collect=lambda _out: stored_figures(dest),
        note="newest point (base + 1 delta segment), verified sha256 = A'",
    )
    anchor = anchors.qemu_img_convert(
        bench.places,
        out_fmt="raw",
        source=qcow2,
        src_fmt="qcow2",
        name="qemu-img convert qcow2→raw",
    )
    return _row(
        "restore",
        title,
        _run(bench, title, [ours, anchor]),
        data_bytes=bench.spec.size,
        columns=["bytes_allocated"],
        note="MB/s over the disk size; the restored image's sha256 was checked.",
    )


def scaling_row(bench: Bench) -> dict[str, Any]:
    small, large = bench.spec, bench.large
    title = (
        f"Scaling: delta cycle at {large.size >> 20} MiB vs {small.size >> 20} MiB, same "
        f"{large.change_bytes >> 10} KiB change"
    )
    big_raw = bench.work / "large.raw"
    ensure_image(big_raw, large, bench.log)
    contenders_: list[OursDelta] = []
    try:
        contenders_.append(OursDelta(bench, large, big_raw, bench.work / "ours-scale-large"))
        contenders_.append(OursDelta(bench, small, bench.image, bench.work / "ours-scale-small"))
        results = _run(
            bench,
            title,
            [
                contenders_[0].contender(f"{OURS} @ {large.size >> 20} MiB", "ours"),
                contenders_[1].contender(f"{OURS} @ {small.size >> 20} MiB", "anchor"),
            ],
        )
    finally:
        for item in contenders_:
            item.close()
    return _row(
        "scaling",
        title,
        results,
        ratio_title="time large/small",
        columns=["bytes_read", "bytes_shipped"],
        note="the ratio should stay near 1: a cycle costs the change, not the disk.",
    )


def ensure_image(path: Path, spec: WorkloadSpec, log: Log) -> None:
    """Generate ``path`` unless it exists with the same spec (recorded beside it)."""
    from bench.workload import generate_image

    stamp = path.with_name(path.name + ".spec.json")
    wanted = json.dumps(spec.__dict__, sort_keys=True)
    if path.exists() and stamp.exists() and stamp.read_text() == wanted:
        return
    log(f"generating {path} ({spec.size >> 20} MiB, seed {spec.seed})")
    generate_image(path, spec)
    stamp.write_text(wanted)


def prepare_source(bench: Bench) -> None:
    """Make ``src/disk.raw`` a sparse copy of the reference image (state A)."""
    bench.source.parent.mkdir(parents=True, exist_ok=True)
    run_quiet(["cp", "--sparse=always", str(bench.image), str(bench.source)])
    bench.source_changed = False


def use_source(bench: Bench, *, changed: bool) -> None:
    """Make the anchors' source hold A' (``changed``) or A, whatever rows ran before."""
    if bench.source_changed == changed and bench.source.exists():
        return
    prepare_source(bench)
    if changed:
        apply_change(bench.source, bench.spec)
        bench.source_changed = True


def cleanup(bench: Bench) -> None:
    """Drop the bulky per-run state (stores, repositories, copies); keep generated images."""
    for name in (
        "anchors",
        "templates",
        "ours-initial",
        "ours-delta",
        "ours-scale-large",
        "ours-scale-small",
        "ours-s3",
        "ours-azure",
        "ours-resync",
        "rto",
        "restore",
        "src",
        "base.qcow2",
    ):
        target = bench.work / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


RowFn = Callable[[Bench], dict[str, Any]]
