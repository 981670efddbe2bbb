"""Backend wrappers: retry with backoff, a bandwidth limit, and metrics.

Each wrapper is itself a :class:`~siterecovery.store.backend.Backend` around any other
backend, so they stack; :func:`wrap_backend` stacks them in the one supported order::

    RetryingBackend            retries recoverable errors on a backoff schedule
      └─ ThrottledBackend      token bucket: bytes put + bytes got, per second
           └─ MetricsBackend   counts, bytes, errors, latency per operation and attempt
                └─ backend     file://, azure://, s3://, ...

Why this order: every attempt sends its bytes again, so the throttle sits inside the retry
loop and charges each attempt; metrics sit innermost so latency is the backend's own (not
throttle waits or backoff sleeps) and every attempt, failed ones included, is counted.

Clocks and sleeps are injected (``clock``, ``sleep``) so tests measure schedules and rates
without waiting. The errors shared by the network backends (:class:`StoreAuthError`,
:class:`ContainerNotFound`) live in :mod:`siterecovery.store.errors` and are re-exported here
for the modules that import them from this one.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from siterecovery.errors import SiteRecoveryError
from siterecovery.store.backend import Backend, ObjectInfo
from siterecovery.store.errors import (
    ContainerNotFound,
    ObjectExists,
    ObjectNotFound,
    StoreAuthError,
)

__all__ = [
    "BackendMetrics",
    "ContainerNotFound",
    "MetricsBackend",
    "OpStats",
    "RetryPolicy",
    "RetryingBackend",
    "StoreAuthError",
    "ThrottledBackend",
    "TokenBucket",
    "wrap_backend",
]

T = TypeVar("T")
Sleep = Callable[[float], None]
Clock = Callable[[], float]


# -- retry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long :class:`RetryingBackend` waits between attempts.

    Attempt ``n`` (1-based) that fails with a recoverable error is followed by a sleep of
    ``min(max_delay, base_delay * multiplier ** (n - 1))``, reduced by up to ``jitter``
    (a fraction, 0..1) at random so that many agents do not retry in lockstep. After
    ``attempts`` failed attempts the last error is raised.
    """

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy delays must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("RetryPolicy.jitter must be between 0 and 1")

    def delay(self, failed_attempt: int, rand: float = 0.0) -> float:
        """The sleep after ``failed_attempt`` (1-based); ``rand`` is a number in [0, 1)."""
        raw = min(self.max_delay, self.base_delay * self.multiplier ** (failed_attempt - 1))
        return raw * (1.0 - self.jitter * rand)


class RetryingBackend:
    """Retries operations of ``inner`` that fail with a recoverable error
    (``SiteRecoveryError.recoverable``, e.g. ``StoreUnavailable``), following ``policy``.
    Non-recoverable errors (``ObjectNotFound``, ``StoreAuthError``, ...) and foreign
    exceptions propagate at once.

    A create-only put is not idempotent: an attempt may store the object and still fail
    (the reply was lost). So when a retried create-only put meets ``ObjectExists``, the
    stored object is read back; if it holds exactly our bytes the put succeeded.
    """

    def __init__(
        self,
        inner: Backend,
        policy: RetryPolicy | None = None,
        *,
        sleep: Sleep = time.sleep,
        rand: Callable[[], float] = random.random,
        metrics: BackendMetrics | None = None,
    ) -> None:
        self.inner = inner
        self.policy = policy if policy is not None else RetryPolicy()
        self._sleep = sleep
        self._rand = rand
        self._metrics = metrics

    @property
    def url(self) -> str:
        return self.inner.url

    def _call(self, op: str, fn: Callable[[], T]) -> T:
        attempt = 1
        while True:
            try:
                return fn()
            except SiteRecoveryError as exc:
                if not exc.recoverable or attempt >= self.policy.attempts:
                    raise
                if self._metrics is not None:
                    self._metrics.record_retry(op)
                self._sleep(self.policy.delay(attempt, self._rand()))
                attempt += 1

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        if not create_only:
            self._call("put", lambda: self.inner.put(key, data))
            return
        attempts = [0]

        def once() -> None:
            attempts[0] += 1
            try:
                self.inner.put(key, data, create_only=True)
            except ObjectExists:
                if attempts[0] == 1 or not self._holds(key, data):
                    raise

        self._call("put", once)

    def _holds(self, key: str, data: bytes) -> bool:
        """Whether ``key`` holds exactly ``data`` (after an earlier attempt may have won)."""
        try:
            return self.inner.get(key) == data
        except ObjectNotFound:
            return False

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call("get", lambda: self.inner.get(key, offset, length))

    def stat(self, key: str) -> ObjectInfo | None:
        return self._call("stat", lambda: self.inner.stat(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Materialized inside the retry: a listing that fails half way restarts whole.
        return iter(self._call("list", lambda: list(self.inner.list(prefix))))

    def delete(self, key: str) -> None:
        self._call("delete", lambda: self.inner.delete(key))


# -- bandwidth limit --------------------------------------------------------------------------


class TokenBucket:
    """A token bucket of ``rate`` tokens (bytes) per second holding at most ``burst``.

    :meth:`consume` takes ``n`` tokens at once, letting the bucket go into debt, and sleeps
    until the debt is repaid. Requests larger than the bucket therefore pass (one put cannot
    be split) and the long-run rate is still exactly ``rate``. Thread-safe: concurrent
    callers reserve their tokens under a lock and queue behind each other's debt.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("bandwidth limit must be a positive number of bytes per second")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else self.rate
        if self.burst <= 0:
            raise ValueError("token bucket burst must be positive")
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    def consume(self, n: int) -> float:
        """Take ``n`` tokens, sleeping as long as needed; return the seconds slept."""
        if n <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


class ThrottledBackend:
    """Limits the bytes ``inner`` moves (put payloads and got bytes together) to
    ``limit_bps`` bytes per second on average, with bursts up to ``burst`` bytes (default:
    one second's worth). Puts are charged before they are sent, gets after they arrive
    (their size is known only then), which paces the next request."""

    def __init__(
        self,
        inner: Backend,
        limit_bps: float,
        *,
        burst: float | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
    ) -> None:
        self.inner = inner
        self.bucket = TokenBucket(limit_bps, burst, clock=clock, sleep=sleep)

    @property
    def url(self) -> str:
        return self.inner.url

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        self.bucket.consume(len(data))
        self.inner.put(key, data, create_only=create_only)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(key, offset, length)
        self.bucket.consume(len(data))
        return data

    def stat(self, key: str) -> ObjectInfo | None:
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


# -- metrics ------------------------------------------------------------------------------


@dataclass
class OpStats:
    """Counters of one operation kind (``put``, ``get``, ``stat``, ``list``, ``delete``).

    ``calls`` counts attempts that reached the backend (failed ones too), ``errors`` the
    failed ones by exception class name, ``retries`` the attempts a retry wrapper repeated.
    ``bytes`` is payload: bytes put, bytes got, objects listed for ``list``. Latency is in
    seconds of the backend call itself.
    """

    calls: int = 0
    retries: int = 0
    bytes: int = 0
    seconds: float = 0.0
    max_seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def mean_seconds(self) -> float:
        return self.seconds / self.calls if self.calls else 0.0


class BackendMetrics:
    """Thread-safe per-operation :class:`OpStats`, shared by the wrappers of one stack."""

    OPERATIONS = ("put", "get", "stat", "list", "delete")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops = {op: OpStats() for op in self.OPERATIONS}

    def record(self, op: str, seconds: float, nbytes: int = 0, error: str | None = None) -> None:
        """Record one attempt of ``op`` that took ``seconds``."""
        with self._lock:
            stats = self._ops[op]
            stats.calls += 1
            stats.bytes += nbytes
            stats.seconds += seconds
            stats.max_seconds = max(stats.max_seconds, seconds)
            if error is not None:
                stats.errors[error] = stats.errors.get(error, 0) + 1

    def record_retry(self, op: str) -> None:
        with self._lock:
            self._ops[op].retries += 1

    def snapshot(self) -> dict[str, OpStats]:
        """A consistent copy of every operation's counters."""
        with self._lock:
            return {
                op: OpStats(s.calls, s.retries, s.bytes, s.seconds, s.max_seconds, dict(s.errors))
                for op, s in self._ops.items()
            }

    def __getitem__(self, op: str) -> OpStats:
        return self.snapshot()[op]


class MetricsBackend:
    """Records calls, bytes, errors and latency of every operation of ``inner`` into
    ``metrics`` (a fresh :class:`BackendMetrics` unless one is given)."""

    def __init__(
        self,
        inner: Backend,
        metrics: BackendMetrics | None = None,
        *,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.inner = inner
        self.metrics = metrics if metrics is not None else BackendMetrics()
        self._clock = clock

    @property
    def url(self) -> str:
        return self.inner.url

    def _timed(self, op: str, fn: Callable[[], T], size: Callable[[T], int]) -> T:
        start = self._clock()
        try:
            result = fn()
        except BaseException as exc:
            self.metrics.record(op, self._clock() - start, error=type(exc).__name__)
            raise
        self.metrics.record(op, self._clock() - start, size(result))
        return result

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        self._timed(
            "put", lambda: self.inner.put(key, data, create_only=create_only), lambda _: len(data)
        )

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._timed("get", lambda: self.inner.get(key, offset, length), len)

    def stat(self, key: str) -> ObjectInfo | None:
        return self._timed("stat", lambda: self.inner.stat(key), lambda _: 0)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Materialized so the latency covers the whole listing, not just its first page.
        infos = self._timed("list", lambda: list(self.inner.list(prefix)), len)
        return iter(infos)

    def delete(self, key: str) -> None:
        self._timed("delete", lambda: self.inner.delete(key), lambda _: 0)


# -- stacking -----------------------------------------------------------------------------


def wrap_backend(
    backend: Backend,
    *,
    retry: RetryPolicy | None = RetryPolicy(),
    limit_bps: float | None = None,
    metrics: BackendMetrics | None = None,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
    rand: Callable[[], float] = random.random,
) -> Backend:
    """Stack the wrappers around ``backend`` in the order the module docstring gives.

    ``retry=None`` disables retrying, ``limit_bps=None`` the bandwidth limit, and
    ``metrics=None`` the metrics layer; with all three off ``backend`` is returned as is.
    ``sleep``, ``clock`` and ``rand`` are injectable for tests.
    """
    wrapped: Backend = backend
    if metrics is not None:
        wrapped = MetricsBackend(wrapped, metrics)
    if limit_bps is not None:
        wrapped = ThrottledBackend(wrapped, limit_bps, clock=clock, sleep=sleep)
    if retry is not None:
        wrapped = RetryingBackend(wrapped, retry, sleep=sleep, rand=rand, metrics=metrics)
    return wrapped
