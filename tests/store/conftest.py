"""Fixtures for the replica store tests.

Backends under test are listed in ``BACKEND_MAKERS``: the conformance suite and the
repository tests run against each. A new backend (azure://, s3://) joins every test by adding
a maker that yields a URL for an empty location. ``azure`` and ``s3`` run against real
Azurite and SeaweedFS servers (``tests/servers.py``); a missing server fails the test.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from siterecovery.store import Backend, ReplicaStore, StoreKeys, open_backend
from siterecovery.store.memory import drop_memory_store

# tests/ is on sys.path (pytest's rootdir of the test packages): one shared module, so one
# pool of servers per session whichever test file starts them first.
import servers  # isort: skip


@contextmanager
def _memory_url(_tmp: Path) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex}"
    try:
        yield f"memory://{name}"
    finally:
        drop_memory_store(name)


@contextmanager
def _file_url(tmp: Path) -> Iterator[str]:
    yield f"file://{tmp}/replica"


@contextmanager
def _azure_url(_tmp: Path) -> Iterator[str]:
    # A fresh prefix in one shared container of the session's Azurite; the connection
    # string is in the environment while the test runs, as open_backend expects.
    server = _real_server(servers.shared_azurite)
    server.create_container("conformance")
    with servers.environ(server.env()):
        yield server.url("conformance", f"t-{uuid.uuid4().hex[:12]}")


@contextmanager
def _s3_url(_tmp: Path) -> Iterator[str]:
    # A fresh prefix in one shared bucket of the session's SeaweedFS.
    server = _real_server(servers.shared_seaweedfs)
    server.create_bucket("conformance")
    with servers.environ(server.env()):
        yield server.url("conformance", f"t-{uuid.uuid4().hex[:12]}")


_S = TypeVar("_S")


def _real_server(start: Callable[[], _S]) -> _S:
    try:
        return start()
    except servers.ServerSetupError as exc:  # a failure, never a skip
        pytest.fail(str(exc), pytrace=False)


BACKEND_MAKERS: dict[str, Callable[[Path], AbstractContextManager[str]]] = {
    "memory": _memory_url,
    "file": _file_url,
    "azure": _azure_url,
    "s3": _s3_url,
}


@pytest.fixture(params=sorted(BACKEND_MAKERS))
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty location, once per backend kind."""
    with BACKEND_MAKERS[request.param](tmp_path) as url:
        yield url


@pytest.fixture
def memory_url(tmp_path: Path) -> Iterator[str]:
    with _memory_url(tmp_path) as url:
        yield url


@pytest.fixture
def backend(store_url: str) -> Backend:
    return open_backend(store_url)


@pytest.fixture(scope="session")
def keys() -> StoreKeys:
    return StoreKeys.generate()


#: Small blocks keep the tests fast while exercising many blocks per disk.
BLOCK = 64 * 1024


@pytest.fixture
def store(store_url: str, keys: StoreKeys) -> ReplicaStore:
    return ReplicaStore.init(store_url, keys, block_size=BLOCK, workers=2)


@pytest.fixture
def mem_store(memory_url: str, keys: StoreKeys) -> ReplicaStore:
    return ReplicaStore.init(memory_url, keys, block_size=BLOCK, workers=2)
