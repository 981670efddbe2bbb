"""Backend wrappers (retry, bandwidth limit, metrics) over the memory backend with injected
faults, a fake clock and a recording sleep: nothing here waits in real time."""

from __future__ import annotations

import threading

import pytest

from siterecovery.store import Backend, ObjectExists, ObjectNotFound, StoreUnavailable
from siterecovery.store.errors import IntegrityError
from siterecovery.store.memory import MemoryBackend
from siterecovery.store.wrappers import (
    BackendMetrics,
    MetricsBackend,
    RetryingBackend,
    RetryPolicy,
    StoreAuthError,
    ThrottledBackend,
    TokenBucket,
    wrap_backend,
)


class FakeClock:
    """A monotonic clock that only moves when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


POLICY = RetryPolicy(attempts=4, base_delay=0.5, max_delay=3.0, multiplier=2.0, jitter=0.0)


def flaky_gets(backend: MemoryBackend, failures: int, error: Exception) -> list[int]:
    """Make the next ``failures`` gets raise ``error``; return the attempt counter."""
    calls = [0]

    def hook(_key: str, data: bytes) -> bytes:
        calls[0] += 1
        if calls[0] <= failures:
            raise error
        return data

    backend.get_hook = hook
    return calls


# -- retry ----------------------------------------------------------------------------------


def test_policy_schedule_grows_and_is_capped() -> None:
    assert [POLICY.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittery = RetryPolicy(base_delay=1.0, jitter=0.5)
    assert jittery.delay(1, rand=0.0) == 1.0
    assert jittery.delay(1, rand=0.999) == pytest.approx(0.5005)


@pytest.mark.parametrize(
    "bad",
    [{"attempts": 0}, {"base_delay": -1.0}, {"multiplier": 0.5}, {"jitter": 1.5}],
)
def test_policy_rejects_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**bad)  # type: ignore[arg-type]


def test_recoverable_put_failure_is_retried_until_it_succeeds() -> None:
    inner = MemoryBackend("retry")
    inner.fail_nth_put(1)
    clock = FakeClock()
    backend = RetryingBackend(inner, POLICY, sleep=clock.sleep)
    backend.put("k", b"data")
    assert inner.raw("k") == b"data"
    assert clock.sleeps == [0.5]


def test_gives_up_after_the_schedule_with_the_last_error() -> None:
    inner = MemoryBackend("retry")
    calls = flaky_gets(inner, failures=99, error=StoreUnavailable("network down"))
    inner.put("k", b"x")
    clock = FakeClock()
    backend = RetryingBackend(inner, POLICY, sleep=clock.sleep)
    with pytest.raises(StoreUnavailable, match="network down"):
        backend.get("k")
    assert calls[0] == POLICY.attempts
    assert clock.sleeps == [0.5, 1.0, 2.0]


@pytest.mark.parametrize(
    "error",
    [
        StoreAuthError("bad signature"),
        IntegrityError("corrupt"),
        ObjectNotFound("gone"),
        ValueError("a bug, not a store error"),
    ],
)
def test_non_recoverable_errors_are_not_retried(error: Exception) -> None:
    inner = MemoryBackend("retry")
    inner.put("k", b"x")
    calls = flaky_gets(inner, failures=99, error=error)
    clock = FakeClock()
    backend = RetryingBackend(inner, POLICY, sleep=clock.sleep)
    with pytest.raises(type(error)):
        backend.get("k")
    assert calls[0] == 1
    assert clock.sleeps == []


def test_create_only_put_whose_first_attempt_landed_is_a_success() -> None:
    # The first attempt stores the object but its reply is lost (raises after storing).
    inner = MemoryBackend("retry")
    real_put = MemoryBackend.put
    attempts = [0]

    def put(key: str, data: bytes, *, create_only: bool = False) -> None:
        attempts[0] += 1
        real_put(inner, key, data, create_only=create_only)
        if attempts[0] == 1:
            raise StoreUnavailable("connection reset after the request was sent")

    inner.put = put  # type: ignore[method-assign]
    backend = RetryingBackend(inner, POLICY, sleep=FakeClock().sleep)
    backend.put("point", b"manifest", create_only=True)
    assert attempts[0] == 2
    assert inner.raw("point") == b"manifest"


def test_create_only_put_losing_to_another_writer_after_a_retry_still_fails() -> None:
    inner = MemoryBackend("retry")
    inner.fail_nth_put(1)
    backend = RetryingBackend(inner, POLICY, sleep=FakeClock().sleep)
    inner_put = inner.put_hook

    def other_writer_wins(key: str, data: bytes) -> None:
        # Between our failed attempt and the retry, someone else stores the key.
        if inner_put is not None:
            try:
                inner_put(key, data)
            finally:
                inner.put_hook = None
                inner.put(key, b"theirs")

    inner.put_hook = other_writer_wins
    with pytest.raises(ObjectExists):
        backend.put("point", b"ours", create_only=True)
    assert inner.raw("point") == b"theirs"


def test_create_only_exists_on_the_first_attempt_is_not_retried() -> None:
    inner = MemoryBackend("retry")
    inner.put("k", b"same")
    clock = FakeClock()
    backend = RetryingBackend(inner, POLICY, sleep=clock.sleep)
    with pytest.raises(ObjectExists):
        backend.put("k", b"same", create_only=True)
    assert clock.sleeps == []


def test_list_retries_as_a_whole() -> None:
    inner = MemoryBackend("retry")
    for key in ("a/1", "a/2"):
        inner.put(key, b"x")
    failures = [1]
    real_list = inner.list

    def flaky_list(prefix: str = "") -> object:
        if failures[0]:
            failures[0] -= 1
            raise StoreUnavailable("listing failed")
        return real_list(prefix)

    inner.list = flaky_list  # type: ignore[assignment,method-assign]
    backend = RetryingBackend(inner, POLICY, sleep=FakeClock().sleep)
    assert [i.key for i in backend.list("a/")] == ["a/1", "a/2"]


# -- bandwidth ------------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_holds_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=500, clock=clock, sleep=clock.sleep)
    assert bucket.consume(500) == 0.0  # the burst passes at once
    assert bucket.consume(1000) == pytest.approx(1.0)
    clock.now += 10  # idle time refills at most `burst`
    assert bucket.consume(500) == 0.0
    assert bucket.consume(250) == pytest.approx(0.25)


def test_throttled_puts_and_gets_move_at_the_limit() -> None:
    clock = FakeClock()
    inner = MemoryBackend("throttle")
    rate = 1_000_000
    backend = ThrottledBackend(inner, rate, clock=clock, sleep=clock.sleep)
    start = clock.now
    for i in range(10):
        backend.put(f"o/{i}", bytes(500_000))
    for i in range(10):
        assert len(backend.get(f"o/{i}")) == 500_000
    # 10 MB moved at 1 MB/s with a 1 MB initial burst: 9 s of fake time.
    assert clock.now - start == pytest.approx(9.0)
    assert inner.raw("o/9") == bytes(500_000)


def test_one_object_larger_than_the_burst_passes_and_is_paid_for() -> None:
    clock = FakeClock()
    backend = ThrottledBackend(
        MemoryBackend("throttle"), 1000, burst=100, clock=clock, sleep=clock.sleep
    )
    backend.put("big", bytes(5100))
    assert clock.sleeps == [pytest.approx(5.0)]


def test_concurrent_writers_share_one_limit() -> None:
    # A frozen clock: each waiter's sleep is exactly the debt queued ahead of it, whatever
    # the thread interleaving.
    sleeps: list[float] = []
    lock = threading.Lock()

    def sleep(seconds: float) -> None:
        with lock:
            sleeps.append(seconds)

    backend = ThrottledBackend(
        MemoryBackend("throttle"), 100_000, clock=lambda: 1000.0, sleep=sleep
    )
    threads = [
        threading.Thread(target=backend.put, args=(f"t/{i}", bytes(50_000))) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 400 kB at 100 kB/s, the first 100 kB from the burst: the writers queue 0.5 s apart.
    assert sorted(sleeps) == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])


def test_invalid_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        ThrottledBackend(MemoryBackend("throttle"), 0)


# -- metrics --------------------------------------------------------------------------------


def test_metrics_count_calls_bytes_errors_and_latency() -> None:
    ticks = iter(float(i) for i in range(100))
    inner = MemoryBackend("metrics")
    backend = MetricsBackend(inner, clock=lambda: next(ticks))
    backend.put("a", b"12345")
    backend.put("b", b"xy")
    assert backend.get("a", 1, 2) == b"23"
    with pytest.raises(ObjectNotFound):
        backend.get("missing")
    assert backend.stat("a") is not None
    assert [i.key for i in backend.list()] == ["a", "b"]
    backend.delete("a")
    stats = backend.metrics.snapshot()
    assert (stats["put"].calls, stats["put"].bytes) == (2, 7)
    assert (stats["get"].calls, stats["get"].bytes, stats["get"].errors) == (
        2,
        2,
        {"ObjectNotFound": 1},
    )
    assert (stats["list"].calls, stats["list"].bytes) == (1, 2)
    assert stats["stat"].calls == stats["delete"].calls == 1
    # Every call took exactly one tick of the fake clock.
    assert stats["put"].seconds == 2.0 and stats["put"].max_seconds == 1.0
    assert stats["get"].mean_seconds == 1.0


# -- the stack ------------------------------------------------------------------------------


def test_wrap_backend_stacks_retry_throttle_and_metrics() -> None:
    inner = MemoryBackend("stack")
    inner.fail_nth_put(1)
    clock = FakeClock()
    metrics = BackendMetrics()
    backend = wrap_backend(
        inner,
        retry=POLICY,
        limit_bps=1000,
        metrics=metrics,
        sleep=clock.sleep,
        clock=clock,
        rand=lambda: 0.0,
    )
    assert isinstance(backend, Backend)
    assert backend.url == "memory://stack"
    backend.put("k", bytes(1500))
    assert inner.raw("k") == bytes(1500)
    put = metrics["put"]
    # Two attempts reached the backend, one failed and was retried.
    assert (put.calls, put.retries, put.errors) == (2, 1, {"StoreUnavailable": 1})
    # Each attempt paid for its bytes: 3000 bytes at 1000 B/s with a 1000 B burst is 2 s
    # (the 0.5 s backoff sleep refilled the bucket too); the sleeps were 0.5 (debt of the
    # first attempt), 0.5 (backoff), 1.0 (debt of the second attempt).
    assert clock.sleeps == pytest.approx([0.5, 0.5, 1.0])
    assert clock.now - 1000.0 == pytest.approx(2.0)


def test_wrap_backend_with_everything_off_is_the_backend() -> None:
    inner = MemoryBackend("plain")
    assert wrap_backend(inner, retry=None) is inner
