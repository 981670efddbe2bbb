"""Vault and agent in separate processes exchanging real work on a real (paused) QEMU VM.

The agent discovers the VM through its QMP socket, runs the enable protection job the vault
hands it, ships the disk to the replica store and reports the point; then the vault
schedules delta cycles. Restarts: the vault is SIGKILLed while the job runs, or the agent
is; either way the job ends succeeded, the VM is protected, every recorded point restores
bit-exact, and the store holds no point the vault does not know (nothing half-made).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from api.vaultproc import CLI, VaultProcess, init_vault

from siterecovery.agent.config import KeyFile
from siterecovery.agent.runner import register
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore

pytestmark = pytest.mark.qemu
MiB = 1 << 20


@dataclass
class Rig:
    vault: VaultProcess
    admin: str
    agent_dir: Path
    disk: Path
    agent: subprocess.Popen[bytes] | None = None

    def start_agent(self) -> None:
        argv = [*CLI, "--workdir", str(self.agent_dir), "agent", "run"]
        with (self.agent_dir / "agent.log").open("ab") as log:
            self.agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def kill_agent(self) -> None:
        assert self.agent is not None
        self.agent.send_signal(signal.SIGKILL)
        self.agent.wait(timeout=10)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        with self.vault.client(self.admin, retry_for_s=30) as client:
            if method == "GET":
                return client.get(path)
            return client.request(method, path, json=body or {})

    def wait(self, what: str, probe: Callable[[], Any], timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = probe()
            if value:
                return value
            time.sleep(0.05)
        logs = (self.agent_dir / "agent.log").read_text()[-3000:]
        raise AssertionError(f"timed out waiting for {what}\nagent log:\n{logs}")

    def protect_and_catch_running(self) -> str:
        self.api("POST", "/v1/policies", {"name": "gold", "copy_frequency_s": 30})
        job_id = str(self.api("POST", "/v1/vms/vm1/protect", {"policy": "gold"})["id"])
        job = self.wait("the job to start", lambda: (j := self.api("GET", f"/v1/jobs/{job_id}"))
                        ["state"] != "pending" and j)  # fmt: skip
        # The initial copy of 40 MiB of random data takes long enough to be caught running.
        assert job["state"] == "running", job
        return job_id


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    vault = VaultProcess(init_vault(tmp_path / "vault")).start("--heartbeat-timeout", "5s")
    vmdir, agent_dir = tmp_path / "vms", tmp_path / "agent"
    vmdir.mkdir()
    raw, disk = vmdir / "disk0.raw", vmdir / "disk0.qcow2"
    raw.write_bytes(os.urandom(24 * MiB) + bytes(8 * MiB) + os.urandom(16 * MiB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)],
                   check=True)  # fmt: skip
    spec = VmProcessSpec(
        name="vm1", workdir=vmdir, drives=[DriveSpec("disk0", disk)], extra_args=["-S"]
    )  # fmt: skip  (paused: the disk stays as written)
    vm = QemuProcess.start(spec)
    key_file = tmp_path / "kvm1.key"
    expires = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    KeyFile(vault.url, vault.registration_key("kvm1"), "dc1", expires, vault.ca.read_text()).save(
        key_file
    )
    register(agent_dir, key_file, host="kvm1", qmp_globs=[str(vmdir / "*.qmp")],
             store_key_file=vault.settings.key_file)  # fmt: skip
    config_path = agent_dir / "agent" / "agent.json"
    config = json.loads(config_path.read_text())
    config.update(poll_s=0.2, discover_every_s=1, lease_s=30)
    config_path.write_text(json.dumps(config))
    rig = Rig(vault, vault.token("admin", "admin"), agent_dir, raw)
    rig.start_agent()
    try:
        rig.wait("the agent to report vm1", lambda: rig.api("GET", "/v1/vms"))
        yield rig
    finally:
        if rig.agent is not None and rig.agent.poll() is None:
            rig.agent.terminate()
            rig.agent.wait(timeout=30)
        vm.stop()
        vault.stop()


def store_of(rig: Rig) -> ReplicaStore:
    settings = rig.vault.settings
    return ReplicaStore.open(settings.store_url, StoreKeys.load(settings.key_file))


def check_points(rig: Rig, tmp: Path) -> list[dict[str, Any]]:
    """Vault and store agree on the points, and each restores to the source disk exactly."""
    recorded = rig.api("GET", "/v1/vms/vm1/points")
    store = store_of(rig)
    assert sorted(p.point_id for p in store.list_points("vm1")) == sorted(
        p["point_id"] for p in recorded
    )
    assert store.verify().ok
    source = rig.disk.read_bytes()
    for point in recorded:
        dest = tmp / f"{point['point_id']}.raw"
        dest.unlink(missing_ok=True)
        store.restore_disk(store.load_point("vm1", point["point_id"]), "disk0", dest)
        assert dest.read_bytes() == source
    return list(recorded)


def test_vault_killed_mid_job_then_cycles_on_schedule(rig: Rig, tmp_path: Path) -> None:
    job_id = rig.protect_and_catch_running()
    rig.vault.kill()
    time.sleep(1.0)  # the agent keeps working and retries its reports
    rig.vault.start("--heartbeat-timeout", "5s")
    job = rig.wait("the job to end", lambda: (j := rig.api("GET", f"/v1/jobs/{job_id}"))["state"]
                   not in ("pending", "running") and j)  # fmt: skip
    assert job["state"] == "succeeded", job
    assert [t["state"] for t in job["tasks"]] == ["succeeded"] * 4
    (status,) = rig.api("GET", "/v1/status")
    assert status["state"] == "protected" and status["host_connected"]
    assert len(check_points(rig, tmp_path)) == 1
    # The next cycle is due one copy interval (30 s) after the initial copy.
    rig.wait("a delta cycle", lambda: len(rig.api("GET", "/v1/vms/vm1/points")) == 2, 60)
    (status,) = rig.api("GET", "/v1/status")
    figures = status["last_cycle"]
    assert figures["initial"] is False and figures["bytes_read"] == 0  # the VM is paused
    assert figures["duration_s"] > 0 and status["health"] == "normal"
    assert status["rpo_s"] < 30
    check_points(rig, tmp_path)


def test_agent_killed_mid_job_resumes_it(rig: Rig, tmp_path: Path) -> None:
    job_id = rig.protect_and_catch_running()
    rig.kill_agent()
    rig.start_agent()
    job = rig.wait("the job to end", lambda: (j := rig.api("GET", f"/v1/jobs/{job_id}"))["state"]
                   not in ("pending", "running") and j)  # fmt: skip
    assert job["state"] == "succeeded", job
    (status,) = rig.api("GET", "/v1/status")
    assert status["state"] == "protected"
    assert len(check_points(rig, tmp_path)) >= 1
