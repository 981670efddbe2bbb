"""Leases: how processes that use the store tell garbage collection what they are doing.

A lease is a small JSON object at ``leases/<32 hex>.json``::

    {"format": "siterecovery-lease", "version": 1, "id": "<32 hex>",
     "purpose": "cycle" | "base" | "compaction" | "prune" | "restore" | "retired" | "gc",
     "owner": "host:pid", "vm": "web1" | null,
     "created": "2024-05-01T12:00:00.000000Z", "expires": "2024-05-01T13:00:00.000000Z",
     "writes": true, "dedup": false, "roots": ["indexes/web1/vda/…", "segments/web1/vda/…"]}

What garbage collection does with a **live** lease (``now < expires + LEASE_SKEW``):

* ``roots`` are kept as if a manifest named them (an index root keeps its chunks too). A
  reader pins the chain it restores; a writer the chain it extends; compaction and prune
  leave a ``retired`` lease (no owner process) pinning the chains they unlinked, for the
  safety delay, so a reader that loaded the old manifest still finds every object.
* ``writes``: the holder puts new objects; nothing modified after ``created - LEASE_SKEW``
  is deleted, whether referenced or not (its objects become referenced only when it
  publishes).
* ``dedup``: the holder may reuse an existing chunk it did not write (a base writer finds it
  with ``stat`` and skips the upload). While such a lease lives, no chunk is deleted: an
  unreferenced chunk may be about to be referenced.
* purposes ``compaction`` and ``prune`` are **exclusive per VM**: no two of them (of
  either purpose) run at once for one VM (the second gets :class:`LeaseConflict`).

The handshake with GC (each side puts its lease, then lists the others, so at least one
side sees the other): GC puts a ``gc`` lease before its final listing of leases and its
deletes; :func:`acquire_lease` puts the holder's lease, then waits while a live ``gc`` lease
exists. Either GC sees the new lease and honours it, or the holder waits until the sweep is
over. A crashed holder's lease simply expires; expired leases are removed by GC.

Leases are coordination, not data: they carry no MAC. A lease that cannot be parsed is
treated by GC as a live writing, deduplicating lease held since its mtime for
``MAX_LEASE_TTL`` (the safe reading), and reported.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from siterecovery.store.backend import Backend
from siterecovery.store.errors import StoreError, StoreInputError, StoreUnavailable
from siterecovery.store.keys import utc_text

__all__ = [
    "LEASE_PREFIX",
    "LEASE_SKEW",
    "MAX_LEASE_TTL",
    "Lease",
    "LeaseConflict",
    "LeaseInfo",
    "acquire_lease",
    "list_leases",
    "retire_roots",
]

LEASE_PREFIX: Final = "leases/"
LEASE_FORMAT: Final = "siterecovery-lease"
LEASE_VERSION: Final = 1
#: Clock difference tolerated between hosts sharing a store.
LEASE_SKEW: Final = timedelta(minutes=2)
#: The longest a lease may be granted for (and how long an unreadable one is honoured).
MAX_LEASE_TTL: Final = timedelta(hours=24)
PURPOSES: Final = ("cycle", "base", "compaction", "prune", "restore", "retired", "gc")
EXCLUSIVE_PURPOSES: Final = ("compaction", "prune")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class LeaseConflict(StoreError):
    """Another process holds a lease that excludes this one (e.g. two compactions of one VM,
    or a garbage collection already sweeping)."""

    recoverable = True
    hint = "wait for the other operation to finish (or its lease to expire) and try again"


@dataclass(frozen=True)
class LeaseInfo:
    """One lease as stored (see the module docstring)."""

    id: str
    purpose: str
    owner: str
    vm: str | None
    created: datetime
    expires: datetime
    writes: bool = False
    dedup: bool = False
    roots: tuple[str, ...] = ()
    #: Set when the object could not be parsed (GC then reads it the safe way).
    damaged: str | None = None

    @property
    def key(self) -> str:
        return f"{LEASE_PREFIX}{self.id}.json"

    def live(self, now: datetime) -> bool:
        """Whether GC must still honour it (expiry plus the tolerated clock skew)."""
        return now < self.expires + LEASE_SKEW

    def excludes(self, other: LeaseInfo) -> bool:
        """True if ``other`` may not run while this lease lives."""
        return (
            self.id != other.id
            and self.purpose in EXCLUSIVE_PURPOSES
            and other.purpose in EXCLUSIVE_PURPOSES
            and self.vm == other.vm
        )

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format": LEASE_FORMAT,
            "version": LEASE_VERSION,
            "id": self.id,
            "purpose": self.purpose,
            "owner": self.owner,
            "vm": self.vm,
            "created": utc_text(self.created),
            "expires": utc_text(self.expires),
            "writes": self.writes,
            "dedup": self.dedup,
            "roots": list(self.roots),
        }
        return (json.dumps(doc, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes, key: str, mtime: float) -> LeaseInfo:
        """Parse a stored lease; an unreadable one becomes the safe stand-in."""
        lease_id = key[len(LEASE_PREFIX) :].removesuffix(".json")
        try:
            doc = json.loads(raw)
            if doc.get("format") != LEASE_FORMAT or doc.get("id") != lease_id:
                raise ValueError("not a lease, or a lease under another name")
            return cls(
                id=lease_id,
                purpose=str(doc["purpose"]),
                owner=str(doc["owner"]),
                vm=None if doc["vm"] is None else str(doc["vm"]),
                created=_parse_time(doc["created"]),
                expires=_parse_time(doc["expires"]),
                writes=bool(doc["writes"]),
                dedup=bool(doc["dedup"]),
                roots=tuple(str(r) for r in doc["roots"]),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            return cls.stand_in(lease_id, mtime, f"unreadable lease {key}: {exc}")

    @classmethod
    def stand_in(cls, lease_id: str, mtime: float, problem: str) -> LeaseInfo:
        """The safe reading of a damaged lease: writing, deduplicating, held since mtime."""
        since = datetime.fromtimestamp(mtime, UTC)
        return cls(
            lease_id, "damaged", "", None, since, since + MAX_LEASE_TTL, True, True, (), problem
        )


def _parse_time(text: Any) -> datetime:
    return datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def list_leases(backend: Backend) -> list[LeaseInfo]:
    """Every lease in the store, live or not, oldest first."""
    leases = []
    for info in backend.list(LEASE_PREFIX):
        try:
            raw = backend.get(info.key)
        except StoreError as exc:
            if backend.stat(info.key) is None:
                continue  # released while we listed
            raise StoreUnavailable(f"cannot read lease {info.key}: {exc.message}") from exc
        leases.append(LeaseInfo.from_bytes(raw, info.key, info.mtime))
    leases.sort(key=lambda lease: (lease.created, lease.id))
    return leases


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Lease:
    """A held lease: renew it while working, release it when done (or use ``with``)."""

    def __init__(self, backend: Backend, info: LeaseInfo, ttl: timedelta, clock: Clock) -> None:
        self.backend = backend
        self.info = info
        self._ttl = ttl
        self._clock = clock
        self.released = False

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def add_roots(self, roots: Iterable[str]) -> None:
        """Pin more objects (e.g. a base just written), effective at once."""
        merged = tuple(dict.fromkeys((*self.info.roots, *roots)))
        self.info = replace(self.info, roots=merged)
        self.backend.put(self.info.key, self.info.to_bytes())

    def renew(self) -> None:
        """Extend the expiry to now + ttl."""
        self.info = replace(self.info, expires=self._clock() + self._ttl)
        self.backend.put(self.info.key, self.info.to_bytes())

    def renew_if_due(self) -> None:
        """Renew when less than half of the ttl is left (cheap to call often)."""
        if self.info.expires - self._clock() < self._ttl / 2:
            self.renew()

    def release(self) -> None:
        """Delete the lease; idempotent."""
        if not self.released:
            self.released = True
            self.backend.delete(self.info.key)


def _check_request(purpose: str, ttl: timedelta, roots: Sequence[str]) -> None:
    if purpose not in PURPOSES:
        raise StoreInputError(f"unknown lease purpose {purpose!r}; use one of {PURPOSES}")
    if not timedelta(0) < ttl <= MAX_LEASE_TTL:
        raise StoreInputError(f"lease ttl {ttl} must be positive and at most {MAX_LEASE_TTL}")
    for root in roots:
        if not root.startswith(("indexes/", "segments/")):
            raise StoreInputError(f"lease root {root!r} is not an index or segment key")


def acquire_lease(
    backend: Backend,
    purpose: str,
    *,
    vm: str | None = None,
    ttl: timedelta = timedelta(hours=1),
    writes: bool = False,
    dedup: bool = False,
    roots: Sequence[str] = (),
    wait_for_gc: float = 600.0,
    clock: Clock = utc_now,
    sleep: Callable[[float], None] = time.sleep,
) -> Lease:
    """Put a lease, then honour the others (see the module docstring).

    Raises :class:`LeaseConflict` (and holds nothing) when an exclusive lease of the same
    purpose and VM lives, or, for ``gc``, when another GC sweeps. Other purposes wait up to
    ``wait_for_gc`` seconds while a GC lease lives, then raise :class:`LeaseConflict`.
    """
    _check_request(purpose, ttl, roots)
    now = clock()
    info = LeaseInfo(
        uuid.uuid4().hex, purpose, _owner(), vm, now, now + ttl, writes, dedup, tuple(roots)
    )
    backend.put(info.key, info.to_bytes(), create_only=True)
    lease = Lease(backend, info, ttl, clock)
    try:
        _honour_others(lease, wait_for_gc, clock, sleep)
    except BaseException:
        lease.release()
        raise
    return lease


def _honour_others(
    lease: Lease, wait_for_gc: float, clock: Clock, sleep: Callable[[float], None]
) -> None:
    me = lease.info
    deadline = time.monotonic() + wait_for_gc
    while True:
        others = [o for o in list_leases(lease.backend) if o.id != me.id and o.live(clock())]
        for other in others:
            if other.excludes(me) or (me.purpose == "gc" and other.purpose == "gc"):
                raise LeaseConflict(
                    f"cannot start {me.purpose}"
                    + (f" of VM {me.vm}" if me.vm else "")
                    + f": {other.owner or 'another process'} holds a {other.purpose} lease "
                    f"{other.key} until {utc_text(other.expires)}"
                )
        sweeping = [o for o in others if o.purpose == "gc"]
        if me.purpose == "gc" or not sweeping:
            return
        if time.monotonic() >= deadline:
            raise LeaseConflict(
                f"garbage collection ({sweeping[0].key}) is still sweeping after "
                f"{wait_for_gc:.0f} s"
            )
        sleep(min(2.0, max(0.05, wait_for_gc / 100)))


def retire_roots(
    backend: Backend,
    roots: Iterable[str],
    *,
    delay: timedelta,
    clock: Clock = utc_now,
    vm: str | None = None,
) -> LeaseInfo | None:
    """Pin objects just unlinked from every manifest for ``delay`` (the safety delay), so a
    reader that loaded the old manifest still finds them. Returns the lease (None if no
    roots). The lease has no holder: it expires by itself and GC removes it."""
    unique = tuple(dict.fromkeys(r for r in roots if r.startswith(("indexes/", "segments/"))))
    if not unique:
        return None
    now = clock()
    info = LeaseInfo(uuid.uuid4().hex, "retired", _owner(), vm, now, now + delay, roots=unique)
    backend.put(info.key, info.to_bytes(), create_only=True)
    return info
