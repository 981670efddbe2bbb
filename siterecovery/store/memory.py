"""The ``memory://name`` backend: objects in a dict, for fast unit tests.

Backends opened with the same URL share one instance per process, so a test can
``ReplicaStore.init("memory://t1", ...)`` and later ``ReplicaStore.open("memory://t1", ...)``.
:func:`drop_memory_store` forgets a name.

Faults are injected per test through hooks on the instance (fakes over patching):

* :meth:`MemoryBackend.fail_nth_put` — the n-th put from now (optionally only of keys with a
  prefix) raises an error instead of storing anything;
* :meth:`MemoryBackend.corrupt_on_get` — gets of matching keys return a damaged copy;
* ``put_hook`` / ``get_hook`` — arbitrary callables for anything else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from siterecovery.store.backend import (
    ObjectInfo,
    register_scheme,
    validate_key,
    validate_prefix,
)
from siterecovery.store.errors import (
    ObjectExists,
    ObjectNotFound,
    StoreError,
    StoreInputError,
    StoreUnavailable,
)

__all__ = ["MemoryBackend", "drop_memory_store", "flip_byte"]

#: Called with (key, data) before a put stores anything; may raise to fail the put.
PutHook = Callable[[str, bytes], None]
#: Called with (key, stored bytes) on get; returns the bytes the reader sees.
GetHook = Callable[[str, bytes], bytes]


def flip_byte(data: bytes, index: int | None = None) -> bytes:
    """Return ``data`` with one byte inverted (the middle one by default)."""
    if not data:
        return data
    i = len(data) // 2 if index is None else index % len(data)
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


class MemoryBackend:
    """An in-process object store with the :class:`~siterecovery.store.backend.Backend`
    contracts and fault-injection hooks."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()
        self.put_hook: PutHook | None = None
        self.get_hook: GetHook | None = None
        #: Counters tests can assert on.
        self.puts = 0
        self.gets = 0

    @property
    def url(self) -> str:
        return f"memory://{self.name}"

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        validate_key(key)
        data = bytes(data)
        if self.put_hook is not None:
            self.put_hook(key, data)
        with self._lock:
            if create_only and key in self._objects:
                raise ObjectExists(f"object {key} already exists")
            self._objects[key] = (data, time.time())
            self.puts += 1

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        validate_key(key)
        if offset < 0 or (length is not None and length < 0):
            raise StoreInputError(f"invalid range offset={offset} length={length} for {key}")
        with self._lock:
            found = self._objects.get(key)
            self.gets += 1
        if found is None:
            raise ObjectNotFound(f"object {key} not found in {self.url}")
        data = found[0]
        if self.get_hook is not None:
            data = self.get_hook(key, data)
        end = None if length is None else offset + length
        return data[offset:end]

    def stat(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        with self._lock:
            found = self._objects.get(key)
        return None if found is None else ObjectInfo(key, len(found[0]), found[1])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        with self._lock:
            items = [(k, len(d), t) for k, (d, t) in self._objects.items() if k.startswith(prefix)]
        return iter(ObjectInfo(k, s, t) for k, s, t in sorted(items))

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._lock:
            self._objects.pop(key, None)

    # -- test helpers -------------------------------------------------------------------

    def raw(self, key: str) -> bytes:
        """The stored bytes of ``key`` without hooks (raises ``ObjectNotFound``)."""
        with self._lock:
            found = self._objects.get(key)
        if found is None:
            raise ObjectNotFound(f"object {key} not found in {self.url}")
        return found[0]

    def fail_nth_put(self, n: int, error: StoreError | None = None, *, prefix: str = "") -> None:
        """Make the ``n``-th put (1-based, counted from now, only keys starting with
        ``prefix``) raise ``error`` (default ``StoreUnavailable``) without storing."""
        counter = {"seen": 0}
        exc = error if error is not None else StoreUnavailable("injected put failure")
        lock = threading.Lock()

        def hook(key: str, _data: bytes) -> None:
            if not key.startswith(prefix):
                return
            with lock:
                counter["seen"] += 1
                hit = counter["seen"] == n
            if hit:
                raise exc

        self.put_hook = hook

    def corrupt_on_get(self, predicate: Callable[[str], bool]) -> None:
        """Make gets of keys matching ``predicate`` return the object with one byte flipped."""
        self.get_hook = lambda key, data: flip_byte(data) if predicate(key) else data

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        self.put_hook = None
        self.get_hook = None


_INSTANCES: dict[str, MemoryBackend] = {}
_INSTANCES_LOCK = threading.Lock()


def _from_url(url: str) -> MemoryBackend:
    parts = urlsplit(url)
    name = parts.netloc + parts.path
    if not name or parts.query or parts.fragment:
        raise StoreInputError(f"invalid memory store URL {url!r}", hint="write it as memory://NAME")
    with _INSTANCES_LOCK:
        return _INSTANCES.setdefault(name, MemoryBackend(name))


def drop_memory_store(name: str) -> None:
    """Forget the shared ``memory://name`` instance (its objects are dropped)."""
    with _INSTANCES_LOCK:
        _INSTANCES.pop(name, None)


register_scheme("memory", _from_url)
