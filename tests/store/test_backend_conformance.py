"""The backend contract, run against every backend in ``conftest.BACKEND_MAKERS``."""

from __future__ import annotations

import threading
import time

import pytest

from siterecovery.errors import InputError
from siterecovery.store import (
    Backend,
    InvalidKey,
    ObjectExists,
    ObjectNotFound,
    StoreInputError,
    UnknownScheme,
    open_backend,
    supported_schemes,
)


def test_put_get_round_trip(backend: Backend) -> None:
    backend.put("a/b/c", b"hello")
    assert backend.get("a/b/c") == b"hello"


def test_empty_and_large_objects(backend: Backend) -> None:
    big = bytes(range(256)) * 8192  # 2 MiB
    backend.put("empty", b"")
    backend.put("big", big)
    assert backend.get("empty") == b""
    assert backend.get("big") == big


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, None, b"0123456789"),
        (3, None, b"3456789"),
        (3, 4, b"3456"),
        (8, 10, b"89"),  # cut short at the end
        (10, 5, b""),  # at the end
        (20, None, b""),  # past the end
        (0, 0, b""),
    ],
)
def test_get_ranges(backend: Backend, offset: int, length: int | None, expected: bytes) -> None:
    backend.put("r", b"0123456789")
    assert backend.get("r", offset, length) == expected


def test_negative_range_is_refused(backend: Backend) -> None:
    backend.put("r", b"x")
    with pytest.raises(StoreInputError):
        backend.get("r", -1)
    with pytest.raises(StoreInputError):
        backend.get("r", 0, -1)


def test_missing_object(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound, match="nope"):
        backend.get("nope")
    assert backend.stat("nope") is None


def test_put_replaces(backend: Backend) -> None:
    backend.put("k", b"one")
    backend.put("k", b"two")
    assert backend.get("k") == b"two"


def test_create_only_never_replaces(backend: Backend) -> None:
    backend.put("k", b"first", create_only=True)
    with pytest.raises(ObjectExists):
        backend.put("k", b"second", create_only=True)
    assert backend.get("k") == b"first"


def test_stat(backend: Backend) -> None:
    before = time.time()
    backend.put("s/obj", b"12345")
    info = backend.stat("s/obj")
    assert info is not None
    assert (info.key, info.size) == ("s/obj", 5)
    assert before - 5 < info.mtime < time.time() + 5


def test_stat_of_a_prefix_is_none(backend: Backend) -> None:
    backend.put("dir/obj", b"x")
    assert backend.stat("dir") is None


def test_list_is_sorted_and_filtered_by_string_prefix(backend: Backend) -> None:
    keys = ["a/b", "a/bc/d", "a.x", "a-y", "ab", "b/c", "a/b0"]
    for key in keys:
        backend.put(key, key.encode())
    assert [i.key for i in backend.list()] == sorted(keys)
    assert [i.key for i in backend.list("a/b")] == ["a/b", "a/b0", "a/bc/d"]
    assert [i.key for i in backend.list("a/")] == ["a/b", "a/b0", "a/bc/d"]
    assert [i.key for i in backend.list("a")] == sorted(k for k in keys if k.startswith("a"))
    assert [i.size for i in backend.list("b/")] == [3]
    assert list(backend.list("zzz/")) == []


def test_delete_is_idempotent(backend: Backend) -> None:
    backend.put("d/x", b"1")
    backend.delete("d/x")
    backend.delete("d/x")
    backend.delete("never/was")
    assert backend.stat("d/x") is None
    with pytest.raises(ObjectNotFound):
        backend.get("d/x")
    assert list(backend.list("d/")) == []


BAD_KEYS = [
    "",
    "/a",
    "a/",
    "a//b",
    "..",
    "../x",
    "a/../b",
    "./a",
    ".hidden",
    "a/.tmp-1",
    "a b",
    "a\\b",
    "ä",
    "a\nb",
    "x" * 1025,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused_everywhere(backend: Backend, key: str) -> None:
    for call in (
        lambda: backend.put(key, b"x"),
        lambda: backend.get(key),
        lambda: backend.stat(key),
        lambda: backend.delete(key),
    ):
        with pytest.raises(InvalidKey):
            call()
    assert list(backend.list()) == []


def test_invalid_key_is_an_input_error(backend: Backend) -> None:
    with pytest.raises(InputError):
        backend.put("../etc/passwd", b"x")


def test_concurrent_create_only_has_one_winner(backend: Backend) -> None:
    n = 8
    results: list[str] = [""] * n
    barrier = threading.Barrier(n)

    def racer(i: int) -> None:
        barrier.wait()
        try:
            backend.put("race", f"writer-{i}".encode() * 1000, create_only=True)
            results[i] = "won"
        except ObjectExists:
            results[i] = "lost"

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("won") == 1
    winner = results.index("won")
    assert backend.get("race") == f"writer-{winner}".encode() * 1000


def test_concurrent_puts_of_different_keys(backend: Backend) -> None:
    def writer(i: int) -> None:
        for j in range(20):
            backend.put(f"c/{i}/{j}", bytes([i, j]) * 100)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    infos = list(backend.list("c/"))
    assert len(infos) == 80
    assert backend.get("c/3/19") == bytes([3, 19]) * 100


def test_url_round_trips(backend: Backend) -> None:
    backend.put("k", b"v")
    assert open_backend(backend.url).get("k") == b"v"


def test_unknown_scheme_lists_supported_ones() -> None:
    with pytest.raises(UnknownScheme) as err:
        open_backend("gopher://host/x")
    assert "file://" in str(err.value) and "memory://" in str(err.value)
    assert isinstance(err.value, InputError) and err.value.exit_code == 2
    with pytest.raises(UnknownScheme, match="no scheme"):
        open_backend("/plain/path")
    assert {"file", "memory"} <= set(supported_schemes())
