"""The vault as the CLI's operator commands see it: one small interface, two ways to reach it.

:class:`VaultFacade` is what ``vm list``, ``policy create/list``, ``protect``, ``status``,
``points``, ``jobs``, ``job show``, ``resync`` and ``failover …`` call. Every method returns
plain JSON values (dicts and lists, times as ISO 8601 text with ``+00:00``), so a command
prints the same table and the same ``--json`` document whichever implementation answers:

- :class:`RemoteVault` — the CLI is just another client of the vault API (``VaultClient``
  over pinned TLS, with an operator token). Work is done by agents: ``protect``, ``resync``
  and failover answer with the **pending job** they queued;
- :class:`LocalVault` — the embedded default: the vault database of the work directory
  opened directly, for ``demo`` and a work directory without a running vault. Work runs in
  this process (``protect`` copies the disks now) and the **finished job** is returned.

:func:`open_vault` picks one from the invocation's settings (see :class:`VaultTarget`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from siterecovery.cli.output import to_jsonable
from siterecovery.errors import InputError, NotFoundError

if TYPE_CHECKING:
    from siterecovery.agent.embedded import EmbeddedAgent
    from siterecovery.api.client import VaultClient
    from siterecovery.cli.context import Env

Doc = dict[str, Any]
ENV_VAULT, ENV_TOKEN = "SITERECOVERY_VAULT", "SITERECOVERY_TOKEN"
TOKEN_FILE = "admin.token"


class VaultFacade(Protocol):
    """What operator commands need from the vault (JSON values in, JSON values out)."""

    remote: bool

    def close(self) -> None: ...
    def list_vms(self) -> list[Doc]: ...
    def create_policy(self, settings: Doc) -> Doc: ...
    def list_policies(self) -> list[Doc]: ...
    def protect(self, vm: str, policy: str) -> tuple[Doc, str | None]:
        """The enable protection job and, when it ran here, a summary of the initial copy."""
        ...

    def unprotect(self, vm: str) -> Doc:
        """The disable protection job (finished when it ran here, else pending)."""
        ...

    def reverse_replicate(self, vm: str) -> tuple[Doc, Doc]:
        """The reverse replication job and its figures (empty when an agent runs it later)."""
        ...

    def status(self, vm: str | None) -> list[Doc]: ...
    def points(self, vm: str) -> list[Doc]: ...
    def jobs(self, vm: str | None, limit: int) -> list[Doc]: ...
    def job(self, prefix: str) -> Doc:
        """The one job whose id starts with ``prefix``; InputError if not exactly one."""
        ...

    def cancel_job(self, prefix: str, reason: str | None) -> Doc:
        """Cancel the one open job whose id starts with ``prefix``: the cancelled job."""
        ...

    def resync(self, vm: str, *, full: bool) -> tuple[Doc, Doc]:
        """The resync job and its figures (empty when an agent runs it later)."""
        ...

    def request_failover(self, vm: str, kind: str, point: str | None, options: Doc) -> Doc: ...
    def follow_up(self, vm: str, operation: str, point: str | None = None) -> Doc:
        """``cleanup``, ``change-point`` (with ``point``) or ``commit``: the job."""
        ...


@dataclass(frozen=True)
class VaultTarget:
    """Where a remote vault is: its https URL, the operator's token and the pinned CA."""

    url: str
    token: str
    ca_file: Path

    @classmethod
    def resolve(cls, env: Env) -> VaultTarget | None:
        """The remote vault of this invocation, or None for the embedded vault.

        The URL comes from ``--vault``, ``$SITERECOVERY_VAULT`` or an https ``vault_url`` in
        ``WORKDIR/siterecovery.json``; the token from ``$SITERECOVERY_TOKEN`` or
        ``WORKDIR/admin.token``; the CA from ``--ca`` or ``WORKDIR/pki/ca.pem``.
        """
        workdir = env.settings.workdir
        url = env.vault_url or os.environ.get(ENV_VAULT) or None
        if url is None and env.settings.vault_url.startswith("https://"):
            url = env.settings.vault_url
        if url is None:
            return None
        if not url.startswith("https://"):
            raise InputError(f"vault URL {url!r} is not https://", hint="the vault serves HTTPS")
        ca = env.ca_file or workdir / "pki" / "ca.pem"
        if not ca.is_file():
            raise NotFoundError(f"no CA certificate at {ca} to pin the vault's TLS with",
                                hint="pass --ca FILE (the vault's WORKDIR/pki/ca.pem)")  # fmt: skip
        return cls(url, _token(workdir), ca)


def _token(workdir: Path) -> str:
    token = os.environ.get(ENV_TOKEN, "").strip()
    path = workdir / TOKEN_FILE
    if not token and path.is_file():
        token = path.read_text().strip()
    if not token:
        raise NotFoundError(
            "no API token for the vault",
            hint=f"set ${ENV_TOKEN} (`siterecovery token create NAME --role operator` on the "
            f"vault's host) or put it in {path}",
        )
    return token


def open_vault(env: Env) -> VaultFacade:
    """The vault of this invocation: remote when one is configured, else the embedded one."""
    target = VaultTarget.resolve(env)
    if target is None:
        return LocalVault(env)
    from siterecovery.api.client import VaultClient

    client = VaultClient(target.url, ca_file=target.ca_file, secret=target.token,
                         retry_for_s=5)  # fmt: skip
    return RemoteVault(client)


# ---- the API ---------------------------------------------------------------------------------


_UTC_Z = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z$")


def normalized(value: Any) -> Any:
    """API JSON with times as Python writes them (``…+00:00``, not ``…Z``)."""
    if isinstance(value, str):
        match = _UTC_Z.match(value)
        return f"{match[1]}+00:00" if match else value
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    return value


class RemoteVault:
    """The vault API through ``client``; work is queued as jobs for the agents."""

    remote = True

    def __init__(self, client: VaultClient) -> None:
        self.client = client

    def close(self) -> None:
        self.client.close()

    def _get(self, path: str, **params: Any) -> Any:
        return normalized(self.client.get(path, **params))

    def _post(self, path: str, body: Any = None) -> Any:
        return normalized(self.client.post(path, body))

    def list_vms(self) -> list[Doc]:
        return list(self._get("/v1/vms"))

    def create_policy(self, settings: Doc) -> Doc:
        return dict(self._post("/v1/policies", settings))

    def list_policies(self) -> list[Doc]:
        return list(self._get("/v1/policies"))

    def protect(self, vm: str, policy: str) -> tuple[Doc, str | None]:
        return dict(self._post(f"/v1/vms/{vm}/protect", {"policy": policy})), None

    def unprotect(self, vm: str) -> Doc:
        return dict(self._post(f"/v1/vms/{vm}/unprotect"))

    def reverse_replicate(self, vm: str) -> tuple[Doc, Doc]:
        return dict(self._post(f"/v1/vms/{vm}/reverse-replicate")), {}

    def status(self, vm: str | None) -> list[Doc]:
        return list(self._get("/v1/status", vm=vm))

    def points(self, vm: str) -> list[Doc]:
        return list(self._get(f"/v1/vms/{vm}/points"))

    def jobs(self, vm: str | None, limit: int) -> list[Doc]:
        return list(self._get("/v1/jobs", vm=vm, limit=limit))

    def job(self, prefix: str) -> Doc:
        if len(prefix) == 36:
            return dict(self._get(f"/v1/jobs/{prefix}"))
        return _one_job(prefix, self.jobs(None, 1000))

    def cancel_job(self, prefix: str, reason: str | None) -> Doc:
        job_id = self.job(prefix)["id"]
        return dict(self._post(f"/v1/jobs/{job_id}/cancel", {"reason": reason} if reason else {}))

    def resync(self, vm: str, *, full: bool) -> tuple[Doc, Doc]:
        return dict(self._post(f"/v1/vms/{vm}/resync", {"full": full})), {}

    def request_failover(self, vm: str, kind: str, point: str | None, options: Doc) -> Doc:
        body = {"kind": kind, "point": point, "options": options}
        return dict(self._post(f"/v1/vms/{vm}/failover", body))

    def follow_up(self, vm: str, operation: str, point: str | None = None) -> Doc:
        body = {"point": point} if operation == "change-point" else None
        return dict(self._post(f"/v1/vms/{vm}/failover/{operation}", body))


# ---- the embedded vault ----------------------------------------------------------------------


class LocalVault:
    """The work directory's vault database, opened directly; work runs in this process."""

    remote = False

    def __init__(self, env: Env) -> None:
        self.env = env

    def close(self) -> None:
        """Nothing of its own: the Env closes the database."""

    def list_vms(self) -> list[Doc]:
        from siterecovery.vault import service

        return _docs(service.list_vms(self.env.db()))

    def create_policy(self, settings: Doc) -> Doc:
        from siterecovery.vault import service

        return _doc(service.create_policy(self.env.db(), **settings))

    def list_policies(self) -> list[Doc]:
        from siterecovery.vault import service

        return _docs(service.list_policies(self.env.db()))

    def protect(self, vm: str, policy: str) -> tuple[Doc, str | None]:
        from siterecovery.agent.embedded import EmbeddedAgent
        from siterecovery.cli.output import size

        env = self.env
        service_ = EmbeddedAgent(env.db(), env.store(), env.settings.run_dir)
        job, result = service_.enable_protection(vm, policy)
        summary = (f"initial replication: {size(result.bytes_read)} read, "
                   f"{size(result.bytes_shipped)} stored in {result.duration_s:.2f} s; "
                   f"recovery point {result.point.point_id}")  # fmt: skip
        return _doc(job), summary

    def _agent(self) -> EmbeddedAgent:
        from siterecovery.agent.embedded import EmbeddedAgent

        env = self.env
        return EmbeddedAgent(env.db(), env.store(), env.settings.run_dir,
                             recovery_dir=env.settings.recovery_dir,
                             key_file=env.settings.key_file)  # fmt: skip

    def unprotect(self, vm: str) -> Doc:
        return _doc(self._agent().unprotect(vm))

    def reverse_replicate(self, vm: str) -> tuple[Doc, Doc]:
        job, result = self._agent().reverse_replicate(vm)
        return _doc(job), {**result.figures(), "point": result.point.point_id}

    def status(self, vm: str | None) -> list[Doc]:
        from siterecovery.vault import work

        # No agents report here: host heartbeats say nothing about health.
        return _docs(work.status(self.env.db(), vm=vm, heartbeat_timeout_s=None))

    def points(self, vm: str) -> list[Doc]:
        from siterecovery.vault import points

        return _docs(points.list_points(self.env.db(), vm=vm))

    def jobs(self, vm: str | None, limit: int) -> list[Doc]:
        from siterecovery.vault import jobs

        return _docs(jobs.list_jobs(self.env.db(), vm=vm, limit=limit))

    def job(self, prefix: str) -> Doc:
        return _one_job(prefix, self.jobs(None, 1000))

    def cancel_job(self, prefix: str, reason: str | None) -> Doc:
        from siterecovery.vault import operations

        job_id = str(self.job(prefix)["id"])
        why = reason or "cancelled by the operator"
        return _doc(operations.cancel_job(self.env.db(), job=job_id, reason=why))

    def resync(self, vm: str, *, full: bool) -> tuple[Doc, Doc]:
        from siterecovery.agent.embedded import EmbeddedAgent

        env = self.env
        job, result = EmbeddedAgent(env.db(), env.store(), env.settings.run_dir).resync(
            vm, full=full
        )
        if result is None:  # a resumed job had sent its blocks: its figures are in the task
            return _doc(job), dict(job.task("compare and send blocks").details)
        return _doc(job), {**result.figures(), "point": result.point.point_id}

    def request_failover(self, vm: str, kind: str, point: str | None, options: Doc) -> Doc:
        raise InputError(
            "without a vault API the failover runs here: use `siterecovery failover VM --KIND`",
            hint="or pass --vault URL to ask the vault's recovery agents",
        )

    def follow_up(self, vm: str, operation: str, point: str | None = None) -> Doc:
        from siterecovery.agent.embedded import EmbeddedFailover

        env = self.env
        failover = EmbeddedFailover(
            env.db(),
            env.store(),
            env.settings.recovery_dir,
            key_file=env.settings.key_file,
            run_dir=env.settings.run_dir,
        )
        if operation == "cleanup":
            return _doc(failover.cleanup(vm))
        if operation == "commit":
            return _doc(failover.commit(vm))
        if point is None:
            raise InputError("say which recovery point to change to", hint="--point ID")
        outcome = failover.change_point(vm, point)
        outcome.process.detach()  # the replica outlives this command
        return _doc(outcome.job)


def _doc(record: Any) -> Doc:
    value = to_jsonable(record)
    assert isinstance(value, dict)
    return value


def _docs(records: Any) -> list[Doc]:
    return [_doc(r) for r in records]


def _one_job(prefix: str, jobs: list[Doc]) -> Doc:
    matches = [j for j in jobs if str(j["id"]).startswith(prefix)]
    if len(matches) != 1:
        raise InputError(
            f"{len(matches)} jobs match {prefix!r}", hint="give more characters of the job id"
        )
    return matches[0]


def as_mapping(doc: Any) -> Mapping[str, Any]:
    """``doc`` as a mapping (for callers that type-check JSON)."""
    if not isinstance(doc, Mapping):
        raise InputError(f"the vault answered {type(doc).__name__}, not an object")
    return doc
