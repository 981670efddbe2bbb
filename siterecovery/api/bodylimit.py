"""Request bodies are bounded before anything parses them: an ASGI middleware.

:class:`BodyLimit` reads the body as it streams in and counts its bytes. A body whose
``Content-Length`` or streamed length exceeds ``max_bytes`` is answered **413** with the
vault's error body (:class:`~siterecovery.api.errors.PayloadTooLarge`) as soon as that is
known; the rest is never read and the connection is closed. A JSON body nested deeper than
``max_depth`` is answered **422** (:class:`~siterecovery.vault.errors.LimitExceeded`) before
the JSON parser sees it. A body within bounds is handed to the application unchanged.

Cost: the body is held in memory (at most ``max_bytes``) and its nesting is measured with a
fixed number of C-speed passes (:func:`nested_deeper_than`), so no payload can make the
check slow or recursive.
"""

from __future__ import annotations

import logging
import re

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from siterecovery.api.errors import PayloadTooLarge, body_of, status_of
from siterecovery.errors import SiteRecoveryError
from siterecovery.vault.errors import LimitExceeded

log = logging.getLogger("siterecovery.api")

#: A JSON string: quote, then runs of plain characters and escapes, then quote.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
#: Every byte but the four bracket characters.
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
#: An innermost container: an empty pair left after strings and scalars are gone.
_LEAF = re.compile(rb"\[\]|\{\}")


def nested_deeper_than(body: bytes, depth: int) -> bool:
    """Whether the JSON text ``body`` nests containers deeper than ``depth``.

    Strings are removed, then everything but brackets; each of at most ``depth`` passes then
    removes the innermost pairs. Brackets left after that are deeper than ``depth`` (or do not
    pair up: malformed JSON, which is refused as well).
    """
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    for _ in range(depth):
        if not brackets:
            return False
        brackets = _LEAF.sub(b"", brackets)
    return bool(brackets)


class BodyLimit:
    """ASGI middleware bounding every HTTP request body (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_depth: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            self._check_declared(headers)
            body = await self._read(receive)
            if body is None:
                return  # the client went away
            self._check_depth(headers, body)
        except SiteRecoveryError as exc:
            await _refuse(exc, scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _check_declared(self, headers: Headers) -> None:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise self._too_large(f"{declared} bytes")

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body; PayloadTooLarge as soon as it passes the limit; None when the
        client disconnects first."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                raise self._too_large(f"more than {self.max_bytes} bytes")
            if not message.get("more_body", False):
                return bytes(body)

    def _too_large(self, size: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body of {size} refused: the vault accepts at most {self.max_bytes} bytes"
        )

    def _check_depth(self, headers: Headers, body: bytes) -> None:
        kind = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        json_body = kind == "application/json" or kind.endswith("+json")
        if body and json_body and nested_deeper_than(body, self.max_depth):
            raise LimitExceeded(
                f"request body is nested deeper than {self.max_depth} levels (or its "
                "brackets do not pair up)"
            )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then whatever the client sends next."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(exc: SiteRecoveryError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer ``exc`` with the error body and close the connection (the body may be unread)."""
    client = scope.get("client") or ("?", 0)
    log.warning("refused %s %s from %s: %s", scope.get("method"), scope.get("path"), client[0],
                exc.message)  # fmt: skip
    headers = {"Connection": "close"}
    response = JSONResponse(body_of(exc), status_code=status_of(exc), headers=headers)
    await response(scope, receive, send)
