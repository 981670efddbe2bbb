"""The vault as a service: its REST API (FastAPI), TLS material, server and client.

- :func:`create_app` — the FastAPI application over a vault database;
- :mod:`~siterecovery.api.tls` — the vault's CA and server certificate (made at init);
- :mod:`~siterecovery.api.server` — ``serve``: uvicorn over TLS;
- :mod:`~siterecovery.api.client` — :class:`VaultClient`, the CA-pinned HTTPS client used by
  agents and the CLI.
"""

from siterecovery.api.app import create_app
from siterecovery.api.deps import VaultOptions

__all__ = ["VaultOptions", "create_app"]
