"""``VaultClient``: the CA-pinned HTTPS client of the vault API, for agents and the CLI.

Every call returns the decoded JSON body or raises a :class:`SiteRecoveryError` rebuilt from
the vault's error body (:func:`siterecovery.api.errors.error_from_response`): the same
message, hint and family (input 2, not found 3, vault 6) as if the vault ran in-process.
When the vault cannot be reached, calls are retried with backoff for up to ``retry_for_s``
seconds (an agent rides out a vault restart this way), then raise
:class:`VaultUnreachable`. Only idempotent calls should be given a long ``retry_for_s``;
agent reports are idempotent by design (a point id recorded twice is a 409, handled).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from siterecovery.api.errors import VaultUnreachable, error_from_response
from siterecovery.api.tls import client_context
from siterecovery.errors import InputError


class VaultClient:
    """HTTPS client of one vault, authenticated with ``secret`` (token or host credential)."""

    def __init__(
        self,
        url: str,
        *,
        ca_file: Path,
        secret: str | None = None,
        timeout_s: float = 30.0,
        retry_for_s: float = 0.0,
    ) -> None:
        if not url.startswith("https://"):
            raise InputError(
                f"vault URL {url!r} is not https://", hint="the vault only serves HTTPS"
            )
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self.url = url.rstrip("/")
        self.retry_for_s = retry_for_s
        self._http = httpx.Client(
            base_url=self.url, verify=client_context(ca_file), headers=headers,
            timeout=timeout_s,
        )  # fmt: skip

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VaultClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def get(self, path: str, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=query)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json={} if body is None else body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, json=body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; retried while the vault is unreachable or answers 503."""
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.2
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                failure: Exception = VaultUnreachable(
                    f"vault {self.url} unreachable: {type(exc).__name__}: {exc}"
                )
                cause: BaseException | None = exc
            else:
                if response.status_code < 400:
                    return response.json() if response.content else None
                failure, cause = error_from_response(response.status_code, _json(response)), None
                if response.status_code != 503:
                    raise failure
            if time.monotonic() + delay > deadline:
                raise failure from cause
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
