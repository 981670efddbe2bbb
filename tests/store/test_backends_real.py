"""azure:// and s3:// against real servers (Azurite, SeaweedFS): URL forms, credentials,
error mapping, outages with retry, races, interrupted large uploads, and a replica store
written and restored end to end. The shared contract tests run against both through
``conftest.BACKEND_MAKERS``; this file covers what only a real server can show."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from siterecovery.store import (
    Backend,
    DiskChain,
    ObjectExists,
    ReplicaStore,
    StoreInputError,
    StoreKeys,
    StoreUnavailable,
    open_backend,
    supported_schemes,
)
from siterecovery.store.azure import AzureBackend
from siterecovery.store.s3 import ConditionalWritesUnsupported, S3Backend
from siterecovery.store.wrappers import (
    ContainerNotFound,
    RetryingBackend,
    RetryPolicy,
    StoreAuthError,
)

from .helpers import random_disk, random_extents, write_base, write_segment

import servers  # isort: skip
from servers import (  # isort: skip  # noqa: F401  (session fixtures)
    AzuriteServer,
    RealServer,
    SeaweedFSServer,
    azurite,
    seaweedfs,
)

KiB = 1024
MiB = 1024 * KiB
#: Small thresholds so "large" objects (multipart uploads, staged blocks) stay fast. S3
#: parts cannot be smaller than 5 MiB (the backend raises smaller settings to that), so
#: large test objects span several 5 MiB parts or 1 MiB Azure blocks.
THRESHOLD = 512 * KiB
PART = 1 * MiB
S3_PART = 5 * MiB
LARGE = 11 * MiB
FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, jitter=0.0)


class AgentCrashed(Exception):
    """Raised from an upload hook: the writing process died half way."""


@dataclass
class Target:
    """One real server and how to build backends on it."""

    kind: str
    server: RealServer
    container: str

    def make(self, prefix: str = "", *, secret: str | None = None, **opts: Any) -> Backend:
        """A backend with no SDK retries, short timeouts and small large-object limits."""
        if isinstance(self.server, AzuriteServer):
            cs = self.server.connection_string(
                secret or servers.AZURITE_KEY,
            )
            return AzureBackend(
                self.server.account,
                self.container,
                prefix,
                connection_string=cs,
                single_put_limit=opts.pop("threshold", THRESHOLD),
                block_size=PART,
                sdk_attempts=1,
                connect_timeout=2,
                read_timeout=10,
                **opts,
            )
        assert isinstance(self.server, SeaweedFSServer)
        return S3Backend(
            self.container,
            prefix,
            endpoint_url=self.server.endpoint,
            region=servers.S3_REGION,
            access_key=servers.S3_ACCESS_KEY,
            secret_key=secret or servers.S3_SECRET_KEY,
            multipart_threshold=opts.pop("threshold", THRESHOLD),
            part_size=PART,
            sdk_attempts=1,
            connect_timeout=2,
            read_timeout=10,
            **opts,
        )

    def fresh(self, **opts: Any) -> Backend:
        """A backend on an empty prefix of its own."""
        return self.make(f"t-{uuid.uuid4().hex[:12]}", **opts)

    def url(self, prefix: str = "") -> str:
        if isinstance(self.server, AzuriteServer):
            return self.server.url(self.container, prefix)
        assert isinstance(self.server, SeaweedFSServer)
        return self.server.url(self.container, prefix)

    def raw_names(self) -> list[str]:
        """Every object name in the container/bucket, read with the SDK directly."""
        if isinstance(self.server, AzuriteServer):
            service = self.server._service()
            return [b.name for b in service.get_container_client(self.container).list_blobs()]
        assert isinstance(self.server, SeaweedFSServer)
        client = self.server.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.container)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def ensure(self) -> None:
        """Start the server if a test stopped it, and create the container/bucket."""
        self.server.start()
        if isinstance(self.server, AzuriteServer):
            self.server.create_container(self.container)
        else:
            assert isinstance(self.server, SeaweedFSServer)
            self.server.create_bucket(self.container)


@pytest.fixture(params=["azure", "s3"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    name = "azure" if request.param == "azure" else "s3"
    server = request.getfixturevalue("azurite" if name == "azure" else "seaweedfs")
    t = Target(name, server, "real-tests")
    t.ensure()
    with servers.environ(server.env()):
        yield t
    t.ensure()  # leave the shared server running for the next test


# -- URL forms and credentials ------------------------------------------------------------


def test_url_prefix_is_stripped_and_url_round_trips(target: Target) -> None:
    prefix = f"site-{uuid.uuid4().hex[:8]}/replica"
    backend = open_backend(target.url(prefix))
    assert backend.url == target.url(prefix)
    backend.put("points/vm1/p.json", b"{}")
    assert f"{prefix}/points/vm1/p.json" in target.raw_names()
    assert [i.key for i in backend.list()] == ["points/vm1/p.json"]
    assert [i.key for i in open_backend(backend.url).list("points/")] == ["points/vm1/p.json"]
    # A bare container/bucket URL sees the prefixed object under its full name.
    bare = open_backend(target.url())
    assert bare.get(f"{prefix}/points/vm1/p.json") == b"{}"


def test_dot_names_and_foreign_objects_are_never_listed(target: Target) -> None:
    backend = target.fresh()
    assert isinstance(backend, AzureBackend | S3Backend)
    root = f"{backend.prefix}/"
    # Objects another tool wrote under the prefix with names that are not store keys.
    if isinstance(target.server, AzuriteServer):
        cc = target.server._service().get_container_client(target.container)
        cc.upload_blob(root + ".tmp-upload", b"x")
        cc.upload_blob(root + "a//b", b"x")
    else:
        assert isinstance(target.server, SeaweedFSServer)
        target.server.client().put_object(Bucket=target.container, Key=root + ".probe", Body=b"")
    backend.put("ok", b"1")
    assert [i.key for i in backend.list()] == ["ok"]


def test_schemes_are_registered_without_importing_the_sdks_eagerly() -> None:
    assert {"azure", "s3", "file", "memory"} <= set(supported_schemes())
    # Opening a file:// store must not pay for loading the cloud SDKs.
    code = (
        "import sys; from siterecovery.store import open_backend, supported_schemes;"
        "assert {'azure', 's3'} <= set(supported_schemes());"
        "open_backend('file:///tmp/x');"
        "print(sorted(m for m in ('boto3', 'botocore', 'azure.storage.blob') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKID:secret@bucket/x",
        "s3://bucket:9000/x",
        "s3://Bad_Bucket/x",
        "s3://bucket/x?secret=1",
        "s3://bucket/../x",
        "azure://devstoreaccount1",
        "azure://key@devstoreaccount1/c",
        "azure://devstoreaccount1/Bad_Container",
        "azure://otheraccount/container",
        "azure://devstoreaccount1/container/a//b",
    ],
)
@pytest.mark.usefixtures("azurite")
def test_bad_urls_are_input_errors(url: str) -> None:
    with servers.environ(servers.shared_azurite().env()), pytest.raises(StoreInputError):
        open_backend(url)


def test_missing_azure_credentials_are_an_auth_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("SITERECOVERY_AZURE_CONFIG", raising=False)
    with pytest.raises(StoreAuthError, match="no Azure credentials") as err:
        open_backend("azure://devstoreaccount1/container")
    assert not err.value.recoverable and "AZURE_STORAGE_CONNECTION_STRING" in err.value.hint


@pytest.mark.usefixtures("azurite")
def test_azure_connection_string_from_a_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = servers.shared_azurite()
    config = tmp_path / "azure.conf"
    config.write_text(f"# siterecovery azure credentials\n\n{server.connection_string()}\n")
    monkeypatch.setenv("SITERECOVERY_AZURE_CONFIG", str(config))
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountName=wrong;AccountKey=AAAA")
    server.create_container("real-tests")
    backend = open_backend(server.url("real-tests", f"cfg-{uuid.uuid4().hex[:8]}"))
    backend.put("k", b"from the config file")
    assert backend.get("k") == b"from the config file"
    monkeypatch.setenv("SITERECOVERY_AZURE_CONFIG", str(tmp_path / "missing.conf"))
    with pytest.raises(StoreAuthError, match=r"missing\.conf"):
        open_backend(server.url("real-tests"))


@pytest.mark.parametrize(
    "connection_string",
    [
        "AccountName=devstoreaccount1;AccountKey=not*base64!;BlobEndpoint=http://127.0.0.1:9/x",
        "AccountName=devstoreaccount1;BlobEndpoint=http://127.0.0.1:9/x",
    ],
    ids=["key-not-base64", "no-key"],
)
def test_unusable_azure_key_is_an_auth_error(connection_string: str) -> None:
    with pytest.raises(StoreAuthError):
        AzureBackend("devstoreaccount1", "container", connection_string=connection_string)


def test_wrong_credentials_raise_auth_error_and_are_not_retried(target: Target) -> None:
    good = target.fresh()
    good.put("k", b"v")
    assert isinstance(good, AzureBackend | S3Backend)
    wrong = servers.AZURITE_KEY.replace("Eby8", "Xby8") if target.kind == "azure" else "nope"
    bad = target.make(good.prefix, secret=wrong)
    sleeps: list[float] = []
    retrying = RetryingBackend(bad, FAST_RETRY, sleep=sleeps.append)
    for call in (
        lambda: retrying.put("k", b"overwrite"),
        lambda: retrying.put("new", b"x", create_only=True),
        lambda: retrying.get("k"),
        lambda: retrying.stat("k"),
        lambda: list(retrying.list()),
        lambda: retrying.delete("k"),
    ):
        with pytest.raises(StoreAuthError) as err:
            call()
        assert not err.value.recoverable
    assert sleeps == []
    assert good.get("k") == b"v"


def test_missing_container_or_bucket_is_named(target: Target) -> None:
    other = Target(target.kind, target.server, f"absent-{uuid.uuid4().hex[:8]}")
    backend = other.make()
    with pytest.raises(ContainerNotFound, match=other.container):
        backend.put("k", b"v")
    with pytest.raises(ContainerNotFound):
        list(backend.list())


# -- large objects ---------------------------------------------------------------------------


def test_large_objects_round_trip_with_ranges(target: Target) -> None:
    backend = target.fresh()
    data = random.Random(7).randbytes(LARGE + 12345)  # several parts / blocks
    backend.put("big", data, create_only=True)
    assert backend.get("big") == data
    info = backend.stat("big")
    assert info is not None and info.size == len(data)
    # Ranges across part boundaries, and cut short at the end.
    for offset, length in [(S3_PART - 10, 20), (PART - 1, S3_PART + 2), (len(data) - 5, 100)]:
        assert backend.get("big", offset, length) == data[offset : offset + length]
    with pytest.raises(ObjectExists):
        backend.put("big", b"small now", create_only=True)
    with pytest.raises(ObjectExists):
        backend.put("big", data[::-1], create_only=True)
    assert backend.get("big") == data


@pytest.mark.parametrize("size", [64 * KiB, LARGE], ids=["single-put", "multipart"])
def test_two_concurrent_create_only_puts_have_one_winner(target: Target, size: int) -> None:
    backend = target.fresh()
    payloads = [bytes([i + 1]) * size for i in range(2)]
    results: list[str] = ["", ""]
    barrier = threading.Barrier(2)

    def racer(i: int) -> None:
        barrier.wait()
        try:
            backend.put("race", payloads[i], create_only=True)
            results[i] = "won"
        except ObjectExists:
            results[i] = "lost"

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["lost", "won"]
    assert backend.get("race") == payloads[results.index("won")]


def _part_hook(backend: Backend, after: int, action: Callable[[], None]) -> None:
    def hook(number: int, _size: int) -> None:
        if number == after:
            action()

    assert isinstance(backend, AzureBackend | S3Backend)
    backend.on_part = hook


def test_writer_dying_mid_upload_leaves_the_old_object_whole(target: Target) -> None:
    backend = target.fresh()
    backend.put("obj", b"old content")

    def crash() -> None:
        raise AgentCrashed

    _part_hook(backend, 2, crash)
    with pytest.raises(AgentCrashed):
        backend.put("obj", bytes(LARGE))
    with pytest.raises(AgentCrashed):
        backend.put("new", bytes(LARGE))
    assert backend.get("obj") == b"old content"
    assert backend.stat("new") is None
    assert [i.key for i in backend.list()] == ["obj"]


def test_server_killed_mid_upload_leaves_nothing_visible(target: Target) -> None:
    backend = target.fresh()
    _part_hook(backend, 2, target.server.kill)
    with pytest.raises(StoreUnavailable) as err:
        backend.put("interrupted", bytes(LARGE), create_only=True)
    assert err.value.recoverable
    target.ensure()
    assert backend.stat("interrupted") is None
    assert list(backend.list()) == []
    # The key is still free: a create-only put of it succeeds.
    backend.on_part = None  # type: ignore[attr-defined]
    backend.put("interrupted", b"whole", create_only=True)
    assert backend.get("interrupted") == b"whole"


# -- outages ------------------------------------------------------------------------------


def test_server_down_is_recoverable_and_retry_succeeds_once_it_is_back(target: Target) -> None:
    backend = target.fresh()
    target.server.kill()
    for call in (
        lambda: backend.put("k", b"v"),
        lambda: backend.get("k"),
        lambda: backend.stat("k"),
        lambda: list(backend.list()),
    ):
        with pytest.raises(StoreUnavailable) as err:
            call()
        assert err.value.recoverable

    sleeps: list[float] = []

    def sleep_then_recover(seconds: float) -> None:
        # The first backoff is when the operator (here: the test) brings the server back.
        sleeps.append(seconds)
        if len(sleeps) == 1:
            target.ensure()

    retrying = RetryingBackend(backend, FAST_RETRY, sleep=sleep_then_recover)
    retrying.put("k", b"stored after the outage", create_only=True)
    assert sleeps == [0.01]
    assert retrying.get("k") == b"stored after the outage"


def test_retry_gives_up_while_the_server_stays_down(target: Target) -> None:
    backend = target.fresh()
    target.server.kill()
    sleeps: list[float] = []
    retrying = RetryingBackend(backend, FAST_RETRY, sleep=sleeps.append)
    with pytest.raises(StoreUnavailable):
        retrying.get("k")
    assert len(sleeps) == FAST_RETRY.attempts - 1


# -- conditional writes ---------------------------------------------------------------------


@pytest.mark.usefixtures("seaweedfs")
def test_s3_server_ignoring_if_none_match_is_detected() -> None:
    server = servers.shared_seaweedfs()
    # A client that drops the header simulates a server that ignores it.
    bucket = f"nocond-{uuid.uuid4().hex[:8]}"
    server.create_bucket(bucket)
    client = server.client(secret=servers.S3_SECRET_KEY + "")  # a private client

    def drop_condition(request: Any, **_kwargs: Any) -> None:
        if "If-None-Match" in request.headers:
            del request.headers["If-None-Match"]

    client.meta.events.register("before-sign.s3.PutObject", drop_condition)
    backend = S3Backend(bucket, "p", client=client)
    backend.put("k", b"first")
    with pytest.raises(ConditionalWritesUnsupported, match="If-None-Match"):
        backend.put("k", b"second", create_only=True)
    assert backend.get("k") == b"first"
    assert [i.key for i in backend.list()] == ["k"]


# -- end to end ------------------------------------------------------------------------------


def test_replica_store_end_to_end(target: Target, tmp_path: Path) -> None:
    keys = StoreKeys.generate()
    url = target.url(f"e2e-{uuid.uuid4().hex[:8]}")
    bs = 64 * KiB
    rnd = random.Random(11)
    store = ReplicaStore.init(url, keys, block_size=bs, workers=2)
    image = random_disk(rnd, 20 * bs + 3 * 512, bs)
    base = write_base(store, "vm1", "vda", image, rnd)
    first = store.publish_point(
        "vm1", {"vda": DiskChain(len(image), base)}, consistency="crash", vm_config={"cpus": 1}
    )
    first_image = bytes(image)
    segment = write_segment(store, "vm1", "vda", image, random_extents(rnd, len(image), bs, 6), rnd)
    assert segment is not None
    second = store.publish_point(
        "vm1",
        {"vda": DiskChain(len(image), base, (segment,))},
        consistency="app",
        vm_config={"cpus": 1},
    )

    reopened = ReplicaStore.open(url, keys)
    points = reopened.list_points("vm1")
    assert [p.point_id for p in points] == [first.point_id, second.point_id]
    for point, expected in ((points[0], first_image), (points[1], bytes(image))):
        dest = tmp_path / f"{point.point_id}.raw"
        reopened.restore_disk(point, "vda", dest)
        assert dest.read_bytes() == expected
    assert reopened.verify(deep=True).ok
