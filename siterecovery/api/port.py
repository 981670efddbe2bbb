"""``RemoteVaultPort``: the vault port (:class:`siterecovery.vault.port.VaultPort`) over the
agents' API, for an agent on a host that reaches the vault over the network.

Each method is one call of ``/v1/agent`` (docs/api.md) through the CA-pinned
:class:`~siterecovery.api.client.VaultClient` with the host's credential; answers are parsed
into the same frozen records the local adapter returns (pydantic validates them, so a
malformed answer is an error here, not deep inside a service), and error bodies come back as
the same error classes (:func:`siterecovery.api.errors.error_from_response`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any, TypeVar

from pydantic import TypeAdapter

from siterecovery.api.client import VaultClient
from siterecovery.domain import ReplicationState
from siterecovery.vault.networks import MappingRecord
from siterecovery.vault.port import DiscoveredVm, Discovery, FailureReport, PointReport
from siterecovery.vault.records import JobRecord, PointRecord, ReplicatedVmRecord, VmRecord
from siterecovery.vault.work import WorkItem

T = TypeVar("T")
_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def parse(kind: Any, value: Any) -> Any:
    """``value`` (decoded JSON) validated as ``kind`` (a record type or ``list[...]``)."""
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter.validate_python(value)


class RemoteVaultPort:
    """:class:`~siterecovery.vault.port.VaultPort` over the agents' API."""

    def __init__(self, client: VaultClient, *, host: str, session: str) -> None:
        self.client = client
        self.host = host
        self.session = session

    # -- host -----------------------------------------------------------------------------

    def now(self) -> datetime:
        return self.heartbeat()

    def heartbeat(self) -> datetime:
        answer = self.client.post("/v1/agent/heartbeat", {"session": self.session})
        return datetime.fromisoformat(str(answer["now"]).replace("Z", "+00:00"))

    def report_vms(self, vms: Sequence[DiscoveredVm]) -> Discovery:
        body = {"vms": [_vm_payload(vm) for vm in vms]}
        answer = self.client.put("/v1/agent/vms", body)
        return Discovery(tuple(answer["registered"]), dict(answer["refused"]))

    def claim(self, *, limit: int, lease_s: int) -> list[WorkItem]:
        body = {"session": self.session, "limit": limit, "lease_s": lease_s}
        items: list[WorkItem] = parse(list[WorkItem], self.client.post("/v1/agent/claims", body))
        return items

    def extend_lease(self, vm: str, *, lease_s: int) -> bool:
        body = {"session": self.session, "lease_s": lease_s}
        return bool(self.client.post(f"/v1/agent/vms/{vm}/lease", body)["held"])

    def release_lease(self, vm: str) -> None:
        self.client.post(f"/v1/agent/vms/{vm}/release", {"session": self.session})

    # -- reading --------------------------------------------------------------------------

    def vm(self, name: str) -> VmRecord:
        record: VmRecord = parse(VmRecord, self.client.get(f"/v1/agent/vms/{name}"))
        return record

    def protection(self, vm: str) -> ReplicatedVmRecord:
        answer = self.client.get(f"/v1/agent/vms/{vm}/protection")
        record: ReplicatedVmRecord = parse(ReplicatedVmRecord, answer)
        return record

    def points(self, vm: str) -> list[PointRecord]:
        found: list[PointRecord] = parse(
            list[PointRecord], self.client.get(f"/v1/agent/vms/{vm}/points")
        )
        return found

    def latest_point(self, vm: str) -> PointRecord | None:
        answer = self.client.get(f"/v1/agent/vms/{vm}/points", latest="true")
        found: list[PointRecord] = parse(list[PointRecord], answer)
        return found[-1] if found else None

    def network_mappings(self) -> list[MappingRecord]:
        found: list[MappingRecord] = parse(
            list[MappingRecord], self.client.get("/v1/agent/network-mappings")
        )
        return found

    # -- state ----------------------------------------------------------------------------

    def transition(self, vm: str, to_state: ReplicationState, reason: str) -> ReplicatedVmRecord:
        body = {"to_state": str(to_state), "reason": reason}
        answer = self.client.post(f"/v1/agent/vms/{vm}/transition", body)
        record: ReplicatedVmRecord = parse(ReplicatedVmRecord, answer)
        return record

    def record_point(self, vm: str, point: PointReport, *, release: bool) -> ReplicatedVmRecord:
        doc = {**asdict(point), "created_at": point.created_at.isoformat(),
               "consistency": str(point.consistency), "figures": dict(point.figures)}  # fmt: skip
        return self._cycle(vm, {"point": doc}, release)

    def record_failure(
        self, vm: str, failure: FailureReport, *, release: bool
    ) -> ReplicatedVmRecord:
        doc = {**asdict(failure), "error_class": str(failure.error_class)}
        return self._cycle(vm, {"failure": doc}, release)

    def _cycle(self, vm: str, report: dict[str, Any], release: bool) -> ReplicatedVmRecord:
        body = {"session": self.session, "release_lease": release, **report}
        answer = self.client.post(f"/v1/agent/vms/{vm}/cycles", body)
        record: ReplicatedVmRecord = parse(ReplicatedVmRecord, answer["protection"])
        return record

    # -- jobs -----------------------------------------------------------------------------

    def job(self, job_id: str) -> JobRecord:
        return _job(self.client.get(f"/v1/agent/jobs/{job_id}"))

    def start_task(self, job_id: str, task: str) -> JobRecord:
        return self._task(job_id, task, {"action": "start"})

    def update_task(
        self, job_id: str, task: str, *, progress: int, details: Mapping[str, Any]
    ) -> JobRecord:
        body = {"action": "progress", "progress": progress, "details": dict(details)}
        return self._task(job_id, task, body)

    def finish_task(self, job_id: str, task: str, details: Mapping[str, Any]) -> JobRecord:
        return self._task(job_id, task, {"action": "finish", "details": dict(details)})

    def fail_task(self, job_id: str, task: str, error: str) -> JobRecord:
        return self._task(job_id, task, {"action": "fail", "error": error[:10_000]})

    def _task(self, job_id: str, task: str, body: dict[str, Any]) -> JobRecord:
        return _job(self.client.post(f"/v1/agent/jobs/{job_id}/tasks/{task}", body))

    def finish_job(self, job_id: str) -> JobRecord:
        body = {"session": self.session}
        return _job(self.client.post(f"/v1/agent/jobs/{job_id}/finish", body))

    def release_job(self, job_id: str) -> JobRecord:
        body = {"session": self.session}
        return _job(self.client.post(f"/v1/agent/jobs/{job_id}/release", body))

    def hand_off(self, job_id: str, phase: str, details: Mapping[str, Any]) -> JobRecord:
        body = {"session": self.session, "phase": phase, "details": dict(details)}
        return _job(self.client.post(f"/v1/agent/jobs/{job_id}/handoff", body))


def _job(answer: Any) -> JobRecord:
    record: JobRecord = parse(JobRecord, answer)
    return record


def _vm_payload(vm: DiscoveredVm) -> dict[str, Any]:
    return {
        "name": vm.name,
        "config": dict(vm.config),
        "disks": [{"name": d.name, "size": d.size, "node_name": d.node_name, "path": d.path,
                   "fmt": d.fmt if d.fmt in ("qcow2", "raw") else "raw"}
                  for d in vm.disks],
    }  # fmt: skip
