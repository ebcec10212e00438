"""A standard-library JSON-RPC client for trytond 8.2.

trytond serves JSON-RPC at ``http://HOST:PORT/DATABASE/rpc/`` (gotcha: not
``/DATABASE/``). A login (``common.db.login``) returns a user id and a
session token; later calls send ``Authorization: Session
base64(login:uid:token)``. Model calls are ``model.<model>.<method>`` with the
context as the last parameter. Decimals, dates and datetimes travel as
objects tagged with ``__class__``, which :func:`encode` and :func:`decode`
translate.

Errors are sorted into two exception classes, because the delivery engine
must tell a record Tryton rejects from a Tryton it cannot reach:

* :class:`TrytonUnavailable`: connection refused or reset, a timeout, an
  HTTP 5xx or 429, a concurrency conflict, or a server-side exception that
  is not a user error (for example a database lock). Sending again later
  may succeed.
* :class:`TrytonUserError`: Tryton's ``UserError`` or ``UserWarning``, raised
  for invalid data (a missing period, a closed fiscal year, an unknown
  product, a unique-key violation). The same call fails again.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import logging
import threading
from collections.abc import Sequence
from decimal import Decimal
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

DETAIL_LIMIT = 300


class TrytonError(Exception):
    """A failed call to Tryton."""


class TrytonUnavailable(TrytonError):
    """Tryton could not be reached or failed for a reason other than the data."""


class TrytonUserError(TrytonError):
    """Tryton rejected the call's data with a ``UserError`` or ``UserWarning``.

    ``kind`` is ``UserError`` or ``UserWarning``; ``message`` is Tryton's
    text, in the language of the session.
    """

    def __init__(self, kind: str, message: str, description: str = "") -> None:
        self.kind = kind
        self.message = message
        self.description = description
        text = f"{kind}: {message}"
        if description:
            text += f" ({description})"
        super().__init__(text)


class TrytonLoginError(TrytonUnavailable):
    """The login was rejected: wrong user or password, or too many attempts.

    It counts as unavailable so deliveries wait for the credentials to be
    fixed instead of going dead one by one.
    """


# ------------------------------------------------------------------ codec


def encode(value: Any) -> Any:
    """Convert ``value`` to JSON-ready data with Tryton's ``__class__`` tags."""
    if isinstance(value, Decimal):
        return {"__class__": "Decimal", "decimal": str(value)}
    if isinstance(value, dt.datetime):
        return {
            "__class__": "datetime",
            "year": value.year,
            "month": value.month,
            "day": value.day,
            "hour": value.hour,
            "minute": value.minute,
            "second": value.second,
            "microsecond": value.microsecond,
        }
    if isinstance(value, dt.date):
        return {
            "__class__": "date",
            "year": value.year,
            "month": value.month,
            "day": value.day,
        }
    if isinstance(value, dict):
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(item) for item in value]
    return value


def decode(document: dict[str, Any]) -> Any:
    """Turn a ``__class__``-tagged JSON object back into its Python value."""
    kind = document.get("__class__")
    if kind == "Decimal":
        return Decimal(document["decimal"])
    if kind == "date":
        return dt.date(document["year"], document["month"], document["day"])
    if kind == "datetime":
        return dt.datetime(
            document["year"],
            document["month"],
            document["day"],
            document.get("hour", 0),
            document.get("minute", 0),
            document.get("second", 0),
            document.get("microsecond", 0),
        )
    if kind == "bytes":
        return base64.b64decode(document["base64"])
    return document


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 3] + "..."


# ----------------------------------------------------------------- client


class TrytonClient:
    """One user's session on one Tryton database, over HTTP JSON-RPC.

    The client logs in on first use and again once if the session has
    expired (HTTP 401 or 403). It is safe to share between threads: calls
    are serialised, because one trytond session handles one request at a time
    well enough and the delivery engine sends batches, not single records.
    """

    def __init__(
        self,
        host: str,
        port: int,
        database: str,
        user: str,
        password: str,
        *,
        timeout: float = 60.0,
        language: str = "en",
    ) -> None:
        self.host = host
        self.port = port
        self.database = database
        self.user = user
        self._password = password
        self.timeout = timeout
        self.language = language
        self._path = f"/{quote(database)}/rpc/"
        self._session: str | None = None
        self._context: dict[str, Any] | None = None
        self._request_id = 0
        self._lock = threading.Lock()

    # -------------------------------------------------------------- HTTP

    def _post(
        self, path: str, method: str, params: Sequence[Any], *, auth: bool
    ) -> Any:
        self._request_id += 1
        body = json.dumps(
            {"id": self._request_id, "method": method, "params": encode(list(params))},
            separators=(",", ":"),
        ).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth and self._session:
            headers["Authorization"] = f"Session {self._session}"
        connection = http.client.HTTPConnection(
            self.host, self.port, timeout=self.timeout
        )

        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            raw = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            # Refused, reset or timed out: the call may or may not have run,
            # which the caller's external keys make harmless to repeat.
            raise TrytonUnavailable(_short(f"{type(exc).__name__}: {exc}")) from exc
        finally:
            connection.close()

        if status == 401:
            raise _SessionExpired(status)
        if status == 403:
            # trytond returns 403 for a method that is not exposed over RPC.
            raise TrytonUserError(
                "HTTP", f"403 Forbidden: {method} is not callable over RPC"
            )
        if status == 429 or status >= 500 or status == 423:
            text = raw.decode("utf-8", errors="replace")
            raise TrytonUnavailable(_short(f"HTTP {status} from {method}: {text}"))
        if status == 404:
            # Unknown database: a set-up fault, so deliveries wait for the fix.
            raise TrytonUnavailable(
                f"HTTP 404 from {method}: database {self.database!r} not found"
            )
        if status != 200:
            text = raw.decode("utf-8", errors="replace")
            raise TrytonUserError("HTTP", _short(f"{status} from {method}: {text}"))

        try:
            document = json.loads(raw, object_hook=decode)
        except ValueError as exc:
            raise TrytonUnavailable(f"invalid JSON from {method}: {exc}") from exc
        if "error" in document and document["error"] is not None:
            raise _error(method, document["error"])
        return document.get("result")

    # ------------------------------------------------------------ session

    def login(self) -> None:
        """Log in and load the user's preferences as the call context.

        Raises:
            TrytonLoginError: The user or password is wrong, or logins are
                rate-limited.
            TrytonUnavailable: Tryton cannot be reached.
        """
        params = [self.user, {"password": self._password}, self.language]
        try:
            result = self._post(self._path, "common.db.login", params, auth=False)
        except (_SessionExpired, TrytonUserError) as exc:
            raise TrytonLoginError(f"login of {self.user!r} failed: {exc}") from None
        if not isinstance(result, list) or len(result) < 2:
            # trytond returns false for a wrong user or password.
            raise TrytonLoginError(
                f"login of {self.user!r} failed: wrong user or password"
            )
        uid, token = result[0], result[1]
        self._session = base64.b64encode(f"{self.user}:{uid}:{token}".encode()).decode()
        try:
            preferences = self._post(
                self._path, "model.res.user.get_preferences", [True, {}], auth=True
            )
        except _SessionExpired:
            self._session = None
            raise TrytonLoginError(f"new session of {self.user!r} rejected") from None
        self._context = dict(preferences or {})
        log.info(
            "logged in to Tryton",
            extra={"action": "tryton_login", "database": self.database, "uid": uid},
        )

    @property
    def context(self) -> dict[str, Any]:
        """The session's context (company, language, ...), after login."""
        if self._context is None:
            self.login()
        assert self._context is not None
        return self._context

    def call(
        self, method: str, *params: Any, context: dict[str, Any] | None = None
    ) -> Any:
        """Call ``method`` (e.g. ``model.account.move.create``) with ``params``.

        The session's context, updated with ``context``, is appended as the
        last parameter.

        Raises:
            TrytonUserError: Tryton rejected the data.
            TrytonUnavailable: Tryton cannot be reached or failed otherwise.
        """
        with self._lock:
            for attempt in (1, 2):
                if self._session is None:
                    self.login()
                merged = {**(self._context or {}), **(context or {})}
                try:
                    return self._post(self._path, method, [*params, merged], auth=True)
                except _SessionExpired:
                    # Sessions expire after trytond's session timeout; log in
                    # once more, then give up.
                    self._session = None
                    if attempt == 2:
                        raise TrytonLoginError(
                            f"session of {self.user!r} rejected after a new login"
                        ) from None
        raise AssertionError("unreachable")

    def model(
        self,
        model: str,
        method: str,
        *params: Any,
        context: dict[str, Any] | None = None,
    ) -> Any:
        """Call ``model.<model>.<method>``."""
        return self.call(f"model.{model}.{method}", *params, context=context)

    def search_read(
        self,
        model: str,
        domain: list[Any],
        fields: Sequence[str],
        *,
        order: list[tuple[str, str]] | None = None,
        limit: int | None = None,
        context: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Return the records of ``model`` matching ``domain`` with ``fields``."""
        return self.model(
            model, "search_read", domain, 0, limit, order, list(fields), context=context
        )

    def server_version(self) -> str:
        """Return trytond's version; needs no login, so it probes a starting server.

        Raises:
            TrytonUnavailable: Tryton cannot be reached.
        """
        with self._lock:
            return self._post("/rpc/", "common.server.version", [], auth=False)


class _SessionExpired(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _error(method: str, error: Any) -> TrytonError:
    """Return the exception for a JSON-RPC ``error`` member."""
    if isinstance(error, list) and error and error[0] in ("UserError", "UserWarning"):
        args = error[1] if len(error) > 1 and isinstance(error[1], list) else []
        if error[0] == "UserWarning":
            # (warning name, message, description)
            message = args[1] if len(args) > 1 else ""
            description = args[2] if len(args) > 2 else ""
        else:
            message = args[0] if args else ""
            description = args[1] if len(args) > 1 else ""
        return TrytonUserError(error[0], _short(message), _short(description or ""))
    if isinstance(error, list) and error and error[0] == "ConcurrencyException":
        return TrytonUnavailable(f"concurrency conflict in {method}")
    # Any other server-side exception: Tryton sends (str(exception), traceback).
    head = error[0] if isinstance(error, list) and error else error
    return TrytonUnavailable(_short(f"server error in {method}: {head}"))
