"""Real object-storage servers for tests: Azurite (Azure Blob) and SeaweedFS (S3).

Each server runs as a child process bound to 127.0.0.1 on free ports, with its data in a
fresh temporary directory, and is ready when a real client request succeeds. Cleanup is
guaranteed three ways: the session fixtures stop what they started, an ``atexit`` hook stops
anything still running, and every server is started with ``PR_SET_PDEATHSIG`` so the kernel
kills it if the test process dies without cleaning up.

A missing server binary is a test **failure** (never a skip) telling to run
``scripts/setup.sh test``, which installs both (``scripts/setup-servers.sh``).

Tests reach the shared instances through the session fixtures ``azurite`` and ``seaweedfs``
(import them into a test module or conftest) or :func:`shared_azurite` /
:func:`shared_seaweedfs`. Servers can be killed and restarted on the same ports and data
directory (:meth:`RealServer.kill`, :meth:`RealServer.start`) to test outages; start them
from the main thread (the death signal follows the thread that started the child).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP_HINT = "run `scripts/setup.sh test` to install the test servers"

AZURITE_BIN = REPO / ".cache" / "npm" / "node_modules" / ".bin" / "azurite-blob"
WEED_BIN = Path(sys.executable).parent / "weed"

#: The well-known Azurite development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

S3_ACCESS_KEY = "siterecovery-test"
S3_SECRET_KEY = "siterecovery-test-secret"
S3_REGION = "us-east-1"

_PR_SET_PDEATHSIG = 1
_BUCKET_EXISTS = ("BucketAlreadyExists", "BucketAlreadyOwnedByYou")


class ServerSetupError(RuntimeError):
    """A test server is not installed or did not become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGKILL it when the parent thread exits.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


class RealServer:
    """A server child process with a data directory, a log file and a readiness check."""

    name = "server"
    binary: Path = Path("/nonexistent")
    start_timeout = 30.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        #: Containers/buckets known to exist (they survive restarts: same data directory).
        self.created: set[str] = set()

    # -- subclasses ---------------------------------------------------------------------

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """One readiness probe: True when the server answers real requests."""
        raise NotImplementedError

    def cleanup_files(self) -> None:
        """Remove files the server leaves outside ``workdir``."""

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start (or restart) on the same ports and data directory; wait until ready."""
        if self.running:
            return
        # After a kill the server may have lost recent metadata (Azurite saves its database
        # every few seconds): create containers/buckets again rather than trust the cache.
        self.created.clear()
        if not self.binary.exists():
            raise ServerSetupError(
                f"{self.name} is not installed ({self.binary} missing): {SETUP_HINT}"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise ServerSetupError(f"{self.name} exited at start:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        self.kill()
        raise ServerSetupError(
            f"{self.name} not ready after {self.start_timeout} s:\n{self.log_tail()}"
        )

    def kill(self) -> None:
        """Stop at once (SIGKILL), like a crash or a power cut of the server."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        """Kill the server and remove everything it wrote."""
        self.kill()
        self.cleanup_files()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class AzuriteServer(RealServer):
    """Azurite's blob service (``azurite-blob``) on a free port."""

    name = "azurite"
    binary = AZURITE_BIN
    account = AZURITE_ACCOUNT

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()

    def command(self) -> list[str]:
        return [
            str(self.binary),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(self.port),
            "--location", str(self.data_dir),
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--loose",
        ]  # fmt: skip

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.account}"

    def connection_string(self, key: str = AZURITE_KEY) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={key};"
            f"BlobEndpoint={self.endpoint};"
        )

    def env(self) -> dict[str, str]:
        """Environment that lets ``open_backend("azure://...")`` reach this server."""
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string()}

    def url(self, container: str, prefix: str = "") -> str:
        base = f"azure://{self.account}/{container}"
        return f"{base}/{prefix}" if prefix else base

    def _service(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(
            self.connection_string(), retry_total=0, connection_timeout=2, read_timeout=5
        )

    def ready(self) -> bool:
        from azure.core.exceptions import AzureError

        try:
            list(self._service().list_containers())
        except AzureError:
            return False
        return True

    def create_container(self, name: str) -> None:
        """Create ``name`` unless it exists."""
        from azure.core.exceptions import ResourceExistsError

        if name in self.created:
            return
        with contextlib.suppress(ResourceExistsError):
            self._service().create_container(name)
        self.created.add(name)


class SeaweedFSServer(RealServer):
    """``weed mini`` (master, volume, filer, S3 gateway in one process) on free ports.

    Every port it opens is chosen here and bound to 127.0.0.1; WebDAV, the Iceberg and Lance
    endpoints and telemetry are off. The S3 gateway accepts one identity
    (:data:`S3_ACCESS_KEY` / :data:`S3_SECRET_KEY`) with Admin/Read/Write/List rights.
    """

    name = "seaweedfs"
    binary = WEED_BIN
    start_timeout = 60.0

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        ports = free_ports(8)
        (
            self.master_port, self.master_grpc, self.volume_port, self.volume_grpc,
            self.filer_port, self.filer_grpc, self.s3_port, self.s3_grpc,
        ) = ports  # fmt: skip
        # The admin server's worker dials the admin HTTP port + 10000 whatever its gRPC port
        # is set to: pick a pair where both are free.
        while True:
            self.admin_port = free_port()
            if self.admin_port + 10000 < 65536 and _port_free(self.admin_port + 10000):
                break
        self.config_path = workdir / "s3.json"
        self._client: Any = None

    def _ports(self) -> list[int]:
        return [
            self.master_port, self.master_grpc, self.volume_port, self.volume_grpc,
            self.filer_port, self.filer_grpc, self.s3_port, self.s3_grpc,
            self.admin_port, self.admin_port + 10000,
        ]  # fmt: skip

    def command(self) -> list[str]:
        identity = {
            "name": "siterecovery-test",
            "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps({"identities": [identity]}))
        return [
            str(self.binary), "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}", f"-master.port.grpc={self.master_grpc}",
            f"-volume.port={self.volume_port}", f"-volume.port.grpc={self.volume_grpc}",
            f"-filer.port={self.filer_port}", f"-filer.port.grpc={self.filer_grpc}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.port={self.s3_port}", f"-s3.port.grpc={self.s3_grpc}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-s3.config={self.config_path}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Like AWS: a put to a missing bucket fails instead of creating it.
            "-s3.autoCreateBucket=false",
            f"-admin.port={self.admin_port}", f"-admin.port.grpc={self.admin_port + 10000}",
            "-webdav=false", "-master.telemetry=false",
        ]  # fmt: skip

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """Environment that lets ``open_backend("s3://...")`` reach this server."""
        return {
            "SITERECOVERY_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": S3_REGION,
        }

    def client(self, secret: str = S3_SECRET_KEY) -> Any:
        """A boto3 client of this server (cached for the right secret)."""
        if secret == S3_SECRET_KEY and self._client is not None:
            return self._client
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]

        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=secret,
            region_name=S3_REGION,
            config=Config(
                retries={"max_attempts": 1},
                connect_timeout=2,
                read_timeout=10,
                s3={"addressing_style": "path"},
            ),
        )
        if secret == S3_SECRET_KEY:
            self._client = client
        return client

    def ready(self) -> bool:
        # Ready means writable: the S3 gateway answers before the volume server has joined.
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        client = self.client()
        try:
            if "ready-probe" not in self.created:
                try:
                    client.create_bucket(Bucket="ready-probe")
                except ClientError as exc:
                    if exc.response["Error"]["Code"] not in _BUCKET_EXISTS:
                        raise
                self.created.add("ready-probe")
            client.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
        except (BotoCoreError, ClientError):
            return False
        return True

    def create_bucket(self, name: str, timeout: float = 20.0) -> None:
        """Create ``name`` unless it exists (retrying while the filer finishes starting)."""
        from botocore.exceptions import BotoCoreError, ClientError

        if name in self.created:
            return
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            try:
                client.create_bucket(Bucket=name)
                self.created.add(name)
                return
            except ClientError as exc:
                if exc.response["Error"]["Code"] in _BUCKET_EXISTS:
                    self.created.add(name)
                    return
                if time.monotonic() > deadline:
                    raise
            except BotoCoreError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    def cleanup_files(self) -> None:
        # gRPC unix sockets land in the system temp dir, named by port.
        for port in self._ports():
            for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)


# -- shared instances -------------------------------------------------------------------------

_SHARED: dict[str, RealServer] = {}
_SHARED_LOCK = threading.Lock()


def _shared(kind: type[RealServer]) -> RealServer:
    with _SHARED_LOCK:
        server = _SHARED.get(kind.name)
        if server is None:
            workdir = Path(tempfile.mkdtemp(prefix=f"siterecovery-{kind.name}-"))
            server = kind(workdir)
            _SHARED[kind.name] = server
    try:
        server.start()
    except ServerSetupError:
        with _SHARED_LOCK:
            _SHARED.pop(kind.name, None)
        server.stop()
        raise
    return server


def shared_azurite() -> AzuriteServer:
    """The session's Azurite, started on first use (and again if a test killed it)."""
    server = _shared(AzuriteServer)
    assert isinstance(server, AzuriteServer)
    return server


def shared_seaweedfs() -> SeaweedFSServer:
    """The session's SeaweedFS, started on first use (and again if a test killed it)."""
    server = _shared(SeaweedFSServer)
    assert isinstance(server, SeaweedFSServer)
    return server


def stop_shared(name: str | None = None) -> None:
    """Stop the shared server called ``name`` (every one by default), removing its files."""
    with _SHARED_LOCK:
        names = list(_SHARED) if name is None else [name]
        servers = [s for s in (_SHARED.pop(n, None) for n in names) if s is not None]
    for server in servers:
        server.stop()


atexit.register(stop_shared)


def _start_or_fail(start: Any) -> Any:
    try:
        return start()
    except ServerSetupError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def azurite() -> Iterator[AzuriteServer]:
    """The running Azurite (fails, never skips, when it is not installed)."""
    yield _start_or_fail(shared_azurite)
    stop_shared(AzuriteServer.name)


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFSServer]:
    """The running SeaweedFS S3 server (fails, never skips, when it is not installed)."""
    yield _start_or_fail(shared_seaweedfs)
    stop_shared(SeaweedFSServer.name)
