"""Initial replication into object storage: SeaweedFS S3 (``s3://``) and Azurite (``azure://``).

Each row starts its server on 127.0.0.1 (:mod:`bench.servers`), serves ``base.qcow2`` (the
reference image A) with one qemu-storage-daemon, and runs, interleaved:

- siterecovery's initial cycle into a fresh prefix of the server's ``bench`` container (ours);
- the same cycle into a fresh ``file://`` store on local disk, the reference the object store
  is read against (its ratio: remote time / local time);
- for S3 only, ``restic backup`` into an S3 repository on the same server (restic 0.14 cannot
  be pointed at Azurite's endpoint, so the Azure row has no outside anchor).

``bytes_stored`` of a remote store is the sum of its object sizes as the server lists them;
each run's prefix is emptied after it is measured, so runs do not fill the server's disk.
Both servers run on the same machine, over loopback: the figures are the client's cost plus
the server's, not a network's.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from bench.contenders import RESTIC_ENV, reset_dir, run_quiet, stored_figures
from bench.daemon import ServedDisk, to_qcow2
from bench.harness import Contender, Figures
from bench.rows import OURS, Bench, _row, _run, _worker, _worker_figures, init_store
from bench.servers import KINDS, Remote, object_server

_serial = itertools.count(1)


def _usage(url: str, keys: Path, env: dict[str, str], *, wipe: bool) -> Figures:
    """The objects under store ``url`` (sum of sizes); emptied afterwards with ``wipe``."""
    argv = _worker("usage", "--store", url, "--keys", str(keys), *(["--wipe"] if wipe else []))
    doc = json.loads(run_quiet(argv, env))
    return {"bytes_stored": float(doc["bytes_stored"]), "objects": float(doc["objects"])}


class RemoteInitial:
    """Initial cycles of one served disk into a fresh prefix of ``remote`` per run."""

    def __init__(self, remote: Remote, disk: ServedDisk, root: Path, block_size: int) -> None:
        self.remote, self.disk, self.block_size = remote, disk, block_size
        self.keys = root / "keys.json"
        self.url = ""

    def prepare(self) -> None:
        self.url = self.remote.url(f"ours-{next(_serial)}")
        run_quiet(
            _worker("init", "--store", self.url, "--keys", str(self.keys),
                    "--block-size", str(self.block_size)),
            self.remote.env,
        )  # fmt: skip

    def argv(self) -> list[str]:
        return _worker(
            "cycle", "--store", self.url, "--keys", str(self.keys),
            "--qmp", str(self.disk.qmp), "--run-dir", str(self.disk.workdir),
        )  # fmt: skip

    def collect(self, stdout: str) -> Figures:
        return {**_worker_figures(stdout), **_usage(self.url, self.keys, self.remote.env,
                                                    wipe=True)}  # fmt: skip

    def contender(self) -> Contender:
        return Contender(
            name=f"{OURS} → {self.remote.kind}://",
            role="ours",
            argv=self.argv,
            prepare=self.prepare,
            collect=self.collect,
            env=self.remote.env,
            note=f"{KINDS[self.remote.kind][1]} on 127.0.0.1; unencrypted, zstd-3, 1 MiB blocks",
        )


def _local_reference(bench: Bench, disk: ServedDisk, root: Path) -> Contender:
    store, keys = root / "file-store", root / "keys.json"

    def argv() -> list[str]:
        return _worker(
            "cycle", "--store", f"file://{store}", "--keys", str(keys),
            "--qmp", str(disk.qmp), "--run-dir", str(disk.workdir),
        )  # fmt: skip

    return Contender(
        name=f"{OURS} → file:// (reference)",
        argv=argv,
        prepare=lambda: init_store(store, keys, bench.block_size),
        collect=lambda out: {**_worker_figures(out), **stored_figures(store)},
        note="the same cycle into a local file:// store",
    )


def _restic_s3(bench: Bench, remote: Remote, keys: Path) -> Contender:
    """``restic backup`` of the raw image into an S3 repository on the same server."""
    env = {**remote.env, **RESTIC_ENV}
    state = {"repo": ""}

    def prepare() -> None:
        state["repo"] = f"restic-{next(_serial)}"
        run_quiet(["restic", "--repo", _restic_repo(remote, state["repo"]), "init"], env)

    def collect(_stdout: str) -> Figures:
        return _usage(remote.url(state["repo"]), keys, remote.env, wipe=True)

    def argv() -> list[str]:
        return [
            "restic", "--repo", _restic_repo(remote, state["repo"]), "--no-cache", "--quiet",
            "backup", "--host", "bench", str(bench.source),
        ]  # fmt: skip

    return Contender(
        name="restic backup → s3://",
        argv=argv,
        prepare=prepare,
        collect=collect,
        env=env,
        note="repository v2 with compression, on the same SeaweedFS",
    )


def _restic_repo(remote: Remote, prefix: str) -> str:
    return f"s3:{remote.endpoint}/bench/{prefix}"


def remote_row(bench: Bench, kind: str) -> dict[str, Any]:
    """The initial replication row for ``kind`` (``s3`` or ``azure``)."""
    what = KINDS[kind][1]
    anchors = "vs the same into file://" + (", restic to S3" if kind == "s3" else "")
    title = f"Initial replication into {what} ({kind}://) ({anchors})"
    root = reset_dir(bench.work / f"ours-{kind}")
    qcow2 = bench.work / "base.qcow2"
    if not qcow2.exists():
        to_qcow2(bench.image, qcow2)
    disk = ServedDisk.start(qcow2, root / "qsd")
    try:
        with object_server(kind, root / "server") as remote:
            contenders = [
                RemoteInitial(remote, disk, root, bench.block_size).contender(),
                _local_reference(bench, disk, root),
            ]
            if kind == "s3":
                contenders.append(_restic_s3(bench, remote, root / "keys.json"))
            results = _run(bench, title, contenders)
    finally:
        disk.stop()
    return _row(
        f"initial-{kind}",
        title,
        results,
        data_bytes=bench.spec.size,
        columns=["bytes_stored"],
        note=f"MB/s over the disk size; {what} runs on this machine (loopback, no network); "
        "stored = the sum of the objects' sizes as the server lists them (file://: apparent "
        "size); peak RSS is the client's (the server's memory is not counted). Ratio = time "
        "of the remote run over this contender's.",
    )


def s3_row(bench: Bench) -> dict[str, Any]:
    return remote_row(bench, "s3")


def azure_row(bench: Bench) -> dict[str, Any]:
    return remote_row(bench, "azure")
