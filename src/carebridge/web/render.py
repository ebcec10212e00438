"""Rendering shared by the UI pages: templates, the navigation, refusals and errors."""

from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from carebridge.api.deps import ApiError
from carebridge.api.security import Scope
from carebridge.web.session import WebUser, csrf_matches, signed_in

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(str(resources.files("carebridge.web")))
templates = Jinja2Templates(directory=str(PACKAGE_DIR / "templates"))

NAVIGATION: tuple[tuple[str, str, Scope], ...] = (
    ("Work queues", "/ui/queues", Scope.WORK_ITEMS_READ),
    ("Messages", "/ui/messages", Scope.MESSAGES_READ),
    ("Deliveries", "/ui/deliveries", Scope.DELIVERIES_READ),
    ("Dashboard", "/ui/dashboard", Scope.METRICS_READ),
    ("Reconciliation", "/ui/reconciliation", Scope.DELIVERIES_READ),
)
"""Pages in the header, each with the scope that shows it."""

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
"""Headers of every UI page: pages show patient data, so nothing is cached or framed."""


def when(value: dt.datetime | dt.date | None) -> str:
    """Format an instant as ``YYYY-MM-DD HH:MM UTC`` (a date as ``YYYY-MM-DD``)."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return value.isoformat()


def duration(seconds: float | None) -> str:
    """Format seconds as the two largest units (``3d 4h``, ``12m 5s``), or ``1.7s``."""
    if seconds is None:
        return ""
    if abs(seconds) < 60 and seconds != int(seconds):
        return f"{seconds:.1f}s"
    sign = "-" if seconds < 0 else ""
    left = int(abs(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
    return sign + " ".join(parts[:2])


def money(value: Decimal | str | None) -> str:
    return "" if value is None else f"{Decimal(value):,.2f}"


templates.env.filters["when"] = when
templates.env.filters["duration"] = duration
templates.env.filters["money"] = money


def render(request: Request, user: WebUser | None, name: str, status_code: int = 200,
           **values: Any) -> HTMLResponse:
    """Render template ``name`` with the navigation the user's scopes allow."""
    navigation = [
        {"label": label, "href": href, "current": request.url.path.startswith(href)}
        for label, href, scope in NAVIGATION if user is not None and user.may(scope)
    ]
    response = templates.TemplateResponse(
        request, name, {"user": user, "navigation": navigation, "Scope": Scope, **values},
        status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response


def error_page(request: Request, user: WebUser | None, status: int, title: str,
               message: str, back: str | None = None) -> HTMLResponse:
    return render(request, user, "error.html", status_code=status, title=title,
                  message=message, back=back)


def from_api_error(request: Request, user: WebUser, exc: ApiError,
                   back: str | None = None) -> HTMLResponse:
    """Render an error of the operations functions (404, 409, 410) as a page."""
    titles = {404: "Not found", 409: "Not possible now", 410: "Content pruned",
              422: "Invalid input"}
    return error_page(request, user, exc.status, titles.get(exc.status, "Error"),
                      exc.message, back)


def sign_in_redirect(request: Request) -> RedirectResponse:
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    return RedirectResponse(f"/ui/sign-in?next={quote(target, safe='')}", status_code=303)


def deny(request: Request, user: WebUser | None, scope: Scope) -> Response | None:
    """Return the response for a request the user may not make, or ``None`` to go on.

    Without a session any request goes to the sign-in page, a POST too because
    its form cannot be trusted. A user whose roles lack ``scope`` gets the 403 page.
    """
    if user is None:
        return sign_in_redirect(request)
    if not user.may(scope):
        logger.info("web request %s %s rejected for client %s: scope %s missing",
                    request.method, request.url.path, user.client_id, scope.value)
        roles = ", ".join(sorted(user.principal.roles)) or "none"
        return error_page(request, user, 403, "Not allowed",
                          f"Your roles ({roles}) do not grant the scope {scope.value} "
                          "that this page or action needs. Ask an administrator for "
                          "a role that has it.")
    return None


def same_origin(request: Request) -> bool:
    """Return whether the request's Origin header, if any, names this server."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


def deny_post(request: Request, user: WebUser | None, scope: Scope,
              csrf: str | None) -> Response | None:
    """Return the response for a form post that must not run, or ``None`` to go on.

    Adds the CSRF token and Origin checks to :func:`deny`.
    """
    refusal = deny(request, user, scope)
    if refusal is not None:
        return refusal
    assert user is not None
    if not csrf_matches(user.csrf, csrf) or not same_origin(request):
        logger.warning("web form post %s rejected for client %s: CSRF check failed",
                       request.url.path, user.client_id)
        return error_page(request, user, 403, "Form expired",
                          "The form was not sent from this session. Reload the page "
                          "and submit the form again.")
    return None


def current_user(request: Request) -> WebUser | None:
    """Return the signed-in user or ``None``, as a FastAPI dependency."""
    return signed_in(request)
