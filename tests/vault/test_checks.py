"""The argument checks that bound free-form JSON, times and names (DESIGN §6: bad input gets
a clear error and changes nothing)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from siterecovery.domain import validate_name
from siterecovery.errors import InputError
from siterecovery.policies.states import parse_window
from siterecovery.vault import checks, limits
from siterecovery.vault.errors import LimitExceeded, TimeOutOfRange

from .conftest import START


def deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_free_form_json_is_bounded_at_any_depth() -> None:
    assert checks.json_object("x", deep(limits.MAX_JSON_DEPTH)) == deep(limits.MAX_JSON_DEPTH)
    for value in (deep(limits.MAX_JSON_DEPTH + 1), deep(100_000)):
        with pytest.raises(LimitExceeded, match="nested deeper than 16"):
            checks.json_object("x", value)
    looped: dict[str, Any] = {}
    looped["self"] = looped
    with pytest.raises(InputError, match="Circular reference"):
        checks.json_object("x", looped)
    assert checks.json_depth(looped, stop_after=16) == 17  # no endless walk either
    with pytest.raises(LimitExceeded, match="bytes serialized"):
        checks.json_object("x", {"s": "é" * (limits.MAX_JSON_BYTES // 2)})  # bytes, not chars
    with pytest.raises(InputError, match="not JSON"):
        checks.json_object("x", {"n": float("nan")})
    assert checks.stored_json("x", deep(490)) == {"withheld": "x is nested deeper than 16 levels"}
    assert checks.json_depth(deep(3), stop_after=16) == 3
    assert checks.json_depth(1, stop_after=1) == 0


def test_times_are_bounded_by_protection_and_the_clock() -> None:
    late = datetime.fromisoformat("9999-12-31T23:00:00-14:00")
    for value in (datetime.fromisoformat("0001-01-01T00:00:00+14:00"), late):
        with pytest.raises(TimeOutOfRange, match="out of range"):
            checks.utc("t", value)
    skew = timedelta(seconds=limits.CLOCK_SKEW_S)
    bounds = {"earliest": START, "latest": START + timedelta(hours=1)}
    assert checks.within("t", START - skew, **bounds) == START - skew
    assert checks.within("t", START + timedelta(hours=1) + skew, **bounds)
    with pytest.raises(TimeOutOfRange, match="is before"):
        checks.within("t", START - skew - timedelta(seconds=1), **bounds)
    with pytest.raises(TimeOutOfRange, match="300 s after"):
        checks.within("t", START + timedelta(hours=1) + skew + timedelta(seconds=1), **bounds)


@pytest.mark.parametrize("name", ["web1\n", "web1\n\n", "\nweb1", "web 1", ""])
def test_names_are_matched_whole(name: str) -> None:
    with pytest.raises(InputError, match="invalid VM name"):
        validate_name("VM", name)


def test_labels_and_windows_refuse_a_trailing_newline() -> None:
    with pytest.raises(InputError, match="invalid task name"):
        checks.label("task name", "check prerequisites\n")
    with pytest.raises(InputError):
        parse_window("18:30-06:00\n")
