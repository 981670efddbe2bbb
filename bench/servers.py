"""Real object-storage servers for the benchmark: SeaweedFS (S3) and Azurite (Azure Blob).

The servers are started exactly as the test suite starts them (``tests/servers.py``: a child
process bound to 127.0.0.1 on free ports, data in a fresh temporary directory, killed with
the benchmark process at the latest); this module only adapts them to the harness:

- :func:`object_server` starts one by kind (``"s3"`` or ``"azure"``), creates the bucket or
  container ``bench``, and yields a :class:`Remote`: the store URL of a prefix, and the
  environment (endpoint, credentials) a child process needs to reach it — the same
  variables an operator sets (``SITERECOVERY_S3_ENDPOINT``/``AWS_*``,
  ``AZURE_STORAGE_CONNECTION_STRING``); the benchmark process's own environment is untouched;
- the server is stopped and its data removed when the block ends.

``tests/servers.py`` is imported from the repository root (``python -m bench.run`` runs
there); it needs pytest and the server binaries, which ``scripts/bench-setup.sh`` installs
(``scripts/setup.sh test``). When either is missing, :class:`BenchError` says so and the row
fails alone.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import BenchError

REPO = Path(__file__).resolve().parent.parent
CONTAINER = "bench"
#: kind -> (class name in tests/servers.py, what it is)
KINDS = {"s3": ("SeaweedFSServer", "SeaweedFS S3"), "azure": ("AzuriteServer", "Azurite")}


@dataclass
class Remote:
    """A running object store: ``url(prefix)`` names a store in the benchmark's container."""

    kind: str
    server: Any
    env: dict[str, str] = field(default_factory=dict)

    def url(self, prefix: str) -> str:
        return str(self.server.url(CONTAINER, prefix))

    @property
    def endpoint(self) -> str:
        return str(self.server.endpoint)


def _servers_module() -> Any:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        return importlib.import_module("tests.servers")
    except ImportError as exc:
        raise BenchError(
            f"cannot load the test servers ({exc}): run scripts/bench-setup.sh "
            "(it runs scripts/setup.sh test, which installs pytest, Azurite and SeaweedFS)"
        ) from exc


@contextmanager
def object_server(kind: str, workdir: Path) -> Iterator[Remote]:
    """Start the ``kind`` server (``s3`` or ``azure``) in ``workdir``; stop it afterwards."""
    if kind not in KINDS:
        raise BenchError(f"unknown object store kind {kind!r}: use one of {', '.join(KINDS)}")
    module = _servers_module()
    server = getattr(module, KINDS[kind][0])(workdir)
    try:
        try:
            server.start()
        except module.ServerSetupError as exc:
            raise BenchError(f"{KINDS[kind][1]} did not start: {exc}") from exc
        if kind == "s3":
            server.create_bucket(CONTAINER)
        else:
            server.create_container(CONTAINER)
        yield Remote(kind, server, dict(server.env()))
    finally:
        server.stop()
