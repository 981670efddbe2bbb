"""What the writers, readers and verifier of one opened store share, plus small helpers."""

from __future__ import annotations

import functools
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from siterecovery.store.backend import Backend
from siterecovery.store.codec import Codec

__all__ = ["StoreContext", "is_zero", "ordered_map", "zeros"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class StoreContext:
    """An opened store: its backend, codec, block size and parallelism limits.

    ``workers`` threads hash, compress, seal, put and get (BLAKE3, zstd and AES-GCM release
    the GIL); at most ``max_in_flight`` blocks are held by queued or running work, which
    bounds memory to about ``max_in_flight * block_size`` per writer or reader.
    """

    backend: Backend
    codec: Codec
    block_size: int
    workers: int = 4
    max_in_flight: int = 8
    #: Keys of objects this process wrote or checked, so publishing a point only stats the
    #: references it has not seen (chains grow by one segment per cycle).
    known: set[str] = field(default_factory=set)

    def pool(self, name: str) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.workers, thread_name_prefix=f"store-{name}")


def new_object_id() -> str:
    """A unique, time-sortable id for index and segment objects."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex[:12]}"


@functools.lru_cache(maxsize=8)
def zeros(length: int) -> bytes:
    """``length`` zero bytes, shared (blocks are mostly of one or two lengths)."""
    return bytes(length)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte of ``data`` is zero."""
    view = memoryview(data)
    # The first byte rules out most data blocks without a copy.
    return not view.nbytes or (view[0] == 0 and view.tobytes() == zeros(view.nbytes))


def ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], window: int
) -> Iterator[R]:
    """Like ``pool.map`` but with at most ``window`` calls queued or running ahead of the
    consumer, so memory stays bounded. Results come in order; the first failure is raised
    when its result is reached, and closing the iterator cancels what is still queued."""
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
