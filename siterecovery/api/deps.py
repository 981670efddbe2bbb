"""What views depend on: the open vault, the options, and the authenticated caller.

Authentication is ``Authorization: Bearer SECRET`` with an operator's API token or a host's
credential (see :mod:`siterecovery.vault.access`). :func:`operator` makes a dependency that
also checks the token's role; :func:`agent` one that accepts hosts only. Every denial raises
:class:`NotAuthenticated` or :class:`PermissionDenied`, which the app logs and answers with
401 or 403.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from siterecovery.vault import access, work
from siterecovery.vault.access import NotAuthenticated, PermissionDenied, Principal
from siterecovery.vault.auth_models import Role
from siterecovery.vault.db import Database

_bearer = HTTPBearer(auto_error=False, description="an API token or a host credential")


@dataclass(frozen=True)
class VaultOptions:
    """Knobs of a serving vault.

    ``heartbeat_timeout_s``: a host whose agent has not heartbeated for this long is
    *disconnected*; ``lease_s``: how long claimed work stays leased without news.
    """

    heartbeat_timeout_s: float = 90.0
    lease_s: int = 300


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
