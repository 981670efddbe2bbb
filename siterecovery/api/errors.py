"""Errors at the HTTP boundary, in both directions.

Server side, :func:`status_of` maps a domain error to its HTTP status in one place; the body
is always :class:`ErrorBody` (``error``: the error's class name, ``message``, ``hint``,
``recoverable``). Client side, :func:`error_from_response` turns such a body back into a
:class:`~siterecovery.errors.SiteRecoveryError` of the same family, so a CLI using the API
prints and exits exactly as it did with the vault in-process::

    400 InputError (the service refused the value)   422 InputError (the payload's shape)
    422 LimitExceeded, TimeOutOfRange (a bound of vault.limits)
    413 PayloadTooLarge (the request body, before it is parsed)
    401 NotAuthenticated   403 PermissionDenied      404 NotFoundError
    409 Conflict / InvalidTransition / InvalidJobState
    501 NotImplementedYet  503 DatabaseUnavailable   500 VaultError (a bug: reported, logged)

``VaultUnreachable`` (recoverable) is raised by clients when the vault cannot be reached.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from siterecovery.errors import InputError, NotFoundError, SiteRecoveryError, VaultError
from siterecovery.vault.access import NotAuthenticated, PermissionDenied
from siterecovery.vault.errors import (
    Conflict,
    DatabaseUnavailable,
    InvalidJobState,
    InvalidTransition,
    LimitExceeded,
    TimeOutOfRange,
    UnknownHost,
    UnknownJob,
    UnknownPoint,
    UnknownPolicy,
    UnknownSite,
    UnknownVm,
    VmNotProtected,
)


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str
    message: str
    hint: str = ""
    recoverable: bool = False


class PayloadTooLarge(InputError):
    """The request body is longer than the vault accepts; it was not read to its end."""

    hint = "send a smaller request, or raise the vault's limit (`vault serve --max-body`)"


class NotImplementedYet(VaultError):
    """The operation exists in the API but is not served by this vault yet."""


class VaultUnreachable(VaultError):
    """The vault did not answer (connection refused, TLS failure, timeout); may recover."""

    recoverable = True
    hint = "check that `siterecovery vault serve` runs and the URL and CA file are right"


class ApiFailure(VaultError):
    """The vault answered with an error it could not classify (a bug on its side)."""


#: First match wins: subclasses come before their parents.
_STATUS: tuple[tuple[type[SiteRecoveryError], int], ...] = (
    (PayloadTooLarge, 413),
    (LimitExceeded, 422),
    (TimeOutOfRange, 422),
    (InputError, 400),
    (NotAuthenticated, 401),
    (PermissionDenied, 403),
    (NotFoundError, 404),
    (Conflict, 409),
    (InvalidTransition, 409),
    (InvalidJobState, 409),
    (NotImplementedYet, 501),
    (DatabaseUnavailable, 503),
)


def status_of(exc: SiteRecoveryError) -> int:
    """The HTTP status for ``exc``; 500 for errors that should never reach a caller."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return 500


def body_of(exc: SiteRecoveryError) -> dict[str, Any]:
    """The JSON error body of ``exc``."""
    return ErrorBody(
        error=type(exc).__name__, message=exc.message, hint=exc.hint,
        recoverable=exc.recoverable,
    ).model_dump()  # fmt: skip


_BY_STATUS: dict[int, type[SiteRecoveryError]] = {
    400: InputError,
    413: PayloadTooLarge,
    422: InputError,
    401: NotAuthenticated,
    403: PermissionDenied,
    404: NotFoundError,
    409: Conflict,
    501: NotImplementedYet,
    503: DatabaseUnavailable,
}


#: Errors rebuilt as their own class when the body names it (``error``), so a caller of the
#: API client can tell them apart exactly as with the vault in-process.
_BY_NAME: dict[str, type[SiteRecoveryError]] = {
    cls.__name__: cls
    for cls in (Conflict, InvalidJobState, DatabaseUnavailable, UnknownSite, UnknownHost,
                UnknownVm, UnknownPolicy, UnknownJob, UnknownPoint, VmNotProtected,
                LimitExceeded, TimeOutOfRange, PayloadTooLarge)
}  # fmt: skip


def error_from_response(status: int, payload: Any) -> SiteRecoveryError:
    """The client-side error for an error response ``status`` with JSON ``payload``."""
    message, hint, name = f"the vault answered HTTP {status}", None, None
    if isinstance(payload, dict):
        message = str(payload.get("message") or message)
        hint = payload.get("hint") or None
        name = payload.get("error")
    if name == InvalidTransition.__name__ and status == 409:
        return InvalidTransition.rebuilt(message, hint=hint)
    kind = _BY_NAME.get(str(name), _BY_STATUS.get(status, ApiFailure))
    if status_of(kind(message)) != status and not (status == 422 and kind is InputError):
        kind = _BY_STATUS.get(status, ApiFailure)  # a name that does not fit its status
    return kind(message, hint=hint)
