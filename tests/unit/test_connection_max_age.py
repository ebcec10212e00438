"""ConnectionMaxAge: a keep-alive connection closes after its age limit."""

from __future__ import annotations

from typing import Any

import pytest

from carebridge.api import app as app_module
from carebridge.api.app import ConnectionMaxAge


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"connection", b"keep-alive")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _headers(middleware: ConnectionMaxAge, port: int = 50000) -> dict[bytes, bytes]:
    import asyncio

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "client": ("127.0.0.1", port), "path": "/health", "headers": []}
    asyncio.run(middleware(scope, receive, send))
    return dict(sent[0]["headers"])


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(app_module.time, "monotonic", lambda: now[0])
    return now


def test_young_connection_kept(clock: list[float]) -> None:
    middleware = ConnectionMaxAge(_ok, max_age=2.0)
    assert _headers(middleware)[b"connection"] == b"keep-alive"
    clock[0] += 1.9
    assert _headers(middleware)[b"connection"] == b"keep-alive"


def test_old_connection_closed_once(clock: list[float]) -> None:
    middleware = ConnectionMaxAge(_ok, max_age=2.0)
    _headers(middleware)
    clock[0] += 2.5
    headers = _headers(middleware)
    assert headers[b"connection"] == b"close"
    assert list(headers).count(b"connection") == 1
    # The next connection from the same port is a new one.
    assert _headers(middleware)[b"connection"] == b"keep-alive"


def test_other_connections_keep_own_age(clock: list[float]) -> None:
    middleware = ConnectionMaxAge(_ok, max_age=2.0)
    _headers(middleware, port=50001)
    clock[0] += 1.5
    _headers(middleware, port=50002)
    clock[0] += 1.0
    assert _headers(middleware, port=50001)[b"connection"] == b"close"
    assert _headers(middleware, port=50002)[b"connection"] == b"keep-alive"


def test_zero_age_never_closes(clock: list[float]) -> None:
    middleware = ConnectionMaxAge(_ok, max_age=0)
    _headers(middleware)
    clock[0] += 3600
    assert _headers(middleware)[b"connection"] == b"keep-alive"


def test_closed_connections_forgotten(clock: list[float]) -> None:
    middleware = ConnectionMaxAge(_ok, max_age=2.0)
    for port in range(ConnectionMaxAge.PRUNE_AT):
        _headers(middleware, port=port)
    clock[0] += 3
    _headers(middleware, port=60000)
    assert len(middleware._opened) == 1
