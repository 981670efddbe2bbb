"""siterecovery's side of the benchmark on real qemu-storage-daemon: the change written through
the daemon is tracked, shipped as a delta, and restored byte for byte."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.daemon import served, to_qcow2
from bench.rows import _cycle_argv, _worker, init_store
from bench.workload import MiB, WorkloadSpec, apply_change, generate_image

pytestmark = pytest.mark.qemu


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json(argv: list[str]) -> dict[str, float]:
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd="/")
    doc: dict[str, float] = json.loads(out.stdout)
    return doc


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs QEMU")
def test_tracked_change_is_shipped_as_delta_and_restored(tmp_path: Path) -> None:
    spec = WorkloadSpec(size=16 * MiB, seed=5)
    raw, qcow2 = tmp_path / "a.raw", tmp_path / "a.qcow2"
    generate_image(raw, spec)
    to_qcow2(raw, qcow2)
    store, keys = tmp_path / "store", tmp_path / "keys.json"
    init_store(store, keys, 1 << 20)
    with served(qcow2, tmp_path / "qsd") as disk:
        initial = _json(_cycle_argv(store, keys, disk, delta=False))
        assert disk.apply_change(spec, tmp_path / "change") == spec.change_bytes
        delta = _json(_cycle_argv(store, keys, disk, delta=True))
    assert initial["bytes_read"] >= (raw.stat().st_blocks * 512) // 2
    assert delta["bytes_read"] == spec.change_bytes  # exactly the tracked writes
    apply_change(raw, spec)
    dest = tmp_path / "restored.raw"
    args = ["--store", f"file://{store}", "--keys", str(keys), "--dest", str(dest)]
    _json(_worker("restore", *args))
    assert _sha(dest) == _sha(raw)
    assert sys.executable in _worker("restore")


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs QEMU")
def test_untracked_divergence_is_found_and_sent_by_resync(tmp_path: Path) -> None:
    spec = WorkloadSpec(size=16 * MiB, seed=7)
    raw, qcow2 = tmp_path / "a.raw", tmp_path / "a.qcow2"
    generate_image(raw, spec)
    to_qcow2(raw, qcow2)
    store, keys = tmp_path / "store", tmp_path / "keys.json"
    init_store(store, keys, 1 << 20)
    with served(qcow2, tmp_path / "qsd") as disk:
        qmp = ["--qmp", str(disk.qmp), "--run-dir", str(disk.workdir)]
        args = ["--store", f"file://{store}", "--keys", str(keys), *qmp]
        _json(_worker("cycle", *args))
        assert _json(_worker("untrack", *args)) == {}
        disk.apply_change(spec, tmp_path / "change")
        # nothing tracked the change: a delta cycle refuses, a resync finds exactly it
        delta = subprocess.run(_worker("cycle", *args, "--delta"), capture_output=True, text=True)
        assert delta.returncode != 0 and "bitmap" in delta.stderr.lower()
        resync = _json(_worker("resync", *args))
    assert resync["bytes_sent"] == spec.change_bytes
    assert resync["bytes_read"] == pytest.approx(raw.stat().st_blocks * 512, rel=0.1)
    apply_change(raw, spec)
    dest = tmp_path / "restored.raw"
    _json(
        _worker("restore", "--store", f"file://{store}", "--keys", str(keys), "--dest", str(dest))
    )
    assert _sha(dest) == _sha(raw)


def test_object_store_usage_sums_and_wipes_through_the_real_server(tmp_path: Path) -> None:
    from bench.servers import object_server

    keys = tmp_path / "keys.json"
    with object_server("s3", tmp_path / "s3") as remote:
        url = remote.url("t1")
        env = {**remote.env, "PATH": "/usr/bin:/bin"}
        store = ["--store", url, "--keys", str(keys)]

        def worker(*argv: str) -> dict[str, float]:
            out = subprocess.run(_worker(*argv, *store), check=True, capture_output=True,
                                 text=True, env=env, cwd="/")  # fmt: skip
            doc: dict[str, float] = json.loads(out.stdout)
            return doc

        worker("init")
        first = worker("usage", "--wipe")
        again = worker("usage")
    assert first["objects"] >= 1 and first["bytes_stored"] > 0
    assert again == {"bytes_stored": 0, "objects": 0}
    assert not (tmp_path / "s3").exists()  # the server's data went with it
