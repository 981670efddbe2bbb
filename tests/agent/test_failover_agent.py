"""Resync and a drill through the vault API, run by agents in separate processes on a real
(paused) QEMU VM: the primary host's agent protects and resynchronizes the VM; a recovery
site's agent claims the test failover, starts the replica from the store (instant recovery)
as the machine the primary's agent discovered (machine type, vCPUs, CPU model, memory), and
removes it on cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from api.vaultproc import CLI, VaultProcess, init_vault

from siterecovery.agent.config import KeyFile
from siterecovery.agent.runner import register
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec
from siterecovery.recovery import instant
from siterecovery.recovery.replica import ReplicaRecord
from siterecovery.vault import access
from siterecovery.vault.db import open_database

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
MiB = 1 << 20


@dataclass
class Sites:
    vault: VaultProcess
    admin: str
    dirs: dict[str, Path]
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        with self.vault.client(self.admin, retry_for_s=30) as client:
            if method == "GET":
                return client.get(path)
            return client.request(method, path, json=body or {})

    def wait_job(self, job_id: str, timeout: float = 90) -> dict[str, Any]:
        job: dict[str, Any] = self.wait(
            f"job {job_id[:8]} to end",
            lambda: (
                (j := self.api("GET", f"/v1/jobs/{job_id}"))["state"] not in ("pending", "running")
                and j
            ),
            timeout,
        )
        return job

    def wait(self, what: str, probe: Callable[[], Any], timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = probe()
            if value:
                return value
            time.sleep(0.2)
        logs = "\n".join(f"--- {n}\n{(d / 'agent.log').read_text()[-2500:]}"
                         for n, d in self.dirs.items())  # fmt: skip
        raise AssertionError(f"timed out waiting for {what}\n{logs}")


def key_file(vault: VaultProcess, path: Path, host: str, site: str, role: str) -> Path:
    db = open_database(vault.settings.vault_url)
    try:
        key = access.create_registration_key(db, site=site, host=host, role=role, ttl_s=600)[0]
    finally:
        db.close()
    expires = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    KeyFile(vault.url, key, site, expires, vault.ca.read_text(), host=host).save(path)
    return path


def start_agent(workdir: Path) -> subprocess.Popen[bytes]:
    config_path = workdir / "agent" / "agent.json"
    config = json.loads(config_path.read_text())
    config.update(poll_s=0.2, discover_every_s=1, lease_s=30)
    config_path.write_text(json.dumps(config))
    with (workdir / "agent.log").open("ab") as log:
        return subprocess.Popen([*CLI, "--workdir", str(workdir), "agent", "run"],
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    vault = VaultProcess(init_vault(tmp_path / "vault")).start("--heartbeat-timeout", "30s")
    vmdir = tmp_path / "vms"
    vmdir.mkdir()
    raw, disk = vmdir / "disk0.raw", vmdir / "disk0.qcow2"
    raw.write_bytes(os.urandom(4 * MiB) + bytes(4 * MiB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)],
                   check=True)  # fmt: skip
    vm = QemuProcess.start(
        VmProcessSpec(
            name="vm1",
            workdir=vmdir,
            drives=[DriveSpec("disk0", disk)],
            extra_args=["-S"],
            machine="pc",
            cpus=2,
            cpu_model="max",
            memory_mib=192,
        )
    )
    dirs = {"kvm1": tmp_path / "kvm1", "dr1": tmp_path / "dr1"}
    register(
        dirs["kvm1"],
        key_file(vault, tmp_path / "kvm1.key", "kvm1", "dc1", "primary"),
        host="kvm1",
        qmp_globs=[str(vmdir / "*.qmp")],
        store_key_file=vault.settings.key_file,
    )
    dr_key = key_file(vault, tmp_path / "dr1.key", "dr1", "dr", "recovery")
    register(dirs["dr1"], dr_key, host="dr1", store_key_file=vault.settings.key_file)
    rig = Sites(vault, vault.token("admin", "admin"), dirs)
    try:
        for name, workdir in dirs.items():
            rig.agents[name] = start_agent(workdir)
        rig.wait("the agent to report vm1", lambda: rig.api("GET", "/v1/vms"))
        yield rig
    finally:
        for agent in rig.agents.values():
            agent.terminate()
            agent.wait(timeout=30)
        vm.stop()
        vault.stop()


def test_agents_resync_and_run_a_drill_from_the_recovery_site(sites: Sites) -> None:
    sites.api("POST", "/v1/policies", {"name": "gold", "copy_frequency_s": 900})
    job = sites.api("POST", "/v1/vms/vm1/protect", {"policy": "gold"})
    assert sites.wait_job(job["id"])["state"] == "succeeded"

    # Resync on request: the primary's agent compares every block; the VM is paused, so
    # nothing differs and nothing is sent.
    resync = sites.api("POST", "/v1/vms/vm1/resync", {"reason": "operator check"})
    done = sites.wait_job(resync["id"])
    assert done["state"] == "succeeded", done
    figures = done["tasks"][1]["details"]
    assert figures["blocks_compared"] == 8 * MiB // figures["block_size"]
    assert figures["blocks_sent"] == 0
    (status,) = sites.api("GET", "/v1/status")
    assert status["state"] == "protected" and status["last_cycle"]["resync"] is True
    assert len(sites.api("GET", "/v1/vms/vm1/points")) == 2

    # A drill: the recovery host's agent starts the replica from the newest point.
    drill = sites.api("POST", "/v1/vms/vm1/failover", {"kind": "test"})
    done = sites.wait_job(drill["id"])
    assert done["state"] == "succeeded", done
    assert done["details"]["recovery_host"] == "dr1"
    assert done["tasks"][1]["details"]["point"] == status["last_point_id"]
    assert sites.api("GET", "/v1/vms/vm1")["state"] == "test failover running"
    record = ReplicaRecord.load(sites.dirs["dr1"] / "recovery" / "vm1" / "test")
    assert record is not None and record.mode == "instant"
    assert instant.pid_alive(record.pid) and instant.pid_alive(record.server_pid)
    start = {t["name"]: t for t in done["tasks"]}["start replica VM"]["details"]
    assert start["warnings"] == []
    argv = Path(f"/proc/{record.pid}/cmdline").read_bytes().split(b"\0")
    for flag, value in ((b"-machine", b"pc-i440fx-"), (b"-smp", b"2"), (b"-cpu", b"max"),
                        (b"-m", b"192")):  # fmt: skip
        assert argv[argv.index(flag) + 1].startswith(value), argv

    cleanup = sites.api("POST", "/v1/vms/vm1/failover/cleanup")
    assert sites.wait_job(cleanup["id"])["state"] == "succeeded"
    assert sites.api("GET", "/v1/vms/vm1")["state"] == "protected"
    assert not instant.pid_alive(record.pid) and not instant.pid_alive(record.server_pid)
    assert not (sites.dirs["dr1"] / "recovery" / "vm1" / "test").exists()


def test_planned_failover_is_handed_from_the_primary_to_the_recovery_agent(sites: Sites) -> None:
    sites.api("POST", "/v1/policies", {"name": "gold", "copy_frequency_s": 900})
    job = sites.api("POST", "/v1/vms/vm1/protect", {"policy": "gold"})
    assert sites.wait_job(job["id"])["state"] == "succeeded"
    planned = sites.api("POST", "/v1/vms/vm1/failover", {"kind": "planned"})
    done = sites.wait_job(planned["id"])
    assert done["state"] == "succeeded", done
    tasks = {t["name"]: t for t in done["tasks"]}
    final = tasks["replicate final changes"]["details"]["point"]
    assert tasks["select recovery point"]["details"]["point"] == final
    assert [p["point_id"] for p in sites.api("GET", "/v1/vms/vm1/points")][-1] == final
    assert done["details"]["phase"] == "source-finish"
    assert sites.api("GET", "/v1/vms/vm1")["state"] == "failed over"
    record = ReplicaRecord.load(sites.dirs["dr1"] / "recovery" / "vm1" / "failover")
    assert record is not None and record.point_id == final and instant.pid_alive(record.pid)

    commit = sites.api("POST", "/v1/vms/vm1/failover/commit")
    assert sites.wait_job(commit["id"])["state"] == "succeeded"
    assert sites.api("GET", "/v1/vms/vm1")["state"] == "committed"
    instant.stop_pid(record.pid)
    instant.stop_pid(record.server_pid)
