"""Browser sessions of the web UI: a signed cookie, CSRF tokens, and the signed-in user.

A person signs in with the credentials the API takes (a client id and
secret, or an API key). The cookie then carries the client id, the key id
when the sign-in used a key, a CSRF token and the sign-in time, signed with
HMAC-SHA256. Roles are not in the cookie: each request reads them from
``api_clients``, so a disabled client or a revoked key is signed out at its
next request.

The signing key is derived from the first HS256 API signing key, so every
API node of a deployment accepts the others' cookies. Without an HS256 key
each process draws a random key, and sessions end when it restarts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sqlalchemy import Engine, select

from carebridge.api.deps import context
from carebridge.api.security import Principal, Scope, load_keys, parse_roles, scopes_for
from carebridge.store.schema import api_clients, api_keys

logger = logging.getLogger(__name__)

SESSION_COOKIE = "carebridge_session"
SIGN_IN_COOKIE = "carebridge_sign_in"
"""Holds the CSRF token of the sign-in form until the session exists."""

SESSION_MAX_AGE_SECONDS = 8 * 3600
"""A session ends this long after sign-in: one working shift."""

_KEY_LABEL = b"carebridge web session v1"


@dataclass(frozen=True, slots=True)
class WebUser:
    """The signed-in person: the API principal plus the session's CSRF token."""

    principal: Principal
    csrf: str
    key_id: str | None

    @property
    def client_id(self) -> str:
        return self.principal.client_id

    def may(self, scope: Scope) -> bool:
        """Return whether the user's roles grant ``scope``."""
        return scope in self.principal.scopes


def session_key(request: Request) -> bytes:
    """Return the HMAC key of session cookies for this app, derived once and cached."""
    ctx = context(request)
    key = ctx.extras.get("web_session_key")
    if key is None:
        key = _derive_key(ctx.config.api)
        ctx.extras["web_session_key"] = key
    return key


def _derive_key(settings: Any) -> bytes:
    for loaded in load_keys(settings):
        if loaded.algorithm == "HS256" and loaded.signing is not None:
            return hmac.new(loaded.signing, _KEY_LABEL, hashlib.sha256).digest()
    logger.warning("no HS256 API signing key: web sessions use a per-process key "
                   "and end when the process restarts")
    return secrets.token_bytes(32)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_session(key: bytes, values: dict[str, Any]) -> str:
    """Return ``values`` as signed cookie text: base64url JSON, a dot, base64url HMAC."""
    body = _b64(json.dumps(values, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(key, body.encode("ascii"), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def decode_session(key: bytes, cookie: str | None, *,
                   now: float | None = None) -> dict[str, Any] | None:
    """Return the values of a cookie made by :func:`encode_session`.

    Returns ``None`` for a missing, tampered, malformed or expired cookie.
    """
    if not cookie or cookie.count(".") != 1 or len(cookie) > 2000:
        return None
    body, mac_text = cookie.split(".")
    expected = hmac.new(key, body.encode("ascii", "replace"), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(expected, _unb64(mac_text)):
            return None
        values = json.loads(_unb64(body))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(values, dict) or not isinstance(values.get("iat"), int):
        return None
    age = (now if now is not None else time.time()) - values["iat"]
    if not 0 <= age <= SESSION_MAX_AGE_SECONDS:
        return None
    return values


def new_session(client_id: str, key_id: str | None) -> dict[str, Any]:
    """Return the values of a fresh session with a new CSRF token."""
    return {"sub": client_id, "key": key_id, "csrf": secrets.token_urlsafe(24),
            "iat": int(time.time())}


def _current_roles(engine: Engine, client_id: str, key_id: str | None) -> Any:
    with engine.connect() as conn:
        row = conn.execute(
            select(api_clients.c.roles).where(
                api_clients.c.client_id == client_id, api_clients.c.disabled_at.is_(None))
        ).first()
        if row is None:
            return None
        if key_id is not None:
            live = conn.execute(
                select(api_keys.c.id).where(
                    api_keys.c.key_id == key_id, api_keys.c.client_id == client_id,
                    api_keys.c.revoked_at.is_(None))
            ).first()
            if live is None:
                return None
    return parse_roles(row.roles)


def signed_in(request: Request) -> WebUser | None:
    """Return the user of the request's session cookie, or ``None`` when there is none.

    A cookie whose client was disabled, or whose API key was revoked, since
    sign-in counts as no session.
    """
    cached = getattr(request.state, "web_user", False)
    if cached is not False:
        return cached
    values = decode_session(session_key(request), request.cookies.get(SESSION_COOKIE))
    user = None
    if values is not None and isinstance(values.get("sub"), str):
        roles = _current_roles(context(request).engine, values["sub"], values.get("key"))
        if roles is not None:
            principal = Principal(values["sub"], roles, scopes_for(roles), "session")
            user = WebUser(principal, str(values.get("csrf", "")), values.get("key"))
            request.state.principal = principal
        else:
            logger.info("web session of client %s ended: client disabled or key revoked",
                        values["sub"])
    request.state.web_user = user
    return user


def csrf_matches(expected: str, submitted: str | None) -> bool:
    """Return whether a submitted CSRF token equals the session's."""
    return bool(expected) and submitted is not None and hmac.compare_digest(
        expected.encode(), submitted.encode())


def cookie_options(request: Request) -> dict[str, Any]:
    """Return the flags every UI cookie is set with."""
    return {"httponly": True, "samesite": "strict", "path": "/ui",
            "secure": request.url.scheme == "https"}
