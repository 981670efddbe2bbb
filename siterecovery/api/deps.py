"""What views depend on: the open vault, the options, the authenticated caller, and path
parameters that match their patterns.

Authentication is ``Authorization: Bearer SECRET`` with an operator's API token or a host's
credential (see :mod:`siterecovery.vault.access`). :func:`operator` makes a dependency that
also checks the token's role; :func:`agent` one that accepts hosts only. Every denial raises
:class:`NotAuthenticated` or :class:`PermissionDenied`, which the app logs and answers with
401 or 403.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from siterecovery.api.schemas import PATH_PATTERNS
from siterecovery.vault import access, limits, work
from siterecovery.vault.access import NotAuthenticated, PermissionDenied, Principal
from siterecovery.vault.auth_models import Role
from siterecovery.vault.db import Database

_bearer = HTTPBearer(auto_error=False, description="an API token or a host credential")


@dataclass(frozen=True)
class VaultOptions:
    """Knobs of a serving vault.

    ``heartbeat_timeout_s``: a host whose agent has not heartbeated for this long is
    *disconnected*; ``lease_s``: how long claimed work stays leased without news;
    ``max_body_bytes``: the longest request body accepted (413 beyond it).
    """

    heartbeat_timeout_s: float = 90.0
    lease_s: int = 300
    max_body_bytes: int = limits.MAX_BODY_BYTES


_PATH_RES = {name: re.compile(pattern) for name, pattern in PATH_PATTERNS.items()}


def path_params(request: Request) -> None:
    """422 (RequestValidationError) unless every path parameter matches, whole, the pattern
    :data:`PATH_PATTERNS` has for its name; a parameter without one is refused too, so a new
    route cannot skip the check. A router-wide dependency: it runs before authentication."""
    problems = []
    for name, value in request.path_params.items():
        pattern = _PATH_RES.get(name)
        if pattern is None or not isinstance(value, str) or pattern.fullmatch(value) is None:
            wanted = PATH_PATTERNS.get(name, "(no pattern declared)")
            problems.append({"type": "string_pattern_mismatch", "loc": ("path", name),
                             "msg": f"must match {wanted}", "input": value})  # fmt: skip
    if problems:
        raise RequestValidationError(problems)


def document_path_patterns(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the :data:`PATH_PATTERNS` to the path parameters of an OpenAPI ``schema``, in
    place (idempotent); returns it."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                pattern = PATH_PATTERNS.get(parameter.get("name", ""))
                if parameter.get("in") == "path" and pattern is not None:
                    parameter.setdefault("schema", {})["pattern"] = pattern
    return schema


def database(request: Request) -> Database:
    db = request.app.state.db
    assert isinstance(db, Database)
    return db


def options(request: Request) -> VaultOptions:
    value = request.app.state.options
    assert isinstance(value, VaultOptions)
    return value


def caller(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Principal:
    """The authenticated caller; NotAuthenticated without a valid bearer secret."""
    if credentials is None:
        raise NotAuthenticated("no credential: send `Authorization: Bearer SECRET`")
    principal = access.authenticate(database(request), secret=credentials.credentials)
    request.state.principal = principal
    return principal


def operator(role: Role) -> Callable[..., Principal]:
    """A dependency admitting operator tokens with at least ``role``."""

    def check(request: Request, who: Principal = Depends(caller)) -> Principal:
        access.require_role(who, role, f"{request.method} {request.url.path}")
        return who

    return check


def agent(request: Request, who: Principal = Depends(caller)) -> str:
    """A dependency admitting hosts only; returns the host's name."""
    return access.require_host(who, f"{request.method} {request.url.path}")


def require_own_vm(db: Database, host: str, vm: str) -> None:
    """PermissionDenied unless ``vm`` runs on ``host`` or ``host`` holds the VM's live work
    lease (a recovery host running the VM's failover job); UnknownVm if there is no such VM."""
    owner = access.host_of_vm(db, vm=vm)
    if owner != host and not work.holds_lease(db, host=host, vm=vm):
        raise PermissionDenied(
            f"host {host!r} may not touch VM {vm!r}: it belongs to another host and no work "
            "of it is leased to this one"
        )


READER = Depends(operator(Role.READER))
OPERATOR = Depends(operator(Role.OPERATOR))
ADMIN = Depends(operator(Role.ADMIN))
AGENT = Depends(agent)
DB = Depends(database)
OPTIONS = Depends(options)
PATH_PARAMS = Depends(path_params)
