"""What every route needs: the caller, the database, the configuration.

Routes declare the scope they need with ``Depends(require(Scope.X))``. A
request without credentials gets 401, one whose roles lack the scope 403;
both are sent before the route runs. Errors are raised as
:class:`ApiError` and rendered by the app: as an OperationOutcome under
``/fhir``, as a JSON problem (``{"error": ..., "detail": ...}``) elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from carebridge.api.security import (
    AuthenticationError,
    CredentialCache,
    Principal,
    Scope,
    TokenService,
    authenticate_api_key,
)
from carebridge.config.model import Configuration

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error response: HTTP status, a short code, and a message for the caller.

    ``location`` names the element or parameter at fault (a FHIRPath such as
    ``Patient.birthDate`` under ``/fhir``, a parameter name elsewhere).
    """

    def __init__(self, status: int, code: str, message: str, *,
                 location: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.location = location
        self.headers = headers or {}


class RateLimiter:
    """A token bucket per client: ``per_minute`` requests, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self._rate = per_minute / 60.0
        self._capacity = float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, stamp = self._buckets.get(key, (self._capacity, now))
            tokens = min(self._capacity, tokens + (now - stamp) * self._rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1.0, now)
            return True


@dataclass
class ApiContext:
    """Shared state of one running API, kept on ``app.state.carebridge``."""

    engine: Engine
    config: Configuration
    tokens: TokenService
    limiter: RateLimiter
    credentials: CredentialCache = field(default_factory=CredentialCache)
    extras: dict[str, Any] = field(default_factory=dict)


def context(request: Request) -> ApiContext:
    return request.app.state.carebridge


_bearer = HTTPBearer(auto_error=False, description="A token from POST /oauth/token.")
_api_key = APIKeyHeader(
    name="X-API-Key", auto_error=False,
    description="An API key from `carebridge api new-key` (cbk_<id>_<secret>).",
)


def authenticated(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
    api_key: str | None = Depends(_api_key),
) -> Principal:
    """Return the caller from a bearer token or an API key; raise 401 when neither is valid."""
    ctx = context(request)
    challenge = {"WWW-Authenticate": 'Bearer realm="carebridge"'}
    try:
        if bearer is not None:
            principal = ctx.tokens.check(bearer.credentials)
        elif api_key:
            principal = ctx.credentials.get(api_key)
            if principal is None:
                principal = authenticate_api_key(ctx.engine, api_key)
                ctx.credentials.put(api_key, principal)
        else:
            raise ApiError(401, "login", "credentials required: send a bearer token "
                           "or an X-API-Key header", headers=challenge)
    except AuthenticationError as exc:
        logger.info("request rejected: %s", exc)
        raise ApiError(401, "login", str(exc), headers=challenge) from None
    if not ctx.limiter.allow(principal.client_id):
        logger.warning("client %s is over its rate limit", principal.client_id)
        raise ApiError(429, "throttled", "rate limit exceeded; retry later",
                       headers={"Retry-After": "1"})
    request.state.principal = principal
    return principal


def require(scope: Scope) -> Callable[..., Principal]:
    """Return a dependency that admits only callers holding ``scope``."""

    def check(principal: Principal = Depends(authenticated)) -> Principal:
        if scope not in principal.scopes:
            raise ApiError(403, "forbidden",
                           f"the client's roles do not grant the scope {scope.value}")
        return principal

    check.__name__ = f"require_{scope.name.lower()}"
    check.scope = scope  # type: ignore[attr-defined]  # read by tests and docs
    return check
