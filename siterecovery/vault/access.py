"""Who may talk to the vault: operators' API tokens, registration keys, host credentials.

Secrets are random 256-bit values with a readable prefix (``srt_`` token, ``srk_``
registration key, ``srh_`` host credential); the vault stores only their SHA-256 digest and
hands a secret out exactly once, when it is made. Roles (:class:`Role`) are ordered: a role
may do what every lower role may.

Errors::

    VaultError
    ├── NotAuthenticated   no, unknown, expired or revoked secret (HTTP 401)
    └── PermissionDenied   a known caller asks for what its role or host may not do (403)

Functions take the Database positionally, the rest by keyword; one transaction each.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from siterecovery.domain import validate_name
from siterecovery.errors import NotFoundError, VaultError
from siterecovery.vault import checks, rows
from siterecovery.vault.auth_models import ApiToken, RegistrationKey, Role
from siterecovery.vault.db import Database
from siterecovery.vault.errors import Conflict
from siterecovery.vault.models import Host, Site, SiteRole

TOKEN_PREFIX = "srt_"
KEY_PREFIX = "srk_"
HOST_PREFIX = "srh_"
#: Longest lifetime of a registration key (the seed's vault credentials last 5 days).
MAX_KEY_TTL_S = 5 * 86400
MAX_TOKEN_TTL_S = 10 * 365 * 86400


class NotAuthenticated(VaultError):
    """The caller presented no secret, or one the vault does not accept."""

    hint = "pass a valid API token (or host credential) as `Authorization: Bearer SECRET`"


class PermissionDenied(VaultError):
    """The caller is known but may not do this."""

    hint = "use a token with a higher role, or act only on this host's own VMs and jobs"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: an operator token (``role`` set) or a host (``host`` set)."""

    name: str
    role: Role | None = None
    host: str | None = None

    @property
    def label(self) -> str:
        return f"host {self.host!r}" if self.host else f"token {self.name!r} ({self.role})"


@dataclass(frozen=True)
class TokenRecord:
    name: str
    role: Role
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class Registration:
    """What a host gets back from registering: its name, site and its own credential."""

    host: str
    site: str
    credential: str


def digest(secret: str) -> str:
    """The stored form of a secret: hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def _ttl(kind: str, seconds: int | None, high: int) -> timedelta | None:
    if seconds is None:
        return None
    return timedelta(seconds=checks.integer(kind, seconds, low=1, high=high))


# ---- operator tokens -----------------------------------------------------------------------


def create_token(
    db: Database, /, *, name: str, role: Role | str, ttl_s: int | None = None
) -> tuple[TokenRecord, str]:
    """Make an API token; return its record and its secret (shown this once). Conflict if
    the name is taken (revoked tokens keep their name)."""
    validate_name("token", name)
    wanted = checks.member("role", Role, role)
    life = _ttl("token lifetime (seconds)", ttl_s, MAX_TOKEN_TTL_S)
    secret = _new_secret(TOKEN_PREFIX)
    with db.transaction() as session:
        if session.scalars(select(ApiToken.id).where(ApiToken.name == name)).first():
            raise Conflict(f"a token named {name!r} already exists")
        now = db.now()
        row = ApiToken(
            name=name, role=wanted.value, secret_digest=digest(secret), created_at=now,
            expires_at=now + life if life else None, revoked_at=None,
        )  # fmt: skip
        session.add(row)
        return _token_record(row), secret


def revoke_token(db: Database, /, *, name: str) -> TokenRecord:
    """Revoke the token ``name`` now (idempotent); NotFoundError if there is none."""
    validate_name("token", name)
    with db.transaction() as session:
        row = session.scalars(select(ApiToken).where(ApiToken.name == name)).one_or_none()
        if row is None:
            raise UnknownToken(f"no token {name!r} in the vault")
        row.revoked_at = row.revoked_at or db.now()
        return _token_record(row)


def list_tokens(db: Database, /) -> list[TokenRecord]:
    """Every token (never its secret), by name."""
    with db.transaction(write=False) as session:
        found = session.scalars(select(ApiToken).order_by(ApiToken.name))
        return [_token_record(r) for r in found]


def _token_record(row: ApiToken) -> TokenRecord:
    return TokenRecord(
        name=row.name, role=Role(row.role), created_at=row.created_at,
        expires_at=row.expires_at, revoked_at=row.revoked_at,
    )  # fmt: skip


class UnknownToken(NotFoundError):
    """No API token with this name exists."""

    hint = "run `siterecovery token list` to see the tokens"


# ---- authentication ------------------------------------------------------------------------


def authenticate(db: Database, /, *, secret: str) -> Principal:
    """The caller holding ``secret`` (a token or a host credential); NotAuthenticated else."""
    if not isinstance(secret, str) or not secret.startswith((TOKEN_PREFIX, HOST_PREFIX)):
        raise NotAuthenticated("no valid credential presented")
    key = digest(secret)
    with db.transaction(write=False) as session:
        if secret.startswith(HOST_PREFIX):
            host = session.scalars(select(Host).where(Host.credential_hash == key)).first()
            if host is None:
                raise NotAuthenticated("unknown host credential")
            return Principal(name=host.name, host=host.name)
        token = session.scalars(select(ApiToken).where(ApiToken.secret_digest == key)).first()
        if token is None:
            raise NotAuthenticated("unknown API token")
        if token.revoked_at is not None:
            raise NotAuthenticated(f"API token {token.name!r} was revoked")
        if token.expires_at is not None and token.expires_at <= db.now():
            raise NotAuthenticated(f"API token {token.name!r} expired")
        return Principal(name=token.name, role=Role(token.role))


def require_role(principal: Principal, role: Role, action: str) -> None:
    """PermissionDenied unless ``principal`` is an operator with at least ``role``."""
    if principal.role is None:
        raise PermissionDenied(f"{principal.label} may not {action}: hosts use the agent API")
    if principal.role.rank < role.rank:
        raise PermissionDenied(f"{principal.label} may not {action}: that needs the role '{role}'")


def require_host(principal: Principal, action: str) -> str:
    """The host name of a host principal; PermissionDenied for an operator token."""
    if principal.host is None:
        raise PermissionDenied(f"{principal.label} may not {action}: only agents may")
    return principal.host


# ---- registration --------------------------------------------------------------------------


def create_registration_key(
    db: Database, /, *, site: str, role: SiteRole | str = SiteRole.PRIMARY, ttl_s: int = 86400
) -> tuple[str, datetime]:
    """A one-time key for one host to join ``site`` (created with ``role`` if missing).

    Returns the key (shown this once) and when it expires (``ttl_s``: 1 s to 5 days).
    """
    validate_name("site", site)
    wanted = checks.member("site role", SiteRole, role)
    life = _ttl("registration key lifetime (seconds)", ttl_s, MAX_KEY_TTL_S)
    assert life is not None
    secret = _new_secret(KEY_PREFIX)
    with db.transaction() as session:
        row = session.scalars(select(Site).where(Site.name == site)).one_or_none()
        now = db.now()
        if row is None:
            row = Site(name=site, role=wanted, created_at=now)
            session.add(row)
        session.add(
            RegistrationKey(
                secret_digest=digest(secret), site=row, created_at=now, expires_at=now + life
            )
        )
        return secret, now + life


def register_host(db: Database, /, *, key: str, host: str) -> Registration:
    """Join ``host`` to the key's site with a one-time ``key``; return its new credential.

    NotAuthenticated if the key is unknown, used or expired (nothing changes). A host name
    already registered gets a fresh credential (the old one stops working): re-registering
    a reinstalled host needs a new key, like the first time.
    """
    validate_name("host", host)
    if not isinstance(key, str) or not key.startswith(KEY_PREFIX):
        raise NotAuthenticated(
            "not a registration key",
            hint="use the key file of `siterecovery registration-key create`",
        )
    credential = _new_secret(HOST_PREFIX)
    with db.transaction() as session:
        row = session.scalars(
            select(RegistrationKey).where(RegistrationKey.secret_digest == digest(key))
            .with_for_update()
        ).one_or_none()  # fmt: skip
        now = db.now()
        _check_key(row, now)
        assert row is not None
        host_row = session.scalars(select(Host).where(Host.name == host)).one_or_none()
        if host_row is None:
            host_row = Host(name=host, site=row.site, created_at=now)
            session.add(host_row)
        elif host_row.site_id != row.site_id:
            raise Conflict(f"host {host!r} is registered in site {host_row.site.name!r}")
        host_row.credential_hash = digest(credential)
        row.used_at, row.used_by = now, host
        return Registration(host=host, site=row.site.name, credential=credential)


def _check_key(row: RegistrationKey | None, now: datetime) -> None:
    hint = "ask the vault's admin for a new key: `siterecovery registration-key create`"
    if row is None:
        raise NotAuthenticated("unknown registration key", hint=hint)
    if row.used_at is not None:
        raise NotAuthenticated(f"registration key already used by host {row.used_by!r}", hint=hint)
    if row.expires_at <= now:
        raise NotAuthenticated("registration key expired", hint=hint)


def host_of_vm(db: Database, /, *, vm: str) -> str:
    """The name of the host ``vm`` runs on; UnknownVm if there is no such VM."""
    with db.transaction(write=False) as session:
        return rows.vm(session, vm).host.name
