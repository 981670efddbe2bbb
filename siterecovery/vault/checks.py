"""Argument checks shared by the vault service: each returns the value or raises InputError."""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeVar

from siterecovery.errors import InputError
from siterecovery.vault.models import LABEL_LEN

E = TypeVar("E", bound=enum.Enum)

_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:/()-]*$")


def label(kind: str, value: object) -> str:
    """A job kind or task name: 1-100 printable characters, spaces allowed."""
    if not isinstance(value, str) or len(value) > LABEL_LEN or not _LABEL_RE.match(value):
        raise InputError(
            f"invalid {kind} {value!r}",
            hint=f"use 1-{LABEL_LEN} characters: letters, digits, spaces and . _ : / ( ) -",
        )
    return value


def integer(kind: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool) within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{kind} must be a whole number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{'' if low is None else low}..{'' if high is None else high}"
        raise InputError(f"{kind} {value} is out of range {bounds}")
    return value


def text(kind: str, value: object, *, max_len: int = 10_000) -> str:
    """A non-empty string of at most ``max_len`` characters."""
    if not isinstance(value, str) or not value.strip() or len(value) > max_len:
        raise InputError(f"{kind} must be a non-empty text of at most {max_len} characters")
    return value


def json_object(kind: str, value: object) -> dict[str, Any]:
    """A JSON-serializable mapping with string keys, returned as a deep copy."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InputError(f"{kind} must be an object with text keys, got {type(value).__name__}")
    try:
        copied: dict[str, Any] = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{kind} is not JSON-serializable: {exc}") from exc
    return copied


def aware(kind: str, value: object) -> datetime:
    """A timezone-aware datetime (any zone: the vault stores it in UTC)."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InputError(
            f"{kind} must be a timezone-aware datetime, got {value!r}",
            hint="use datetime.now(UTC) or attach a tzinfo",
        )
    return value


def uuid_text(kind: str, value: object) -> str:
    """A UUID in canonical text form."""
    try:
        return str(uuid.UUID(str(value))) if isinstance(value, str) else _bad_uuid(kind, value)
    except ValueError:
        return _bad_uuid(kind, value)


def _bad_uuid(kind: str, value: object) -> str:
    raise InputError(f"invalid {kind} {value!r}: expected a UUID")


def member(kind: str, cls: type[E], value: object) -> E:
    """A member of the enum ``cls``, given as a member or its value."""
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(str(m.value) for m in cls)
        raise InputError(f"invalid {kind} {value!r}: use one of {choices}") from None
