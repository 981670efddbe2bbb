"""Bounds on what callers send, over real HTTPS against a `vault serve` process: free-form
JSON depth and size, the request body limit, reported times, path parameters and null
settings. Every refusal is asserted with its status and with nothing written."""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from siterecovery.vault import limits
from siterecovery.vault.db import open_database
from siterecovery.vault.models import Vm

from .test_http import DISK, register_host, report_vm
from .vaultproc import VaultProcess


def nested(levels: int) -> dict[str, Any]:
    """A JSON object ``levels`` deep: ``{"a": {"a": ... {}}}``."""
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def raw(vault: VaultProcess, secret: str | None = None) -> httpx.Client:
    """A plain HTTPS client (no error mapping) to look at statuses and headers."""
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    context = ssl.create_default_context(cafile=str(vault.ca))
    return httpx.Client(base_url=vault.url, verify=context, headers=headers, timeout=30)


@pytest.fixture
def protected_vm(vault: VaultProcess, tokens: dict[str, str]) -> Iterator[tuple[str, str]]:
    """Host kvm1 with VM web1 (config ``{"cpus": 1}``), protected: its enable protection job
    claimed and its first task running. Yields (host credential, job id)."""
    cred = register_host(vault, "kvm1")
    with vault.client(cred) as agent:
        agent.put("/v1/agent/vms", {"vms": [{"name": "web1", "config": {"cpus": 1},
                                             "disks": [DISK]}]})  # fmt: skip
    with vault.client(tokens["operator"]) as op:
        op.post("/v1/policies", {"name": "gold", "copy_frequency_s": 30})
        job = op.post("/v1/vms/web1/protect", {"policy": "gold"})
    with vault.client(cred) as agent:
        agent.post("/v1/agent/claims", {"session": str(uuid.uuid4())})
        agent.post(f"/v1/agent/jobs/{job['id']}/tasks/check prerequisites", {"action": "start"})
    yield cred, job["id"]


def snapshot(vault: VaultProcess, token: str) -> dict[str, Any]:
    """What operators see: the listings a bad report must neither change nor break."""
    with raw(vault, token) as reader:
        answers = {path: reader.get(path) for path in ("/v1/vms", "/v1/jobs", "/v1/status")}
    assert {p: a.status_code for p, a in answers.items()} == dict.fromkeys(answers, 200)
    return {path: answer.json() for path, answer in answers.items()}


def cycle(point_id: str, *, figures: Any = None, at: str | None = None) -> dict[str, Any]:
    return {"session": str(uuid.uuid4()), "release_lease": False, "point": {
        "point_id": point_id, "created_at": at or datetime.now(UTC).isoformat(),
        "consistency": "crash", "manifest_key": f"points/{point_id}.json",
        "figures": {} if figures is None else figures}}  # fmt: skip


# ---- 1. free-form JSON ---------------------------------------------------------------------


def test_deep_or_large_free_form_json_is_refused_and_listings_keep_working(
    vault: VaultProcess, tokens: dict[str, str], protected_vm: tuple[str, str]
) -> None:
    cred, job = protected_vm
    before = snapshot(vault, tokens["reader"])
    task = f"/v1/agent/jobs/{job}/tasks/check prerequisites"
    big = {"blob": "x" * (limits.MAX_JSON_BYTES + 1)}
    reports = {
        "config": lambda v: ("PUT", "/v1/agent/vms",
                             {"vms": [{"name": "web1", "config": v, "disks": [DISK]}]}),
        "details": lambda v: ("POST", task, {"action": "progress", "progress": 5, "details": v}),
        "figures": lambda v: ("POST", "/v1/agent/vms/web1/cycles", cycle("p1", figures=v)),
    }  # fmt: skip
    with raw(vault, cred) as agent:
        for field, make in reports.items():
            for value in (nested(17), nested(490), nested(800), big):
                method, path, body = make(value)
                answer = agent.request(method, path, json=body)
                assert answer.status_code == 422, (field, answer.text)
                message = answer.json()["message"]
                assert "nested deeper than" in message or "bytes serialized" in message
    assert snapshot(vault, tokens["reader"]) == before  # nothing was written
    with raw(vault, cred) as agent:  # the bounds themselves are accepted
        for field, make in reports.items():
            method, path, body = make(nested(limits.MAX_JSON_DEPTH))
            assert agent.request(method, path, json=body).status_code == 200, field
    after = snapshot(vault, tokens["reader"])
    assert after["/v1/vms"][0]["config"] == nested(limits.MAX_JSON_DEPTH)
    assert after["/v1/status"][0]["last_cycle"] == nested(limits.MAX_JSON_DEPTH)


def test_task_details_are_bounded_after_merging_reports(
    vault: VaultProcess, tokens: dict[str, str], protected_vm: tuple[str, str]
) -> None:
    cred, job = protected_vm
    task = f"/v1/agent/jobs/{job}/tasks/check prerequisites"
    half = "x" * (limits.MAX_JSON_BYTES // 2)
    with raw(vault, cred) as agent:
        first = agent.post(task, json={"action": "progress", "progress": 10,
                                       "details": {"a": half}})  # fmt: skip
        assert first.status_code == 200
        second = agent.post(task, json={"action": "progress", "progress": 20,
                                        "details": {"b": half}})  # fmt: skip
        assert second.status_code == 422 and second.json()["error"] == "LimitExceeded"
    with vault.client(tokens["reader"]) as reader:
        (step, *_) = reader.get(f"/v1/jobs/{job}")["tasks"]
    assert (step["progress"], list(step["details"])) == (10, ["a"])  # the refusal changed nothing


def test_a_stored_value_beyond_the_bounds_is_withheld_not_a_500(
    vault: VaultProcess, tokens: dict[str, str]
) -> None:
    """A row written before the bounds existed (here: straight into the database)."""
    report_vm(vault, register_host(vault, "kvm1"), "web1")
    db = open_database(vault.settings.vault_url)
    try:
        with db.transaction() as session:
            session.query(Vm).filter(Vm.name == "web1").one().config = nested(490)
    finally:
        db.close()
    with vault.client(tokens["reader"]) as reader:
        (vm,) = reader.get("/v1/vms")
        assert "deeper than 16 levels" in vm["config"]["withheld"]
        assert reader.get("/v1/vms/web1")["config"] == vm["config"]
    assert "config of VM 'web1' withheld" in vault.log.read_text()


# ---- 2. request body limit -----------------------------------------------------------------


def test_a_body_over_the_limit_is_413_before_it_is_parsed(vault: VaultProcess) -> None:
    huge = json.dumps({"key": "srk_x", "host": "h1",
                       **{f"k{i}": i for i in range(400_000)}}).encode()  # fmt: skip
    assert len(huge) > 4_000_000
    stalled: list[float] = []

    def probe() -> None:
        with raw(vault) as client:
            for _ in range(5):
                start = time.monotonic()
                assert client.get("/healthz").status_code == 200
                stalled.append(time.monotonic() - start)

    with raw(vault) as anonymous:
        prober = threading.Thread(target=probe)
        prober.start()
        start = time.monotonic()
        declared = anonymous.post("/v1/agent/register", content=huge,
                                  headers={"content-type": "application/json"})  # fmt: skip
        took = time.monotonic() - start
        prober.join()
        streamed = anonymous.post("/v1/agent/register", content=iter([huge[:600_000]] * 2),
                                  headers={"content-type": "application/json"})  # fmt: skip
        just_under = anonymous.post("/v1/agent/register", json={
            "key": "srk_x", "host": "h1", "pad": "x" * (limits.MAX_BODY_BYTES - 100)})  # fmt: skip
    for answer in (declared, streamed):
        assert answer.status_code == 413, answer.text
        assert answer.json()["error"] == "PayloadTooLarge" and answer.json()["hint"]
    assert "transfer-encoding" not in declared.request.headers  # Content-Length was declared
    assert streamed.request.headers["transfer-encoding"] == "chunked"  # counted as it came
    assert just_under.status_code == 422  # read, parsed, and refused by the schema
    assert took < 2 and max(stalled) < 2, (took, stalled)
    with vault.client(vault.token("admin", "admin")) as admin:
        assert admin.get("/v1/hosts") == []


def test_the_body_limit_is_a_vault_option(vault: VaultProcess, tokens: dict[str, str]) -> None:
    vault.stop()
    vault.start("--max-body", "4KiB")
    cred = register_host(vault, "kvm1")
    with raw(vault, cred) as agent:
        vms = [{"name": "web1", "config": {"pad": "x" * 5000}, "disks": [DISK]}]
        assert agent.put("/v1/agent/vms", json={"vms": vms}).status_code == 413
        vms[0]["config"] = {"pad": "x" * 3000}
        assert agent.put("/v1/agent/vms", json={"vms": vms}).status_code == 200


# ---- 4. times ------------------------------------------------------------------------------


def test_cycle_times_outside_protection_and_the_clock_are_refused(
    vault: VaultProcess, tokens: dict[str, str], protected_vm: tuple[str, str]
) -> None:
    cred, _ = protected_vm
    now = datetime.now(UTC)
    skew = timedelta(seconds=limits.CLOCK_SKEW_S)
    with raw(vault, cred) as agent:
        for at in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59Z",
                   "9999-12-31T23:00:00-14:00", (now + skew + timedelta(minutes=1)).isoformat(),
                   (now - skew - timedelta(hours=1)).isoformat()):  # fmt: skip
            answer = agent.post("/v1/agent/vms/web1/cycles", json=cycle("p1", at=at))
            assert answer.status_code == 422, (at, answer.text)
    with vault.client(tokens["reader"]) as reader:
        assert reader.get("/v1/vms/web1/points") == []  # nothing recorded
        assert reader.get("/v1/status")[0]["last_point_id"] is None
    with vault.client(cred) as agent:  # a clock a little ahead is tolerated
        ahead = (now + timedelta(seconds=30)).isoformat()
        agent.post("/v1/agent/vms/web1/cycles", cycle("p1", at=ahead))
    with vault.client(tokens["reader"]) as reader:
        assert [p["point_id"] for p in reader.get("/v1/vms/web1/points")] == ["p1"]


# ---- 5. schema -----------------------------------------------------------------------------


def test_path_parameters_must_match_their_patterns(
    vault: VaultProcess, tokens: dict[str, str], protected_vm: tuple[str, str]
) -> None:
    cred, job = protected_vm
    with raw(vault, tokens["admin"]) as admin:
        for path in ("/v1/vms/bad%20name", "/v1/vms/web1%0A", "/v1/vms/-web1/points",
                     "/v1/jobs/nope", f"/v1/jobs/{job}%0A", "/v1/policies/gold%0A"):  # fmt: skip
            answer = admin.get(path)
            assert answer.status_code == 422, (path, answer.text)
            assert "must match" in answer.json()["message"]
        assert admin.delete("/v1/tokens/t-reader%0A").status_code == 422
        assert admin.get("/v1/tokens").json()[1]["revoked_at"] is None  # nothing revoked
    with raw(vault, cred) as agent:
        bad_task = f"/v1/agent/jobs/{job}/tasks/%3Bdrop"
        assert agent.post(bad_task, json={"action": "start"}).status_code == 422
        assert agent.get("/v1/agent/vms/web1%0A").status_code == 422
    with vault.client() as anonymous:
        paths = anonymous.get("/openapi.json")["paths"]
    parameters = [p for ops in paths.values() for op in ops.values()
                  for p in op.get("parameters", []) if p["in"] == "path"]  # fmt: skip
    assert parameters and all(p["schema"].get("pattern") for p in parameters)


def test_required_policy_settings_cannot_be_patched_to_null(
    vault: VaultProcess, tokens: dict[str, str]
) -> None:
    with raw(vault, tokens["operator"]) as op:
        created = op.post("/v1/policies", json={"name": "gold", "bandwidth_work_mbps": 10})
        for setting in ("copy_frequency_s", "retention_h", "app_consistent_h", "resync_window",
                        "encryption"):  # fmt: skip
            answer = op.patch("/v1/policies/gold", json={setting: None})
            assert answer.status_code == 422, (setting, answer.text)
            assert "not null" in answer.json()["message"]
        assert op.get("/v1/policies/gold").json() == created.json()
        unlimited = op.patch("/v1/policies/gold", json={"bandwidth_work_mbps": None})
        assert unlimited.status_code == 200 and unlimited.json()["bandwidth_work_mbps"] is None


def test_agent_sessions_must_be_uuids(vault: VaultProcess) -> None:
    cred = register_host(vault, "kvm1")
    with raw(vault, cred) as agent:
        for session in ("-" * 36, "0" * 32, "g" * 32, str(uuid.uuid4()) + "\n"):
            for path in ("/v1/agent/heartbeat", "/v1/agent/claims"):
                answer = agent.post(path, json={"session": session})
                assert answer.status_code == 422, (session, path, answer.text)
    with vault.client(vault.token("admin", "admin")) as admin:
        assert admin.get("/v1/hosts")[0]["host"]["last_heartbeat"] is None


def test_405_names_every_method_of_the_path(vault: VaultProcess, tokens: dict[str, str]) -> None:
    with raw(vault, tokens["admin"]) as admin:
        for method, path, allowed in (
            ("DELETE", "/v1/policies", "GET, HEAD, POST"),
            ("POST", "/v1/policies/gold", "GET, HEAD, PATCH"),
            ("GET", "/v1/vms/web1/policy", "PUT"),
            ("PUT", "/v1/tokens", "GET, HEAD, POST"),
        ):
            answer = admin.request(method, path)
            assert answer.status_code == 405, (method, path)
            assert answer.headers["allow"] == allowed, (method, path)
            assert answer.json()["error"] == "HTTPError"
