"""The CLI as a client of the vault API over TLS: the same JSON as the embedded mode, pending
jobs for the agents, the reader's 403 with its reason, and bad combinations refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from api.test_http import register_host, report_vm
from api.vaultproc import VaultProcess, init_vault

from siterecovery.api.tls import ensure_pki
from siterecovery.vault.errors import InvalidJobState

CLI = [sys.executable, "-m", "siterecovery"]
SESSION = str(uuid.uuid4())


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[VaultProcess]:
    proc = VaultProcess(init_vault(tmp_path / "vault"))
    proc.start("--heartbeat-timeout", "1h")
    yield proc
    proc.stop()


def cli(vault: VaultProcess, *args: str, token: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run the CLI on the vault's work directory: through the API when ``token`` is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITERECOVERY_")}
    env["COLUMNS"] = "200"
    remote: list[str] = []
    if token is not None:
        env["SITERECOVERY_TOKEN"] = token
        remote = ["--vault", vault.url, "--ca", str(vault.ca)]
    argv = [*CLI, "--workdir", str(vault.settings.workdir), *remote, *args]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False,
                            timeout=120)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr}")
    return result


def as_json(vault: VaultProcess, *args: str, token: str | None = None) -> Any:
    return json.loads(cli(vault, *args, "--json", token=token).stdout)


def agent_protects(vault: VaultProcess, credential: str, job: dict[str, Any]) -> None:
    """What the VM's agent reports while it runs the enable protection job."""
    with vault.client(credential) as agent:
        agent.post("/v1/agent/heartbeat", {"session": SESSION})
        (item,) = agent.post("/v1/agent/claims", {"session": SESSION})
        assert item["job_id"] == job["id"]
        path = f"/v1/agent/jobs/{job['id']}/tasks"
        for n, task in enumerate(t["name"] for t in job["tasks"]):
            agent.post(f"{path}/{task}", {"action": "start"})
            if n == 2:
                agent.post("/v1/agent/vms/web1/transition",
                           {"to_state": "initial replication", "reason": "copy"})  # fmt: skip
                point = {"point_id": "p1", "created_at": datetime.now(UTC).isoformat(),
                         "consistency": "crash", "manifest_key": "points/web1/p1.json",
                         "bytes_shipped": 4096, "figures": {"duration_s": 1.5}}  # fmt: skip
                agent.post(
                    "/v1/agent/vms/web1/cycles",
                    {"session": SESSION, "point": point, "release_lease": False},
                )
            if n == 3:
                agent.post("/v1/agent/vms/web1/transition",
                           {"to_state": "protected", "reason": "done"})  # fmt: skip
            agent.post(f"{path}/{task}", {"action": "finish", "details": {"n": n}})
        agent.post(f"/v1/agent/jobs/{job['id']}/finish", {"session": SESSION})


def test_remote_cli_gives_the_embedded_json_and_queues_work(vault: VaultProcess) -> None:
    operator, reader = vault.token("op", "operator"), vault.token("ro", "reader")
    credential = register_host(vault, "kvm1")
    report_vm(vault, credential, "web1")
    out = cli(vault, "policy", "create", "gold", "--frequency", "30s", token=operator).stdout
    assert "policy gold created" in out
    jobs = as_json(vault, "jobs", token=operator)
    assert jobs == []
    cli(vault, "protect", "web1", "--policy", "gold", token=operator)
    (job,) = as_json(vault, "jobs", token=operator)
    assert (job["kind"], job["state"], job["vm"]) == ("enable protection", "pending", "web1")
    agent_protects(vault, credential, job)

    for args in (("vm", "list"), ("policy", "list"), ("points", "web1"), ("jobs",),
                 ("job", job["id"][:8])):  # fmt: skip
        embedded = as_json(vault, *args)
        assert as_json(vault, *args, token=operator) == embedded, args
        assert as_json(vault, *args, token=reader) == embedded, args
    (local,) = as_json(vault, "status")
    (remote,) = as_json(vault, "status", "web1", token=reader)
    moving = {"rpo_s", "health_reasons"}  # the RPO (in the reasons too) grows meanwhile
    assert {k: v for k, v in remote.items() if k not in moving} == {
        k: v for k, v in local.items() if k not in moving
    }
    assert remote["state"] == "protected" and remote["last_point_id"] == "p1"
    assert "p1" in cli(vault, "points", "web1", token=reader).stdout  # the table too

    # A reader cannot fail over: 403 with the reason, exit code 6 (vault), no job queued.
    denied = cli(vault, "failover", "web1", "--test", token=reader, check=False)
    assert denied.returncode == 6, denied.stderr
    assert "'ro' (reader) may not POST /v1/vms/web1/failover" in denied.stderr
    assert len(as_json(vault, "jobs", token=reader)) == 1
    # An operator can: the job waits for a recovery host's agent.
    queued = as_json(vault, "failover", "web1", "--test", token=operator)
    assert queued["web1"]["kind"] == "test failover" and queued["web1"]["state"] == "pending"
    resync = cli(vault, "resync", "web1", token=operator, check=False)
    assert resync.returncode == 6 and "open test failover job" in resync.stderr


def test_bad_combinations_and_missing_credentials_are_refused(
    vault: VaultProcess, tmp_path: Path
) -> None:
    token = vault.token("op", "operator")
    watch = cli(vault, "jobs", "--watch", "--json", token=token, check=False)
    assert watch.returncode == 2 and "--watch draws a live table" in watch.stderr
    (vault.settings.workdir / "admin.token").unlink(missing_ok=True)
    no_token = cli(vault, "--vault", vault.url, "jobs", check=False)
    assert no_token.returncode == 3 and "SITERECOVERY_TOKEN" in no_token.stderr
    plain = cli(vault, "--vault", "http://127.0.0.1:1", "jobs", token=token, check=False)
    assert plain.returncode == 2 and "not https://" in plain.stderr
    pki = ensure_pki(tmp_path / "pki2")
    wrong = subprocess.run(
        [*CLI, "--workdir", str(vault.settings.workdir), "--vault", vault.url,
         "--ca", str(pki.ca_cert), "jobs"],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "SITERECOVERY_TOKEN": token},
    )  # fmt: skip
    assert wrong.returncode == 6 and "unreachable" in wrong.stderr


def test_an_operator_cancels_a_job_through_the_api(vault: VaultProcess) -> None:
    operator, reader = vault.token("op", "operator"), vault.token("ro", "reader")
    credential = register_host(vault, "kvm1")
    report_vm(vault, credential, "web1")
    cli(vault, "policy", "create", "gold", token=operator)
    cli(vault, "protect", "web1", "--policy", "gold", token=operator)
    (job,) = as_json(vault, "jobs", token=operator)
    with vault.client(credential) as agent:
        agent.post("/v1/agent/claims", {"session": SESSION})
        agent.post(f"/v1/agent/jobs/{job['id']}/tasks/check prerequisites", {"action": "start"})
    denied = cli(vault, "job", "cancel", job["id"][:8], token=reader, check=False)
    assert denied.returncode == 6 and "needs the role 'operator'" in denied.stderr
    assert as_json(vault, "job", job["id"][:8], token=reader)["state"] == "running"
    done = as_json(vault, "job", "cancel", job["id"][:8], "--reason", "wrong VM", token=operator)
    assert done["state"] == "cancelled"
    assert done["error"] == "cancelled: wrong VM (by token 'op' (operator))"
    assert [t["state"] for t in done["tasks"]] == ["cancelled", "skipped", "skipped", "skipped"]
    (status,) = as_json(vault, "status", token=reader)
    assert status["state"] == "error"
    with vault.client(credential) as agent:  # the agent's lease and job are gone
        with pytest.raises(InvalidJobState, match="already ended 'cancelled'"):
            agent.post(f"/v1/agent/jobs/{job['id']}/tasks/check prerequisites",
                       {"action": "finish"})  # fmt: skip
        lease = agent.post("/v1/agent/vms/web1/lease", {"session": SESSION})
        assert lease == {"held": False, "expires_at": None}
    again = cli(vault, "job", "cancel", job["id"], token=operator, check=False)
    assert again.returncode == 6 and "already ended" in again.stderr
