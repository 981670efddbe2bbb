"""``vault serve``: the vault API over HTTPS with uvicorn.

The server's TLS certificate comes from :func:`siterecovery.api.tls.ensure_pki` in
``WORKDIR/pki`` (made there on first start if `vault init` did not). Plain HTTP is not
offered: agents and CLIs pin the vault's CA.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import uvicorn

from siterecovery.api.app import create_app
from siterecovery.api.deps import VaultOptions
from siterecovery.api.tls import Pki, ensure_pki
from siterecovery.errors import InputError
from siterecovery.settings import Settings

DEFAULT_PORT = 8443


def pki_of(settings: Settings, names: Sequence[str] = ()) -> Pki:
    """The vault's TLS files under ``WORKDIR/pki``, made if missing."""
    return ensure_pki(settings.pki_dir, hostnames=names)


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    names: Sequence[str] = (),
    options: VaultOptions | None = None,
    log_level: str = "info",
) -> None:
    """Serve the vault API on ``host:port`` over TLS until interrupted."""
    if not 0 <= port <= 65535:
        raise InputError(f"port {port} is out of range", hint="use 1-65535")
    pki = pki_of(settings, [host, *names] if host not in ("0.0.0.0", "::") else names)
    app = create_app(settings, options)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level,
        ssl_certfile=str(pki.server_cert), ssl_keyfile=str(pki.server_key),
        access_log=False, timeout_graceful_shutdown=5,
    )  # fmt: skip
    uvicorn.Server(config).run()
