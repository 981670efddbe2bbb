"""The storage backend protocol, object key rules, and the URL scheme registry.

A backend is a flat namespace of immutable-ish byte objects named by keys. Everything the
replica store keeps (chunks, indexes, segments, manifests, the store config) goes through the
five methods of :class:`Backend`; each backend lives in its own module and registers a factory
for its URL scheme with :func:`register_scheme`. Cross-cutting behaviour (retry, throttling,
metrics) belongs in wrappers around a backend, not inside one.

Key rules (checked by :func:`validate_key`, the one place they are enforced):

* 1 to 1024 characters from ``[A-Za-z0-9._/-]``;
* ``/`` separates components; no leading or trailing ``/``, no empty component (``//``);
* no component starts with ``.`` — this excludes ``.`` and ``..`` and reserves dot-names for
  a backend's own temporary files, which :meth:`Backend.list` never shows.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from siterecovery.store.errors import InvalidKey, UnknownScheme

__all__ = [
    "Backend",
    "BackendFactory",
    "ObjectInfo",
    "open_backend",
    "register_scheme",
    "supported_schemes",
    "validate_key",
    "validate_prefix",
]

_KEY_RE = re.compile(r"^[A-Za-z0-9._/-]{1,1024}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._/-]{0,1024}$")


def validate_key(key: str) -> str:
    """Return ``key`` if it satisfies the key rules in the module docstring, else raise
    :class:`InvalidKey` saying which rule it breaks."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise InvalidKey(f"invalid object key {key!r}: use 1-1024 characters from [A-Za-z0-9._/-]")
    for part in key.split("/"):
        if not part:
            raise InvalidKey(f"invalid object key {key!r}: empty path component")
        if part.startswith("."):
            raise InvalidKey(
                f"invalid object key {key!r}: components may not start with '.' "
                "('.', '..' and dot-names are reserved)"
            )
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it could begin a valid key (the empty prefix lists everything)."""
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise InvalidKey(f"invalid key prefix {prefix!r}: use characters from [A-Za-z0-9._/-]")
    if (
        prefix.startswith("/")
        or "//" in prefix
        or any(p.startswith(".") for p in prefix.split("/") if p)
    ):
        raise InvalidKey(f"invalid key prefix {prefix!r}: it could never match a valid key")
    return prefix


@dataclass(frozen=True)
class ObjectInfo:
    """What :meth:`Backend.stat` and :meth:`Backend.list` report about one object."""

    key: str
    size: int
    #: Last modification time, seconds since the epoch (UTC).
    mtime: float


@runtime_checkable
class Backend(Protocol):
    """A store of byte objects by key. Every method validates keys with :func:`validate_key`
    (raising :class:`InvalidKey`) and converts failures into the store error tree:
    transient I/O or network failures raise ``StoreUnavailable`` (``StoreFull`` when out of
    space). Implementations are safe to call from several threads at once.
    """

    @property
    def url(self) -> str:
        """The URL this backend was opened with (for messages; holds no secret)."""
        ...

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        """Store ``data`` under ``key``, atomically: a concurrent or later reader sees either
        the previous object (or none) or all of ``data``, never a part.

        With ``create_only`` the put fails with ``ObjectExists`` if ``key`` is present, and of
        two concurrent create-only puts of one key exactly one succeeds. Without it an
        existing object is replaced.
        """
        ...

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes of ``key`` starting at ``offset`` (to the end when
        ``length`` is None). A range past the end is cut short: the result may be shorter than
        ``length``, and is empty when ``offset >= size``. Raises ``ObjectNotFound``.
        Negative ``offset`` or ``length`` raise ``StoreInputError``.
        """
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """Return the object's info, or None if there is no object under ``key``."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix`` (a plain string prefix, not
        only a directory), sorted by key. Temporary files of unfinished puts are never
        listed. Objects put or deleted while the iteration runs may or may not appear."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``. Idempotent: deleting a missing key is not an error."""
        ...


#: Builds a backend from its full URL (e.g. ``file:///srv/replica``).
BackendFactory = Callable[[str], Backend]

_SCHEMES: dict[str, BackendFactory] = {}
_LOCK = threading.Lock()
_BUILTINS_LOADED = False


def register_scheme(scheme: str, factory: BackendFactory) -> None:
    """Make :func:`open_backend` build URLs of ``scheme`` with ``factory``.

    Backends in other modules (``azure://``, ``s3://``) call this when imported; registering
    a scheme again replaces its factory (tests use this to install fakes).
    """
    if not re.match(r"^[a-z][a-z0-9+.-]*$", scheme):
        raise ValueError(f"invalid URL scheme {scheme!r}")
    with _LOCK:
        _SCHEMES[scheme] = factory


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    # Imported here, not at module top: the built-in backends import this module.
    from siterecovery.store import azure, file, memory, s3  # noqa: F401

    _BUILTINS_LOADED = True


def supported_schemes() -> list[str]:
    """The URL schemes :func:`open_backend` accepts, sorted."""
    _load_builtins()
    with _LOCK:
        return sorted(_SCHEMES)


def open_backend(url: str) -> Backend:
    """Open the backend for ``url``, chosen by its scheme.

    Raises :class:`UnknownScheme` (an input error) naming the supported schemes when no
    backend is registered for the URL's scheme.
    """
    _load_builtins()
    scheme = urlsplit(url).scheme if isinstance(url, str) else ""
    with _LOCK:
        factory = _SCHEMES.get(scheme)
        known = sorted(_SCHEMES)
    if factory is None:
        shown = f"{scheme}://" if scheme else "no scheme"
        raise UnknownScheme(
            f"unsupported replica store URL {url!r} ({shown}); supported schemes: "
            + ", ".join(f"{s}://" for s in known),
            hint="write the store location as a URL, e.g. file:///srv/siterecovery-replica",
        )
    return factory(url)
