"""An HTTP JSON destination: each delivery is one POST with an Idempotency-Key.

The standard library's :mod:`http.client` is enough for one POST per
delivery with a timeout, and adds no dependency. The response status
decides the delivery's fate (see :func:`classify_status`); the body is kept
only as short text for the outbox row.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import http.client
import json
import ssl
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from carebridge.destinations.registry import Outbound, SendResult, Verdict

USER_AGENT = "carebridge-deliveries/1"
DETAIL_LIMIT = 300

# RFC 9110 §15.5.9 (408 Request Timeout) and RFC 6585 §4 (429 Too Many
# Requests) tell the client to try again later. Other 4xx mean the request
# itself is invalid, so sending it again cannot succeed.
RETRYABLE_CLIENT_ERRORS = frozenset({408, 429})
# The destination already holds a request with this Idempotency-Key: the
# record arrived earlier (perhaps from a worker whose lease expired).
DUPLICATE = 409


class HttpSettings(BaseModel):
    """``settings:`` of a destination of type ``http``."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    url: str = Field(min_length=1)
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials")
        return value


def classify_status(status: int) -> Verdict:
    """Return what an HTTP status means for a delivery.

    2xx and 409 (duplicate key) are delivered; 408, 429 and 5xx are retried
    (RFC 9110 §15.6: the server failed or is unavailable, not the request);
    redirects and other 4xx are dead, since the same request would get the
    same response (redirects are not followed so a POST never moves silently).
    """
    if 200 <= status < 300 or status == DUPLICATE:
        return Verdict.DELIVERED
    if status in RETRYABLE_CLIENT_ERRORS or status >= 500:
        return Verdict.RETRY
    return Verdict.DEAD


def parse_retry_after(
    value: str | None, *, now: dt.datetime | None = None
) -> float | None:
    """Return the delay a Retry-After header requests, in seconds.

    RFC 9110 §10.2.3 allows delay-seconds or an HTTP-date; anything else is
    ignored.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 3] + "..."


def _remote_id(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(document, dict) and isinstance(document.get("id"), (str, int)):
        return str(document["id"])
    return None


def describe_response(status: int, reason: str, body: bytes) -> str:
    """Return the short text kept for a response: status, then id or body."""
    head = f"{status} {reason}".strip()
    if classify_status(status) is Verdict.DELIVERED:
        remote = _remote_id(body)
        return f"{head} id={remote}" if remote else head
    text = body.decode("utf-8", errors="replace")
    return _short(f"{head}: {text}" if text.strip() else head)


class HttpDestination:
    """POSTs each delivery's JSON payload to one URL."""

    def __init__(self, name: str, settings: HttpSettings) -> None:
        self.name = name
        self.settings = settings
        parts = urlsplit(settings.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    @classmethod
    def build(cls, name: str, settings: BaseModel) -> HttpDestination:
        """Build from validated settings (the registry's constructor)."""
        if not isinstance(settings, HttpSettings):
            raise TypeError(f"expected HttpSettings, got {type(settings).__name__}")
        return cls(name, settings)

    def _connection(self) -> http.client.HTTPConnection:
        timeout = self.settings.timeout_seconds
        if self._https:
            context = ssl.create_default_context()
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=context
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def send(self, outbound: Outbound) -> SendResult:
        """POST ``outbound.payload``; a network error or bad status is a result."""
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Idempotency-Key": outbound.idempotency_key,
            "User-Agent": USER_AGENT,
        }
        connection = self._connection()
        try:
            body = outbound.payload.encode("utf-8")
            connection.request("POST", self._path, body=body, headers=headers)
            response = connection.getresponse()
            body = response.read(64 * 1024)
            status, reason = response.status, response.reason
            retry_after = parse_retry_after(response.getheader("Retry-After"))
        except (OSError, http.client.HTTPException) as exc:
            # Refused, reset, timed out or a broken response: the request may
            # or may not have arrived, and the Idempotency-Key makes a resend safe.
            return SendResult(Verdict.RETRY, _short(f"{type(exc).__name__}: {exc}"))
        finally:
            connection.close()
        return SendResult(
            classify_status(status),
            describe_response(status, reason, body),
            status=status,
            retry_after=retry_after,
        )
