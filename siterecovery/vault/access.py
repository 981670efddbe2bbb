"""Who may talk to the vault: operators' API tokens, registration keys, host credentials.

Secrets are random 256-bit values with a readable prefix (``srt_`` token, ``srk_``
registration key, ``srh_`` host credential); the vault stores only their SHA-256 digest and
hands a secret out exactly once, when it is made. Roles (:class:`Role`) are ordered: a role
may do what every lower role may.

Errors::

    VaultError
    ├── NotAuthenticated   no, unknown, expired or revoked secret (HTTP 401)
    └── PermissionDenied   a known caller asks for what its role or host may not do (403)

A registration key is bound to one host name when it is made; it re-registers a host that
is registered already (replacing its credential) only when it was made with ``replace``.
Making keys, registering and replacing are logged on the ``siterecovery.audit`` logger.

Functions take the Database positionally, the rest by keyword; one transaction each.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from siterecovery.domain import validate_name
from siterecovery.errors import InputError, NotFoundError, VaultError
from siterecovery.vault import checks, rows
from siterecovery.vault.auth_models import ApiToken, RegistrationKey, Role
from siterecovery.vault.db import Database
from siterecovery.vault.errors import Conflict, UnknownHost
from siterecovery.vault.models import Host, Site, SiteRole

audit = logging.getLogger("siterecovery.audit")

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
    """What a host gets back from registering: its name, site and its own credential;
    ``replaced``: the host was registered before and its old credential no longer works."""

    host: str
    site: str
    credential: str
    replaced: bool = False


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
    db: Database,
    /,
    *,
    site: str,
    host: str,
    role: SiteRole | str = SiteRole.PRIMARY,
    ttl_s: int = 86400,
    replace: bool = False,
    by: str = "the vault host",
) -> tuple[str, datetime]:
    """A one-time key for the host ``host`` to join ``site`` (created with ``role`` if missing).

    The key registers that host name only. A host registered already (it holds a
    credential) needs ``replace``: using the key then replaces its credential. Conflict if
    ``host`` is registered and ``replace`` is false, or is in another site; UnknownHost if
    ``replace`` is given for a host that is not registered. Returns the key (shown this
    once) and when it expires (``ttl_s``: 1 s to 5 days). ``by`` names the maker in the
    audit log.
    """
    validate_name("site", site)
    validate_name("host", host)
    wanted = checks.member("site role", SiteRole, role)
    life = _ttl("registration key lifetime (seconds)", ttl_s, MAX_KEY_TTL_S)
    assert life is not None
    if not isinstance(replace, bool):
        raise InputError(f"replace must be true or false, got {replace!r}")
    secret = _new_secret(KEY_PREFIX)
    with db.transaction() as session:
        row = session.scalars(select(Site).where(Site.name == site)).one_or_none()
        now = db.now()
        if row is None:
            row = Site(name=site, role=wanted, created_at=now)
            session.add(row)
        _check_key_target(session.scalars(select(Host).where(Host.name == host)).one_or_none(),
                          host=host, site=site, replace=replace)  # fmt: skip
        key = RegistrationKey(secret_digest=digest(secret), site=row, created_at=now,
                              expires_at=now + life, host=host, may_replace=replace)  # fmt: skip
        session.add(key)
        session.flush()
        key_id = key.id
    audit.info("registration key %d made by %s for host %r in site %r%s, valid until %s",
               key_id, by, host, site, " (replaces its credential)" if replace else "",
               (now + life).isoformat())  # fmt: skip
    return secret, now + life


def _check_key_target(existing: Host | None, *, host: str, site: str, replace: bool) -> None:
    """Refuse a key that would take over a registered host without ``replace``, move a host
    to another site, or replace a host that is not registered."""
    registered = existing is not None and existing.credential_hash is not None
    if existing is not None and existing.site.name != site:
        raise Conflict(f"host {host!r} is registered in site {existing.site.name!r}, not {site!r}")
    if registered and not replace:
        raise Conflict(
            f"host {host!r} is already registered",
            hint="to re-register it (a reinstalled host) make the key with --replace: its "
            "current credential stops working when the key is used",
        )
    if replace and not registered:
        raise UnknownHost(
            f"host {host!r} is not registered: there is no credential to replace",
            hint="leave out --replace for a new host",
        )


def register_host(db: Database, /, *, key: str, host: str) -> Registration:
    """Join ``host`` to the key's site with a one-time ``key``; return its new credential.

    NotAuthenticated if the key is unknown, used or expired; PermissionDenied if it was made
    for another host; Conflict if ``host`` is registered and the key was not made to replace
    it, or is in another site. Nothing changes when it raises. A replaced host's old
    credential stops working at once. Registering and replacing are audited.
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
        replaced = _check_key_use(row, host_row, host)
        if host_row is None:
            host_row = Host(name=host, site=row.site, created_at=now)
            session.add(host_row)
        host_row.credential_hash = digest(credential)
        row.used_at, row.used_by = now, host
        done = Registration(host=host, site=row.site.name, credential=credential,
                            replaced=replaced)  # fmt: skip
        key_id = row.id
    _audit_registration(done, key_id)
    return done


def _check_key_use(row: RegistrationKey, existing: Host | None, host: str) -> bool:
    """Whether registering ``host`` with the key ``row`` replaces a credential; raises when
    the key may not register that host."""
    if row.host is not None and row.host != host:
        raise PermissionDenied(
            f"this registration key is for host {row.host!r}, not {host!r}",
            hint=f"register as {row.host!r}, or ask the vault's admin for a key for {host!r}",
        )
    if existing is None:
        return False
    if existing.site_id != row.site_id:
        raise Conflict(f"host {host!r} is registered in site {existing.site.name!r}")
    registered = existing.credential_hash is not None
    if registered and not row.may_replace:
        raise Conflict(
            f"host {host!r} is already registered: this key may not replace its credential",
            hint="the vault's admin makes a replacing key with "
            "`siterecovery registration-key create --host HOST --replace`",
        )
    return registered


def _audit_registration(done: Registration, key_id: int) -> None:
    if done.replaced:
        audit.warning("host %r in site %r re-registered with key %d: its previous credential "
                      "was replaced", done.host, done.site, key_id)  # fmt: skip
    else:
        audit.info("host %r registered in site %r with key %d", done.host, done.site, key_id)


def _check_key(row: RegistrationKey | None, now: datetime) -> None:
    hint = "ask the vault's admin for a new key: `siterecovery registration-key create`"
    if row is None:
        raise NotAuthenticated("unknown registration key", hint=hint)
    if row.used_at is not None:
        raise NotAuthenticated(f"registration key already used by host {row.used_by!r}", hint=hint)
    if row.expires_at <= now:
        raise NotAuthenticated("registration key expired", hint=hint)


def is_registered(db: Database, /, *, host: str) -> bool:
    """Whether ``host`` holds a credential (a new key for it then needs ``replace``)."""
    validate_name("host", host)
    with db.transaction(write=False) as session:
        row = session.scalars(select(Host).where(Host.name == host)).one_or_none()
        return row is not None and row.credential_hash is not None


def host_of_vm(db: Database, /, *, vm: str) -> str:
    """The name of the host ``vm`` runs on; UnknownVm if there is no such VM."""
    with db.transaction(write=False) as session:
        return rows.vm(session, vm).host.name
