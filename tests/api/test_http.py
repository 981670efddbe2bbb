"""The vault API over real HTTPS against a `vault serve` process: TLS pinning, the operator
flow, agents' registration and claims, and every kind of denial (401/403 with a reason,
logged, nothing changed)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from siterecovery.api.errors import VaultUnreachable
from siterecovery.api.tls import ensure_pki
from siterecovery.errors import InputError, NotFoundError
from siterecovery.vault.access import NotAuthenticated, PermissionDenied
from siterecovery.vault.errors import Conflict, InvalidTransition

from .vaultproc import VaultProcess

DISK = {"name": "vda", "size": 1 << 20, "node_name": "n", "path": "/img/x.qcow2"}


def register_host(vault: VaultProcess, host: str, site: str = "dc1") -> str:
    with vault.client() as anonymous:
        key = vault.registration_key(host, site)
        done = anonymous.post("/v1/agent/register", {"key": key, "host": host})
    assert done["host"] == host and done["credential"].startswith("srh_")
    assert done["store_url"] == vault.settings.store_url
    return str(done["credential"])


def report_vm(vault: VaultProcess, credential: str, vm: str) -> None:
    with vault.client(credential) as agent:
        result = agent.put("/v1/agent/vms", {"vms": [{"name": vm, "disks": [DISK]}]})
    assert result == {"registered": [vm], "refused": {}}


def test_tls_is_pinned_to_the_vaults_ca(vault: VaultProcess, tmp_path: Path) -> None:
    other = ensure_pki(tmp_path / "other")
    from siterecovery.api.client import VaultClient

    with (
        VaultClient(vault.url, ca_file=other.ca_cert) as stranger,
        pytest.raises(
            VaultUnreachable, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"
        ),
    ):
        stranger.get("/healthz")
    with pytest.raises(httpx.HTTPError):  # no plain HTTP at all
        httpx.get(f"http://127.0.0.1:{vault.port}/healthz", timeout=5)
    with pytest.raises(InputError, match="https"):
        VaultClient(f"http://127.0.0.1:{vault.port}", ca_file=vault.ca)
    with vault.client() as client:
        assert client.get("/healthz")["status"] == "ok"
        assert "/v1/agent/claims" in client.get("/openapi.json")["paths"]


def test_policies_create_update_and_bad_payloads_change_nothing(
    vault: VaultProcess, tokens: dict[str, str]
) -> None:
    with vault.client(tokens["operator"]) as op:
        created = op.post("/v1/policies", {"name": "gold", "copy_frequency_s": 30,
                                           "retention_h": 24, "app_consistent_h": 4})  # fmt: skip
        assert created["resync_window"] == "18:30-06:00" and created["app_consistent_h"] == 4
        updated = op.patch("/v1/policies/gold", {"copy_frequency_s": 300,
                                                 "bandwidth_work_mbps": 100})  # fmt: skip
        assert (updated["copy_frequency_s"], updated["bandwidth_work_mbps"]) == (300, 100)
        for bad, expected in (
            ({"copy_frequency_s": 31}, "30, 300 or 900"),
            ({"retention_h": 0}, "retention_h"),
            ({"resync_window": "25:00-06:00"}, "resync window"),
            ({"app_consistent_h": 12, "retention_h": 6}, "exceeds the retention"),
            ({"encryption": True}, "cannot be changed"),
            ({"colour": "red"}, "colour"),
        ):
            with pytest.raises(InputError, match=expected):
                op.patch("/v1/policies/gold", bad)
        with pytest.raises(Conflict, match="already exists"):
            op.post("/v1/policies", {"name": "gold"})
        with pytest.raises(NotFoundError, match="no policy 'nope'"):
            op.patch("/v1/policies/nope", {"retention_h": 2})
        assert op.get("/v1/policies/gold") == updated  # every refusal changed nothing


def test_denials_are_401_or_403_with_a_reason_and_logged(
    vault: VaultProcess, tokens: dict[str, str]
) -> None:
    cred_a, cred_b = register_host(vault, "kvm-a"), register_host(vault, "kvm-b")
    report_vm(vault, cred_a, "vm-a")
    report_vm(vault, cred_b, "vm-b")
    with vault.client(tokens["operator"]) as op:
        op.post("/v1/policies", {"name": "gold", "copy_frequency_s": 30})
        job_b = op.post("/v1/vms/vm-b/protect", {"policy": "gold"})
    session = str(uuid.uuid4())
    with vault.client(cred_a) as host_a:
        with pytest.raises(PermissionDenied, match=r"kvm-a.*vm-b.*another host"):
            host_a.get("/v1/agent/vms/vm-b")
        with pytest.raises(PermissionDenied, match="another host"):
            host_a.post("/v1/agent/vms/vm-b/transition",
                        {"to_state": "initial replication", "reason": "hijack"})  # fmt: skip
        with pytest.raises(PermissionDenied, match="another host"):
            host_a.post(f"/v1/agent/jobs/{job_b['id']}/tasks/check prerequisites",
                        {"action": "start"})  # fmt: skip
        assert host_a.post("/v1/agent/claims", {"session": session}) == []  # not B's work
        with pytest.raises(PermissionDenied, match="hosts use the agent API"):
            host_a.get("/v1/vms")
    with vault.client(tokens["reader"]) as reader:
        assert [v["name"] for v in reader.get("/v1/vms")] == ["vm-a", "vm-b"]
        with pytest.raises(PermissionDenied, match="needs the role 'operator'"):
            reader.post("/v1/vms/vm-b/failover", {"kind": "unplanned"})
        with pytest.raises(PermissionDenied, match="needs the role 'admin'"):
            reader.post("/v1/tokens", {"name": "mine", "role": "admin"})
        with pytest.raises(PermissionDenied, match="only agents"):
            reader.post("/v1/agent/heartbeat", {"session": session})
    with vault.client(tokens["admin"]) as admin:
        job = admin.get(f"/v1/jobs/{job_b['id']}")  # untouched by host A and the reader
        assert job["state"] == "pending" and all(t["state"] == "pending" for t in job["tasks"])
        assert admin.get("/v1/status", vm="vm-b")[0]["state"] == "enabling protection"
        admin.delete("/v1/tokens/t-reader")
    with (
        vault.client(tokens["reader"]) as revoked,
        pytest.raises(NotAuthenticated, match=r"t-reader.*revoked"),
    ):
        revoked.get("/v1/vms")
    with vault.client("srt_forged") as forged, pytest.raises(NotAuthenticated, match="unknown"):
        forged.get("/v1/vms")
    with vault.client() as nobody, pytest.raises(NotAuthenticated, match="no credential"):
        nobody.get("/v1/jobs")
    log = vault.log.read_text()
    assert "denied 403 GET /v1/agent/vms/vm-b from host 'kvm-a'" in log
    assert "denied 401 GET /v1/vms from anonymous" in log and "revoked" in log


def test_registration_keys_are_one_time_and_expire(vault: VaultProcess) -> None:
    key = vault.registration_key("kvm1", ttl_s=600)
    short = vault.registration_key("kvm3", ttl_s=1)
    with vault.client() as anonymous:
        anonymous.post("/v1/agent/register", {"key": key, "host": "kvm1"})
        with pytest.raises(NotAuthenticated, match="already used by host 'kvm1'"):
            anonymous.post("/v1/agent/register", {"key": key, "host": "kvm2"})
        time.sleep(1.2)
        with pytest.raises(NotAuthenticated, match="expired"):
            anonymous.post("/v1/agent/register", {"key": short, "host": "kvm3"})
        with pytest.raises(NotAuthenticated, match="unknown registration key"):
            anonymous.post("/v1/agent/register", {"key": "srk_guess", "host": "kvm4"})
    with vault.client(vault.token("admin", "admin")) as admin:
        assert [h["host"]["name"] for h in admin.get("/v1/hosts")] == ["kvm1"]


def test_claims_lease_work_once_and_cycles_report_figures(
    vault: VaultProcess, tokens: dict[str, str]
) -> None:
    cred = register_host(vault, "kvm1")
    report_vm(vault, cred, "web1")
    with vault.client(tokens["operator"]) as op:
        op.post("/v1/policies", {"name": "gold", "copy_frequency_s": 30})
        job = op.post("/v1/vms/web1/protect", {"policy": "gold"})
        with pytest.raises(InvalidTransition, match="cannot protect it"):
            op.post("/v1/vms/web1/protect", {"policy": "gold"})
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    with vault.client(cred) as agent:
        agent.post("/v1/agent/heartbeat", {"session": first})
        (item,) = agent.post("/v1/agent/claims", {"session": first})
        assert (item["kind"], item["vm"], item["job_id"]) == (
            "enable protection",
            "web1",
            job["id"],
        )
        assert agent.post("/v1/agent/claims", {"session": first}) == []  # leased: never twice
        # A restarted agent (new session) gets its host's stale work back, marked resumed.
        (again,) = agent.post("/v1/agent/claims", {"session": second})
        assert again["resumed"] and again["job_id"] == job["id"]
        for task in ("check prerequisites", "create replication relationship"):
            agent.post(f"/v1/agent/jobs/{job['id']}/tasks/{task}", {"action": "start"})
            agent.post(f"/v1/agent/jobs/{job['id']}/tasks/{task}", {"action": "finish"})
        agent.post("/v1/agent/vms/web1/transition",
                   {"to_state": "initial replication", "reason": "copy"})  # fmt: skip
        point = {
            "point_id": "p1",
            "created_at": datetime.now(UTC).isoformat(),
            "consistency": "crash",
            "manifest_key": "points/web1/p1.json",
            "bytes_shipped": 4096,
            "figures": {"duration_s": 2.0, "bytes_read": 8192},
        }
        agent.post("/v1/agent/vms/web1/cycles",
                   {"session": second, "point": point, "release_lease": False})  # fmt: skip
        # A report replayed (its answer lost to a restart) is recorded once, not an error.
        again = agent.post("/v1/agent/vms/web1/cycles",
                           {"session": second, "point": point, "release_lease": False})
        assert again["protection"]["last_point_id"] == "p1"
        assert len(agent.get("/v1/agent/vms/web1/points")) == 1
        with pytest.raises(InputError, match="exactly one"):
            agent.post("/v1/agent/vms/web1/cycles", {"session": second})
    with vault.client(tokens["reader"]) as reader:
        (status,) = reader.get("/v1/status")
        assert status["state"] == "initial replication" and status["last_point_id"] == "p1"
        assert status["last_cycle"]["bytes_read"] == 8192 and status["throughput_bps"] == 2048
        time.sleep(2.5)  # heartbeat timeout is 2 s: the host is now disconnected
        hosts = reader.get("/v1/hosts")
        assert hosts[0]["connected"] is False
        (status,) = reader.get("/v1/status")
        assert status["host_connected"] is False and status["health"] == "critical"
        assert "host 'kvm1' disconnected" in status["health_reasons"][-1]


def test_two_vault_processes_hand_out_each_piece_of_work_once(
    vault: VaultProcess, tokens: dict[str, str]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    second = VaultProcess(vault.settings).start()  # same database, another process
    try:
        cred = register_host(vault, "kvm1")
        with vault.client(cred) as agent:
            vms = [{"name": f"vm{i:02d}", "disks": [DISK]} for i in range(24)]
            agent.put("/v1/agent/vms", {"vms": vms})
        with vault.client(tokens["operator"]) as op:
            op.post("/v1/policies", {"name": "gold", "copy_frequency_s": 30})
            jobs = {op.post(f"/v1/vms/{vm['name']}/protect", {"policy": "gold"})["id"]
                    for vm in vms}  # fmt: skip
        session = str(uuid.uuid4())

        def claim(process: VaultProcess) -> list[str]:
            with process.client(cred) as client:
                items = client.post("/v1/agent/claims", {"session": session, "limit": 3})
                return [item["job_id"] for item in items]

        handed: list[str] = []
        with ThreadPoolExecutor(8) as pool:
            for _ in range(10):  # concurrent polls of two processes, until all is claimed
                handed += [job for batch in pool.map(claim, [vault, second] * 4) for job in batch]
                if len(set(handed)) == len(jobs):
                    break
        assert sorted(handed) == sorted(jobs)  # every job handed out exactly once
    finally:
        second.stop()
