"""Sign-in, sign-out, the start page and the bundled static files."""

from __future__ import annotations

import logging
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from carebridge import audit
from carebridge.api.deps import RateLimiter, context
from carebridge.api.security import (
    AuthenticationError,
    Principal,
    authenticate_api_key,
    authenticate_client,
)
from carebridge.web.render import (
    NAVIGATION,
    PACKAGE_DIR,
    SECURITY_HEADERS,
    current_user,
    error_page,
    render,
    same_origin,
)
from carebridge.web.session import (
    SESSION_COOKIE,
    SESSION_MAX_AGE_SECONDS,
    SIGN_IN_COOKIE,
    WebUser,
    cookie_options,
    csrf_matches,
    encode_session,
    new_session,
    session_key,
)

logger = logging.getLogger(__name__)

router = APIRouter()

STATIC_FILES = {"style.css": "text/css", "favicon.svg": "image/svg+xml"}
"""The files served under /ui/static, with their media types."""

_sign_in_limiter = RateLimiter(30)
"""Sign-in attempts per peer and client id per minute; scrypt makes each costly."""


def _safe_next(target: str | None) -> str:
    """Return ``target`` when it is a path of the UI, else the start page."""
    if target and target.startswith("/ui/") and not target.startswith("//") \
            and "\\" not in target:
        return target
    return "/ui/"


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        return Response("not found", status_code=404, media_type="text/plain")
    return FileResponse(PACKAGE_DIR / "static" / name, media_type=media_type,
                        headers={"Cache-Control": "max-age=3600",
                                 "X-Content-Type-Options": "nosniff"})


@router.get("/")
def start(request: Request,
          user: Annotated[WebUser | None, Depends(current_user)]) -> Response:
    """Send the user to the first page their roles allow."""
    if user is None:
        return RedirectResponse("/ui/sign-in", status_code=303)
    for _, href, scope in NAVIGATION:
        if user.may(scope):
            return RedirectResponse(href, status_code=303)
    return error_page(request, user, 403, "No pages for your roles",
                      "Your roles grant no scope that a page of this UI needs. "
                      "Ask an administrator for a role such as revenue-cycle.")


def _sign_in_form(request: Request, status_code: int = 200, error: str | None = None,
                  client_id: str = "", next_path: str = "/ui/") -> Response:
    token = secrets.token_urlsafe(24)
    response = render(request, None, "sign_in.html", status_code=status_code,
                      csrf=token, error=error, client_id=client_id, next_path=next_path)
    response.set_cookie(SIGN_IN_COOKIE, token, max_age=1800, **cookie_options(request))
    return response


@router.get("/sign-in")
def sign_in_page(request: Request, next: str | None = None) -> Response:
    return _sign_in_form(request, next_path=_safe_next(next))


def _authenticate(request: Request, client_id: str, client_secret: str,
                  api_key: str) -> tuple[Principal, str | None]:
    engine = context(request).engine
    if api_key:
        principal = authenticate_api_key(engine, api_key.strip())
        return principal, api_key.strip().split("_", 2)[1]
    if not client_id or not client_secret:
        raise AuthenticationError("enter a client id and secret, or an API key")
    return authenticate_client(engine, client_id, client_secret), None


@router.post("/sign-in")
def sign_in(
    request: Request,
    csrf: Annotated[str, Form(max_length=100)] = "",
    client_id: Annotated[str, Form(max_length=120)] = "",
    client_secret: Annotated[str, Form(max_length=200)] = "",
    api_key: Annotated[str, Form(max_length=300)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/ui/",
) -> Response:
    next_path = _safe_next(next)
    if not csrf_matches(request.cookies.get(SIGN_IN_COOKIE, ""), csrf) \
            or not same_origin(request):
        return _sign_in_form(request, 403, "The sign-in form expired. Please try again.",
                             client_id, next_path)
    peer = request.client.host if request.client else "unknown"
    if not _sign_in_limiter.allow(f"{peer}:{client_id or 'api-key'}"):
        return _sign_in_form(request, 429, "Too many sign-in attempts; wait a minute.",
                             client_id, next_path)
    try:
        principal, key_id = _authenticate(request, client_id.strip(), client_secret,
                                          api_key)
    except AuthenticationError as exc:
        logger.info("web sign-in rejected for client %s", client_id or "(api key)")
        return _sign_in_form(request, 401, f"Sign-in failed: {exc}.", client_id, next_path)
    with context(request).engine.begin() as conn:
        audit.record(conn, principal.actor, "ui.sign_in", "client", principal.client_id,
                     {"via": "api-key" if key_id else "secret"})
    logger.info("web sign-in of client %s", principal.client_id)
    response = RedirectResponse(next_path, status_code=303)
    values = new_session(principal.client_id, key_id)
    response.set_cookie(SESSION_COOKIE, encode_session(session_key(request), values),
                        max_age=SESSION_MAX_AGE_SECONDS, **cookie_options(request))
    response.delete_cookie(SIGN_IN_COOKIE, path="/ui")
    return response


@router.post("/sign-out")
def sign_out(
    request: Request, user: Annotated[WebUser | None, Depends(current_user)],
    csrf: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    # The cookie goes in any case; only a sign-out from the session's own
    # form is audited, so a forged post cannot write audit rows.
    response = RedirectResponse("/ui/sign-in", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/ui")
    if user is not None and csrf_matches(user.csrf, csrf):
        with context(request).engine.begin() as conn:
            audit.record(conn, user.principal.actor, "ui.sign_out", "client",
                         user.client_id)
        logger.info("web sign-out of client %s", user.client_id)
    response.headers.update(SECURITY_HEADERS)
    return response
