"""An outage of the destination: backlog held, breaker open once, then drained once."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random

import pytest
from sqlalchemy import Engine, func, select

from carebridge.config.model import Configuration, DestinationConfig
from carebridge.engine.deliveries import (
    circuit_states,
    delivery_summary,
    enqueue,
    idempotency_key,
    run_deliveries,
)
from carebridge.store.schema import deliveries

from .http_destination_server import TestDestination

T0 = dt.datetime(2024, 6, 1, 8, 0, tzinfo=dt.UTC)
MAX_ATTEMPTS = 8
COOLDOWN = 20.0
CAP = 30.0


def _enqueue(engine: Engine, numbers: range) -> None:
    with engine.begin() as conn:
        for n in numbers:
            key = idempotency_key("erp", "journal", f"J{n}")
            enqueue(conn, "erp", "journal", n, key, {"journal": n}, now=T0)


def _summary(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return delivery_summary(conn)["erp"]


def _max_attempts(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.max(deliveries.c.attempts))).scalar_one()


def _events(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


def test_outage_backlog_breaker_and_drain_exactly_once(
    engine: Engine, config: Configuration, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carebridge.engine.deliveries")
    server = TestDestination().start()
    erp = DestinationConfig(
        "erp",
        "http",
        ("journal",),
        {"url": server.url, "timeout_seconds": 2.0},
        max_attempts=MAX_ATTEMPTS,
        backoff_base_seconds=1.0,
        backoff_cap_seconds=CAP,
        circuit_failure_threshold=5,
        circuit_cooldown_seconds=COOLDOWN,
        lease_seconds=60.0,
        batch_size=50,
    )
    live = dataclasses.replace(config, destinations=(erp,))
    rng = random.Random(11)
    _enqueue(engine, range(1, 151))
    server.stop()  # connections refused from here on
    try:
        now = T0
        first = run_deliveries(engine, live, owner="w1", now=now, rng=rng)
        # Five refusals open the circuit; the rest of the batch goes back unspent.
        assert (first.claimed, first.retried, first.released) == (50, 5, 45)
        assert _summary(engine)["pending"] == 150
        _enqueue(engine, range(151, 201))  # records keep being posted
        for _ in range(40):  # 200 s of outage, a pass every 5 s
            now += dt.timedelta(seconds=5)
            result = run_deliveries(engine, live, owner="w1", now=now, rng=rng)
            assert result.delivered == result.dead == 0
            assert result.claimed <= 1  # only half-open trials
            summary = _summary(engine)
            assert summary["pending"] == 200
            assert summary["dead"] == 0
        assert _max_attempts(engine) < MAX_ATTEMPTS
        assert len(_events(caplog, "circuit_open")) == 1
        assert [r.levelname for r in _events(caplog, "circuit_open")] == ["WARNING"]
        with engine.connect() as conn:
            assert circuit_states(conn)["erp"]["circuit"] in ("open", "half_open")

        server.start()  # same port
        for _ in range(60):
            now += dt.timedelta(seconds=CAP + 1)
            run_deliveries(engine, live, owner="w1", now=now, rng=rng)
            if _summary(engine)["delivered"] == 200:
                break
    finally:
        server.stop()

    assert _summary(engine) == {
        "pending": 0,
        "in_flight": 0,
        "delivered": 200,
        "dead": 0,
    }
    assert len(set(server.received)) == 200
    assert sum(server.accepted.values()) == 200
    assert set(server.accepted.values()) == {1}
    assert len(_events(caplog, "circuit_open")) == 1
    closed = _events(caplog, "circuit_closed")
    assert len(closed) == 1
    assert closed[0].levelname == "INFO"
    with engine.connect() as conn:
        assert circuit_states(conn)["erp"]["circuit"] == "closed"
