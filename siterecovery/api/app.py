"""The vault's REST API as a FastAPI application.

``create_app(settings)`` opens the vault database of ``settings`` (running its migrations),
mounts the operators' API (:mod:`.operator_views`) and the agents' API (:mod:`.agent_views`)
and maps every error in one place (:mod:`.errors`): the body is always ``{"error", "message",
"hint", "recoverable"}``. Request bodies are bounded before they are parsed
(:mod:`.bodylimit`: 413 past ``VaultOptions.max_body_bytes``); path parameters must match
their patterns (:func:`.deps.path_params`, 422). Denied calls (401/403) are logged on the
``siterecovery.api.audit`` logger with the caller, method, path and reason. The OpenAPI
document is at ``/openapi.json``; ``/healthz`` answers without authentication (for probes and `up`).

The app holds no state of its own besides the database handle: several processes may serve
one PostgreSQL vault.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from siterecovery import __version__
from siterecovery.api import agent_views, operator_views
from siterecovery.api.bodylimit import BodyLimit
from siterecovery.api.deps import VaultOptions, document_path_patterns
from siterecovery.api.errors import ErrorBody, body_of, status_of
from siterecovery.errors import SiteRecoveryError
from siterecovery.settings import Settings
from siterecovery.vault import limits
from siterecovery.vault.db import Database, open_database

audit = logging.getLogger("siterecovery.api.audit")
log = logging.getLogger("siterecovery.api")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "the service refused a value"), (401, "no valid credential"),
        (403, "the caller may not do this"), (404, "no such thing"),
        (409, "conflicts with the current state"), (413, "request body too large"),
        (422, "malformed payload, or a value beyond the vault's limits"),
        (503, "the vault database is unavailable; retry"),
    )
}  # fmt: skip


def create_app(
    settings: Settings,
    options: VaultOptions | None = None,
    *,
    database: Database | None = None,
) -> FastAPI:
    """The vault API over ``settings.vault_url`` (or an already open ``database``)."""
    db = database or open_database(settings.vault_url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if database is None:
            db.close()

    app = FastAPI(
        title="siterecovery vault",
        version=__version__,
        description="Desired state, jobs and health of replicated VMs; work for agents.",
        lifespan=lifespan,
        responses=_ERRORS,
    )
    app.state.db = db
    app.state.options = opts = options or VaultOptions()
    app.state.store_url = settings.store_url
    _document_path_patterns(app)
    app.include_router(operator_views.router)
    app.include_router(agent_views.router)
    app.add_api_route("/healthz", _healthz, methods=["GET"], tags=["status"])
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=opts.max_body_bytes, max_depth=limits.MAX_BODY_DEPTH)
    return app


def _document_path_patterns(app: FastAPI) -> None:
    """Make ``/openapi.json`` show the patterns :func:`deps.path_params` enforces."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        return document_path_patterns(generate())

    app.openapi = openapi  # type: ignore[method-assign]


def _healthz() -> dict[str, str]:
    """Liveness: the process serves requests."""
    return {"status": "ok", "version": __version__}


def _install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SiteRecoveryError, _domain_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


async def _domain_error(request: Request, exc: SiteRecoveryError) -> JSONResponse:
    code = status_of(exc)
    if code in (401, 403):
        principal = getattr(request.state, "principal", None)
        who = principal.label if principal is not None else "anonymous"
        client = request.client.host if request.client else "?"
        audit.warning("denied %s %s %s from %s: %s", code, request.method, request.url.path,
                      f"{who}@{client}", exc.message)  # fmt: skip
    elif code >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.describe())
    return JSONResponse(body_of(exc), status_code=code)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for error in exc.errors()[:10]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    body = ErrorBody(error="InputError", message="invalid request: " + "; ".join(problems),
                     hint="see /openapi.json for the expected payload")  # fmt: skip
    return JSONResponse(body.model_dump(), status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    body = ErrorBody(error="HTTPError", message=str(exc.detail))
    headers = dict(exc.headers or {})
    allowed = allowed_methods(request) if exc.status_code == 405 else []
    if allowed:  # else keep the router's own header (paths outside the OpenAPI document)
        headers["Allow"] = ", ".join(allowed)
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method served at the request's path, sorted: the ``Allow`` header of a 405.

    The router names only the methods of the first route it tried; the OpenAPI document
    lists them all (HEAD goes with GET, as the router serves it)."""
    methods: set[str] = set()
    for pattern, served in _path_methods(request.app):
        if pattern.match(request.url.path):
            methods |= served
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def _path_methods(app: FastAPI) -> list[tuple[re.Pattern[str], set[str]]]:
    """Each OpenAPI path as a regex, with its methods (computed once per app)."""
    cached = getattr(app.state, "path_methods", None)
    if cached is None:
        cached = [
            (compile_path(path)[0], {method.upper() for method in operations})
            for path, operations in app.openapi().get("paths", {}).items()
        ]
        app.state.path_methods = cached
    return list(cached)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s: unexpected error", request.method, request.url.path)
    body = ErrorBody(error="InternalError", message=f"internal error: {type(exc).__name__}",
                     hint="this is a bug in the vault: see its log")  # fmt: skip
    return JSONResponse(body.model_dump(), status_code=500)
