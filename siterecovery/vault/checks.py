"""Argument checks shared by the vault service: each returns the value or raises InputError.

Free-form JSON and times are bounded by :mod:`siterecovery.vault.limits`; going past a bound
raises :class:`LimitExceeded` or :class:`TimeOutOfRange` (InputErrors the API answers 422).
"""

from __future__ import annotations

import enum
import json
import logging
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from siterecovery.errors import InputError
from siterecovery.vault import limits
from siterecovery.vault.errors import LimitExceeded, TimeOutOfRange
from siterecovery.vault.models import LABEL_LEN

E = TypeVar("E", bound=enum.Enum)
log = logging.getLogger("siterecovery.vault")

_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:/()-]*\Z")


def label(kind: str, value: object) -> str:
    """A job kind or task name: 1-100 printable characters, spaces allowed."""
    if not isinstance(value, str) or len(value) > LABEL_LEN or not _LABEL_RE.fullmatch(value):
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
    """A JSON object with text keys within the bounds of :mod:`.limits`, as a deep copy.

    InputError if it is not an object or not JSON (NaN, sets, ...); LimitExceeded if it is
    longer than ``MAX_JSON_BYTES`` serialized or nested deeper than ``MAX_JSON_DEPTH``. The
    size is measured first (by the C encoder), so the walk that measures depth only ever
    sees a small value; nothing here recurses in Python.
    """
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InputError(f"{kind} must be an object with text keys, got {type(value).__name__}")
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except RecursionError:
        raise LimitExceeded(
            f"{kind} is nested deeper than {limits.MAX_JSON_DEPTH} levels"
        ) from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{kind} is not JSON-serializable: {exc}") from exc
    size = len(text.encode())
    if size > limits.MAX_JSON_BYTES:
        raise LimitExceeded(f"{kind} is {size} bytes serialized: more than {limits.MAX_JSON_BYTES}")
    copied: dict[str, Any] = json.loads(text)
    if json_depth(copied, stop_after=limits.MAX_JSON_DEPTH) > limits.MAX_JSON_DEPTH:
        raise LimitExceeded(f"{kind} is nested deeper than {limits.MAX_JSON_DEPTH} levels")
    return copied


def json_depth(value: object, *, stop_after: int) -> int:
    """How deeply containers nest in ``value`` (a scalar 0, ``{}`` or ``[]`` 1), counted
    without recursion; counting stops at the first container deeper than ``stop_after``, and
    that depth is returned. A value that contains itself is therefore just too deep."""
    deepest = 0
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, level = pending.pop()
        children = _children(item)
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > stop_after:
            return level
        pending.extend((child, level + 1) for child in children)
    return deepest


def _children(item: object) -> Iterable[object] | None:
    if isinstance(item, Mapping):
        return list(item.values())
    if isinstance(item, list | tuple):
        return item
    return None


def stored_json(kind: str, value: object) -> dict[str, Any]:
    """A copy of a JSON object read from the database, for a record.

    A value beyond the bounds of :mod:`.limits` (written before the vault enforced them) is
    withheld, not copied: the record gets ``{"withheld": REASON}`` and the log a warning, so
    one bad row never breaks a listing for everyone.
    """
    try:
        return json_object(kind, value)
    except InputError as exc:
        log.warning("%s withheld from a record: %s", kind, exc.message)
        return {"withheld": exc.message}


def aware(kind: str, value: object) -> datetime:
    """A timezone-aware datetime (any zone: the vault stores it in UTC)."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InputError(
            f"{kind} must be a timezone-aware datetime, got {value!r}",
            hint="use datetime.now(UTC) or attach a tzinfo",
        )
    return value


def utc(kind: str, value: object) -> datetime:
    """An aware datetime converted to UTC; TimeOutOfRange if UTC cannot represent it (e.g.
    ``0001-01-01T00:00:00+14:00``), so the database never sees an overflow."""
    moment = aware(kind, value)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise TimeOutOfRange(f"{kind} {moment.isoformat()} is out of range") from None


def within(
    kind: str, value: datetime, *, earliest: datetime, latest: datetime,
    skew_s: float | None = limits.CLOCK_SKEW_S,
) -> datetime:  # fmt: skip
    """``value`` (aware) if it lies in ``[earliest - skew, latest + skew]`` (``skew_s``, by
    default :data:`limits.CLOCK_SKEW_S`; None: only representable); TimeOutOfRange naming the
    bound it misses otherwise."""
    moment = utc(kind, value)
    if skew_s is None:
        return moment
    skew = timedelta(seconds=skew_s)
    if moment < earliest - skew:
        raise TimeOutOfRange(f"{kind} {moment.isoformat()} is before {earliest.isoformat()}")
    if moment > latest + skew:
        raise TimeOutOfRange(
            f"{kind} {moment.isoformat()} is more than {skew_s:g} s after the "
            f"vault's time {latest.isoformat()}"
        )
    return moment


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
