"""The FastAPI application: FHIR R4 under ``/fhir``, operations under ``/api/v1``.

:func:`create_app` builds the app from an open engine and a loaded
configuration; ``carebridge serve`` runs it with uvicorn next to the
workers. Every route but ``/health``, ``/ready``, ``/oauth/token`` and
``GET /fhir/metadata`` needs credentials (see :mod:`carebridge.api.deps`).
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from sqlalchemy import Engine, text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from carebridge import audit
from carebridge.api.deps import ApiContext, ApiError, RateLimiter, context, require
from carebridge.api.security import (
    AuthenticationError,
    Principal,
    Scope,
    TokenService,
    authenticate_client,
    load_keys,
)
from carebridge.config.model import Configuration
from carebridge.metrics import DatabaseCollector

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

_ISSUE_CODES = {
    400: "invalid", 401: "login", 403: "forbidden", 404: "not-found",
    405: "not-supported", 409: "conflict", 410: "deleted", 412: "conflict",
    413: "too-costly", 415: "not-supported", 422: "processing", 429: "throttled",
}


def operation_outcome(status: int, message: str, location: str | None = None,
                      code: str | None = None) -> dict[str, Any]:
    """Build an OperationOutcome with one issue; ``location`` is the FHIRPath at fault."""
    issue: dict[str, Any] = {
        "severity": "error" if status >= 400 else "information",
        "code": code or _ISSUE_CODES.get(status, "exception"),
        "diagnostics": message,
    }
    if location:
        issue["expression"] = [location]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def error_response(request: Request, status: int, code: str, message: str,
                   location: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """Render an error as an OperationOutcome under /fhir, a JSON problem elsewhere."""
    if request.url.path.startswith("/fhir"):
        return JSONResponse(
            operation_outcome(status, message, location,
                              code if code in _ISSUE_CODES.values() else None),
            status_code=status, media_type=FHIR_JSON, headers=headers,
        )
    body: dict[str, Any] = {"error": code, "detail": message}
    if location:
        body["location"] = location
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """Reject request bodies over ``limit`` bytes with 413 before they are read whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._reject(scope, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._reject(scope, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        logger.warning("request body rejected: over %d bytes", self.limit)
        fhir = scope.get("path", "").startswith("/fhir")
        message = f"request body is larger than {self.limit} bytes (api.max_request_bytes)"
        response = JSONResponse(
            operation_outcome(413, message) if fhir
            else {"error": "too-large", "detail": message},
            status_code=413, media_type=FHIR_JSON if fhir else "application/json",
        )
        await response(scope, _no_receive, send)


class ConnectionMaxAge:
    """Close each keep-alive connection after its first response past ``max_age`` seconds.

    A connection stays with the API process that accepted it, and an
    asyncio server accepts every waiting connection at once. Two clients
    that connect together often land on one process of ``--api-workers``
    while the others idle. A client whose connection closes connects
    again, and the process with the least to do tends to accept it first.
    ``max_age`` 0 never closes a connection.
    """

    PRUNE_AT = 4096
    """Connections tracked before those older than ``max_age`` are forgotten."""

    def __init__(self, app: ASGIApp, max_age: float) -> None:
        self.app = app
        self.max_age = max_age
        self._opened: dict[tuple[str, int], float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] != "http" or not self.max_age or not client:
            await self.app(scope, receive, send)
            return
        key = (client[0], client[1])
        now = time.monotonic()
        if len(self._opened) >= self.PRUNE_AT:
            # A connection that closed by itself leaves its entry behind.
            self._opened = {peer: opened for peer, opened in self._opened.items()
                            if now - opened < self.max_age}
        if now - self._opened.setdefault(key, now) < self.max_age:
            await self.app(scope, receive, send)
            return
        del self._opened[key]

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, value) for name, value in message.get("headers", [])
                           if name.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


class _TooLarge(Exception):
    pass


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class TokenAnswer(BaseModel):
    """An OAuth2 access token response (RFC 6749 section 5.1)."""

    access_token: str
    token_type: str = "Bearer"
    expires_in: int
    scope: str


class Health(BaseModel):
    status: str


def create_app(engine: Engine, config: Configuration) -> FastAPI:
    """Build the API for one database and configuration.

    Raises:
        ConfigurationError: when a configured signing key cannot be read.
    """
    settings = config.api
    tokens = TokenService(load_keys(settings), settings.token_ttl_seconds)
    if not tokens.can_issue:
        logger.warning("no API signing key can sign: POST /oauth/token is off; "
                       "API keys still work")
    app = FastAPI(
        title="carebridge",
        version="1",
        description=(
            "FHIR R4 intake and the operations API of carebridge. Authenticate with "
            "a bearer token from `POST /oauth/token` (client credentials) or an "
            "`X-API-Key` header. Each route names the scope it needs."
        ),
    )
    app.state.carebridge = ApiContext(
        engine=engine, config=config, tokens=tokens,
        limiter=RateLimiter(settings.rate_limit_per_minute),
    )
    token_limiter = RateLimiter(60)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status, exc.code, exc.message,
                              exc.location, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(request, 422, "invalid",
                              f"{where}: {first.get('msg', 'invalid request')}", where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, "http", str(exc.detail),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(request, 500, "exception",
                              "internal error; the server log has the details")

    @app.get("/health", response_model=Health, tags=["health"],
             summary="The process is up (no credentials needed).")
    def health() -> Health:
        return Health(status="ok")

    @app.get("/ready", response_model=Health, tags=["health"],
             summary="The database answers (no credentials needed).",
             responses={503: {"description": "The database does not answer."}})
    def ready(request: Request) -> Any:
        try:
            with context(request).engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # any driver error means not ready
            logger.warning("readiness check failed: %s", type(exc).__name__)
            return JSONResponse({"status": "database unavailable"}, status_code=503)
        return Health(status="ready")

    @app.post(
        "/oauth/token", response_model=TokenAnswer, tags=["auth"],
        summary="Exchange a client id and secret for a bearer token.",
        responses={
                   401: {"description": "Unknown client or wrong secret."},
                   422: {"description": "A missing field, or a grant type other than "
                                        "client_credentials."},
                   429: {"description": "Too many attempts."},
                   503: {"description": "No signing key is configured."}},
    )
    def token(
        request: Request,
        grant_type: Annotated[Literal["client_credentials"], Form()],
        client_id: Annotated[str, Form(min_length=1, max_length=120)],
        client_secret: Annotated[str, Form(min_length=1, max_length=200)],
    ) -> TokenAnswer:
        ctx = context(request)
        peer = request.client.host if request.client else "unknown"
        if not token_limiter.allow(f"{peer}:{client_id}"):
            raise ApiError(429, "throttled", "too many token requests; retry later",
                           headers={"Retry-After": "1"})
        if not ctx.tokens.can_issue:
            raise ApiError(503, "unavailable", "no signing key is configured "
                           "(api.signing_keys in carebridge.yaml)")
        try:
            principal = authenticate_client(ctx.engine, client_id, client_secret)
        except AuthenticationError as exc:
            logger.info("token request rejected for client %s", client_id)
            raise ApiError(401, "invalid_client", str(exc)) from None
        access = ctx.tokens.issue(principal)
        with ctx.engine.begin() as conn:
            audit.record(conn, principal.actor, "token.issue", "client", client_id)
        logger.info("token issued to client %s", client_id)
        return TokenAnswer(access_token=access, expires_in=ctx.tokens.ttl_seconds,
                           scope=" ".join(sorted(principal.scopes)))

    @app.get(
        "/metrics", tags=["health"], response_class=PlainTextResponse,
        summary="Process metrics in the Prometheus text format (scope metrics:read).",
        responses={200: {"content": {"text/plain": {}}},
                   401: {"description": "No credentials."},
                   403: {"description": "The client's roles lack metrics:read."}},
    )
    def metrics(
        request: Request, _: Principal = Depends(require(Scope.METRICS_READ))
    ) -> PlainTextResponse:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(DatabaseCollector(context(request).engine))
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    from carebridge.api.fhir import router as fhir_router
    from carebridge.api.ops import router as ops_router
    from carebridge.api.procurement import router as procurement_router
    from carebridge.web import router as web_router

    app.include_router(fhir_router)
    app.include_router(ops_router)
    app.include_router(procurement_router)
    app.include_router(web_router)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "If-Match",
                           "If-None-Exist", "If-None-Match"],
        )
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(ConnectionMaxAge, max_age=settings.connection_max_age_seconds)
    logger.info("API built: %d routes", len(app.routes))
    return app
