"""The `siterecovery` command as a user runs it: a real process, exit codes, and effects.

Bad input must give a clear error naming what is wrong, a distinct exit code, and change
nothing; the flow test protects a real QEMU VM through the CLI and restores its disks
bit-exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from siterecovery.hypervisor.guest import make_disk
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec

CLI = [sys.executable, "-m", "siterecovery"]


def run(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [*CLI, "--workdir", str(workdir), *args], capture_output=True, text=True, env=env,
        check=False, timeout=300,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr}")
    return result


def tree(path: Path) -> dict[str, int]:
    """Every file under ``path`` with its size: 'changed nothing' is compared with this."""
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def vault(tmp_path: Path) -> Path:
    workdir = tmp_path / "vault"
    run(workdir, "vault", "init")
    run(workdir, "policy", "create", "gold", "--frequency", "30s", "--retention", "24h")
    return workdir


def test_version_and_help(tmp_path: Path) -> None:
    assert "siterecovery 0.1.0" in run(tmp_path, "--version").stdout
    helptext = run(tmp_path, "demo", "--help").stdout
    assert "--json" in helptext and "--keep" in helptext


def test_unknown_store_scheme_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "new"
    result = run(workdir, "vault", "init", "--store", "ftp://host/x", check=False)
    assert result.returncode == 2
    assert "ftp" in result.stderr and "file" in result.stderr  # names it and what exists
    assert not workdir.exists()


def test_protecting_a_missing_vm_changes_nothing(vault: Path) -> None:
    before = tree(vault)
    jobs_before = json.loads(run(vault, "jobs", "--json").stdout)
    result = run(vault, "protect", "no-such-vm", "--policy", "gold", check=False)
    assert result.returncode == 3
    assert "no VM 'no-such-vm'" in result.stderr and "hint:" in result.stderr
    assert json.loads(run(vault, "jobs", "--json").stdout) == jobs_before
    after = tree(vault)
    assert {k: v for k, v in after.items() if not k.startswith("vault.db")} == {
        k: v for k, v in before.items() if not k.startswith("vault.db")
    }


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("policy", "create", "p", "--frequency", "10s"), 2, "copy frequency"),
        (("policy", "create", "p", "--retention", "forever"), 2, "invalid retention"),
        (("policy", "create", "bad/name"), 2, "invalid policy name"),
        (("protect", "vm1", "--policy", "nope"), 3, "no VM"),
        (("points", "ghost"), 3, "ghost"),
        (("job", "ffffffff"), 2, "0 jobs match"),
        (("demo", "--interval", "soon"), 2, "invalid interval"),
        (("demo", "--accel", "warp"), 2, "unknown accelerator"),
    ],
)
def test_bad_input_gets_a_clear_error(
    vault: Path, args: tuple[str, ...], code: int, words: str
) -> None:
    policies = run(vault, "policy", "list", "--json").stdout
    result = run(vault, *args, check=False)
    assert result.returncode == code, result.stderr
    assert words in result.stderr
    assert run(vault, "policy", "list", "--json").stdout == policies


def test_commands_without_a_vault_say_how_to_make_one(tmp_path: Path) -> None:
    result = run(tmp_path / "none", "status", check=False)
    assert result.returncode == 3
    assert "vault init" in result.stderr


@pytest.mark.qemu
def test_protect_replicate_restore_a_real_vm(vault: Path, tmp_path: Path) -> None:
    vmdir = tmp_path / "vm"
    vmdir.mkdir()
    disk = vmdir / "disk0.qcow2"
    make_disk(disk, 32 << 20)
    subprocess.run(["qemu-io", "-c", "write -P 0x61 1M 3M", "-c", "write -P 0x62 20M 64k",
                    str(disk)], check=True, capture_output=True)  # fmt: skip
    spec = VmProcessSpec(name="vm1", workdir=vmdir, drives=[DriveSpec("disk0", disk)],
                         extra_args=["-S"])  # fmt: skip  (paused: the disk stays as written)
    vm = QemuProcess.start(spec)
    try:
        run(vault, "vm", "register", "vm1", "--qmp", str(vm.qmp_path))
        listed = json.loads(run(vault, "vm", "list", "--json").stdout)
        assert [(v["name"], v["state"]) for v in listed] == [("vm1", "unprotected")]
        out = run(vault, "protect", "vm1", "--policy", "gold").stdout
        assert "finalize protection" in out and "succeeded" in out
        cycles = json.loads(run(vault, "replicate", "vm1", "--json").stdout)
        assert cycles[0]["bytes_read"] == 0  # nothing changed since the initial copy
        status = json.loads(run(vault, "status", "vm1", "--json").stdout)
        assert status[0]["state"] == "protected"
        points = json.loads(run(vault, "points", "vm1", "--json").stdout)
        assert len(points) == 2
        run(vault, "restore", "vm1", "--point", points[0]["point_id"], "--to", str(tmp_path / "r"))
    finally:
        vm.stop()
    compare = subprocess.run(["qemu-img", "compare", str(disk), str(tmp_path / "r/disk0.qcow2")],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert compare.returncode == 0, compare.stdout + compare.stderr
    jobs = json.loads(run(vault, "jobs", "--json").stdout)
    assert [j["kind"] for j in jobs] == ["enable protection"]
    assert [t["name"] for t in jobs[0]["tasks"]] == [
        "check prerequisites", "create replication relationship",
        "start initial replication", "finalize protection",
    ]  # fmt: skip


@pytest.mark.qemu
def test_tampered_or_truncated_manifest_is_refused(vault: Path, tmp_path: Path) -> None:
    vmdir = tmp_path / "vm"
    vmdir.mkdir()
    disk = vmdir / "disk0.qcow2"
    make_disk(disk, 8 << 20)
    vm = QemuProcess.start(VmProcessSpec(name="vm1", workdir=vmdir,
                                         drives=[DriveSpec("disk0", disk)], extra_args=["-S"]))
    try:
        run(vault, "vm", "register", "vm1", "--qmp", str(vm.qmp_path))
        run(vault, "protect", "vm1", "--policy", "gold")
    finally:
        vm.stop()
    (manifest,) = (vault / "store" / "points" / "vm1").glob("*.json")
    point_id = manifest.stem
    original = manifest.read_bytes()
    for damaged in (original[: len(original) // 2], original.replace(b'"crash"', b'"app"')):
        manifest.write_bytes(damaged)
        result = run(vault, "restore", "vm1", "--to", str(tmp_path / "out"), check=False)
        assert result.returncode == 4, result.stderr
        assert point_id in result.stderr
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
