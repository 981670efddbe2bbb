"""Failover and resync through the API, against a `vault serve` process: who may ask, which
agent claims which job (the VM's host or a recovery host), the planned failover's hand-off
between the sites, and resyncs the vault schedules in the policy's window."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from siterecovery.api.client import VaultClient
from siterecovery.vault import access
from siterecovery.vault.access import PermissionDenied
from siterecovery.vault.db import open_database
from siterecovery.vault.errors import Conflict, InvalidTransition

from .test_http import register_host, report_vm
from .vaultproc import VaultProcess

PRIMARY, DR = str(uuid.uuid4()), str(uuid.uuid4())


def register_recovery_host(vault: VaultProcess, host: str) -> str:
    db = open_database(vault.settings.vault_url)
    try:
        key = access.create_registration_key(db, site="dr", host=host, role="recovery",
                                            ttl_s=600)[0]  # fmt: skip
    finally:
        db.close()
    with vault.client() as anonymous:
        done = anonymous.post("/v1/agent/register", {"key": key, "host": host})
    return str(done["credential"])


def protect(vault: VaultProcess, op: VaultClient, agent: VaultClient, vm: str) -> None:
    """Protect ``vm`` as its agent would: the job's tasks, the initial point, protected."""
    op.post("/v1/policies", {"name": "gold", "copy_frequency_s": 30})
    job = op.post(f"/v1/vms/{vm}/protect", {"policy": "gold"})
    (item,) = agent.post("/v1/agent/claims", {"session": PRIMARY})
    assert item["job_id"] == job["id"]
    tasks = [t["name"] for t in job["tasks"]]
    for task in tasks[:2]:
        run_task(agent, job["id"], task)
    agent.post(f"/v1/agent/vms/{vm}/transition",
               {"to_state": "initial replication", "reason": "copy"})  # fmt: skip
    report_point(agent, vm, "p1", release=False)
    for task in tasks[2:]:
        run_task(agent, job["id"], task)
    agent.post(f"/v1/agent/vms/{vm}/transition", {"to_state": "protected", "reason": "done"})
    agent.post(f"/v1/agent/jobs/{job['id']}/finish", {"session": PRIMARY})


def run_task(agent: VaultClient, job_id: str, task: str, details: Any = None) -> None:
    agent.post(f"/v1/agent/jobs/{job_id}/tasks/{task}", {"action": "start"})
    agent.post(f"/v1/agent/jobs/{job_id}/tasks/{task}",
               {"action": "finish", "details": details or {}})  # fmt: skip


def report_point(agent: VaultClient, vm: str, point_id: str, *, release: bool) -> None:
    point = {"point_id": point_id, "created_at": datetime.now(UTC).isoformat(),
             "consistency": "crash", "manifest_key": f"points/{vm}/{point_id}.json"}  # fmt: skip
    agent.post(f"/v1/agent/vms/{vm}/cycles",
               {"session": PRIMARY, "point": point, "release_lease": release})  # fmt: skip


def claims(agent: VaultClient, session: str) -> list[tuple[str, str]]:
    return [(w["kind"], w["details"].get("phase", "")) for w in
            agent.post("/v1/agent/claims", {"session": session})]  # fmt: skip


def test_planned_failover_is_handed_between_the_sites_and_readers_get_403(
    vault: VaultProcess, tokens: dict[str, str]
) -> None:
    cred = register_host(vault, "kvm1")
    report_vm(vault, cred, "web1")
    dr_cred = register_recovery_host(vault, "dr1")
    with (vault.client(tokens["operator"]) as op, vault.client(cred) as primary,
          vault.client(dr_cred) as recovery, vault.client(tokens["reader"]) as reader):  # fmt: skip
        protect(vault, op, primary, "web1")
        denied = "may not POST /v1/vms/web1/failover: that needs the role 'operator'"
        with pytest.raises(PermissionDenied, match=denied):
            reader.post("/v1/vms/web1/failover", {"kind": "planned"})
        assert reader.get("/v1/jobs", vm="web1")[0]["kind"] == "enable protection"  # nothing new
        with pytest.raises(InvalidTransition, match="cannot run a commit failover"):
            op.post("/v1/vms/web1/failover/commit")
        job = op.post("/v1/vms/web1/failover", {"kind": "planned"})
        assert job["kind"] == "planned failover" and job["details"]["phase"] == "source"
        with pytest.raises(Conflict, match="open planned failover"):
            op.post("/v1/vms/web1/failover", {"kind": "test"})
        assert claims(recovery, DR) == []  # the source phase is the VM's own agent's
        assert claims(primary, PRIMARY) == [("planned failover", "source")]
        with pytest.raises(PermissionDenied):  # the recovery host holds no lease yet
            recovery.get("/v1/agent/vms/web1/points")
        for task in ("check prerequisites", "shut down source VM"):
            run_task(primary, job["id"], task)
        report_point(primary, "web1", "final", release=False)
        run_task(primary, job["id"], "replicate final changes", {"point": "final"})
        primary.post(f"/v1/agent/jobs/{job['id']}/handoff",
                     {"session": PRIMARY, "phase": "recovery",
                      "details": {"final_point": "final"}})  # fmt: skip
        assert claims(primary, PRIMARY) == []  # no cycle while the planned failover is open
        (item,) = recovery.post("/v1/agent/claims", {"session": DR})
        assert item["details"]["final_point"] == "final"
        assert item["details"]["recovery_host"] == "dr1"
        assert [p["point_id"] for p in recovery.get("/v1/agent/vms/web1/points")] == ["p1", "final"]
        recovery.post("/v1/agent/vms/web1/transition",
                      {"to_state": "failing over", "reason": "planned"})  # fmt: skip
        for task in ("select recovery point", "prepare disks", "start replica VM"):
            run_task(recovery, job["id"], task)
        recovery.post("/v1/agent/vms/web1/transition",
                      {"to_state": "failed over", "reason": "running"})  # fmt: skip
        recovery.post(f"/v1/agent/jobs/{job['id']}/handoff",
                      {"session": DR, "phase": "source-finish", "details": {}})  # fmt: skip
        with pytest.raises(PermissionDenied):  # its lease ended with the hand-off
            recovery.get("/v1/agent/vms/web1/points")
        assert claims(primary, PRIMARY) == [("planned failover", "source-finish")]
        run_task(primary, job["id"], "release source VM")
        done = primary.post(f"/v1/agent/jobs/{job['id']}/finish", {"session": PRIMARY})
        assert done["state"] == "succeeded"
        # Follow-ups go to the recovery host that runs the replica.
        commit = op.post("/v1/vms/web1/failover/commit")
        assert commit["details"]["recovery_host"] == "dr1"
        assert claims(primary, PRIMARY) == []
        assert claims(recovery, DR) == [("commit failover", "")]


def test_resyncs_in_the_window_retried_on_backoff_and_on_request(
    vault: VaultProcess, tokens: dict[str, str]
) -> None:
    cred = register_host(vault, "kvm1")
    report_vm(vault, cred, "web1")
    now = datetime.now(UTC)
    later = f"{(now + timedelta(hours=2)):%H:%M}-{(now + timedelta(hours=3)):%H:%M}"
    around = f"{(now - timedelta(hours=1)):%H:%M}-{(now + timedelta(hours=1)):%H:%M}"
    with vault.client(tokens["operator"]) as op, vault.client(cred) as agent:
        protect(vault, op, agent, "web1")
        op.patch("/v1/policies/gold", {"resync_window": later})
        agent.post("/v1/agent/vms/web1/cycles", {"session": PRIMARY, "failure": {
            "message": "bitmap inconsistent", "error_class": "recoverable",
            "cause": "change tracking lost", "resync": True}})  # fmt: skip
        assert op.get("/v1/vms/web1")["state"] == "resync required"
        assert agent.post("/v1/agent/claims", {"session": PRIMARY}) == []  # outside the window
        op.patch("/v1/policies/gold", {"resync_window": around})
        (item,) = agent.post("/v1/agent/claims", {"session": PRIMARY})
        assert item["kind"] == "resynchronize" and item["details"]["trigger"] == "resync window"
        job_id = item["job_id"]
        # The resync fails with a recoverable error: resync required, retried after 1 minute.
        run_task(agent, job_id, "prepare resync")
        agent.post("/v1/agent/vms/web1/transition", {"to_state": "resyncing", "reason": "go"})
        agent.post("/v1/agent/vms/web1/cycles", {"session": PRIMARY, "release_lease": False,
                   "failure": {"message": "connection reset", "error_class": "recoverable",
                               "cause": "network error"}})  # fmt: skip
        agent.post(f"/v1/agent/jobs/{job_id}/tasks/compare and send blocks",
                   {"action": "fail", "error": "network error"})  # fmt: skip
        agent.post(f"/v1/agent/jobs/{job_id}/release", {"session": PRIMARY})
        (status,) = op.get("/v1/status", vm="web1")
        assert status["state"] == "resync required"
        assert agent.post("/v1/agent/claims", {"session": PRIMARY}) == []  # backoff: 1 minute
        # An operator's resync runs now.
        job = op.post("/v1/vms/web1/resync", {"reason": "disk replaced"})
        assert job["kind"] == "resynchronize" and job["details"]["trigger"] == "operator"
        with pytest.raises(Conflict, match="open resynchronize"):
            op.post("/v1/vms/web1/resync", {})
        (item,) = agent.post("/v1/agent/claims", {"session": PRIMARY})
        assert (item["kind"], item["job_id"]) == ("resynchronize", job["id"])
