"""Deliveries through the outbox to a real HTTP destination on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from carebridge.config.model import Configuration, DestinationConfig
from carebridge.destinations.registry import build_destination
from carebridge.engine.deliveries import (
    DEAD,
    DELIVERED,
    claim,
    delivery_summary,
    enqueue,
    enqueue_journals,
    idempotency_key,
    record,
    replay,
    run_deliveries,
)
from carebridge.engine.intake import store_inputs
from carebridge.engine.posting import post_journals
from carebridge.engine.processor import process_pending
from carebridge.ingest.files.sources import split_path
from carebridge.store.schema import deliveries, journals

from .conftest import hl7
from .http_destination_server import TestDestination

T0 = dt.datetime(2024, 6, 1, 8, 0, tzinfo=dt.UTC)


@pytest.fixture()
def server() -> Iterator[TestDestination]:
    destination = TestDestination().start()
    yield destination
    destination.stop()


def destination(name: str, server: TestDestination, **options) -> DestinationConfig:
    settings = {"url": server.url, "timeout_seconds": 5.0}
    defaults = {
        "max_attempts": 5,
        "backoff_base_seconds": 1.0,
        "backoff_cap_seconds": 8.0,
        "circuit_failure_threshold": 100,
        "circuit_cooldown_seconds": 30.0,
        "lease_seconds": 60.0,
        "batch_size": 50,
    }
    return DestinationConfig(
        name, "http", ("journal",), settings, **{**defaults, **options}
    )


def with_destinations(
    config: Configuration, *targets: DestinationConfig
) -> Configuration:
    return dataclasses.replace(config, destinations=targets)


def enqueue_records(engine: Engine, name: str, count: int, start: int = 1) -> list[int]:
    with engine.begin() as conn:
        return [
            enqueue(
                conn,
                name,
                "journal",
                n,
                idempotency_key(name, "journal", f"J{n}"),
                {"journal": n},
                now=T0,
            )
            for n in range(start, start + count)
        ]


def rows(engine: Engine, *where) -> list:
    with engine.connect() as conn:
        return conn.execute(
            select(deliveries).where(*where).order_by(deliveries.c.id)
        ).all()


def drain(engine: Engine, config: Configuration, start: dt.datetime, passes: int = 30):
    """Run passes, each 10 s after the last (past the 8 s cap), until none is due."""
    now = start
    for _ in range(passes):
        run_deliveries(engine, config, owner="w1", now=now, rng=random.Random(3))
        with engine.connect() as conn:
            summary = delivery_summary(conn)
        if not any(s["pending"] or s["in_flight"] for s in summary.values()):
            return now
        now += dt.timedelta(seconds=10)
    raise AssertionError(f"not drained: {summary}")


def test_posted_journals_are_delivered_with_their_sources(
    engine: Engine, config: Configuration, server: TestDestination, tmp_path: Path
) -> None:
    path = tmp_path / "dft.hl7"
    path.write_bytes(
        hl7(
            "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|DLV0001|P|2.5",
            "EVN|P03|20240501120000",
            "PID|1||MRN0091^^^SENDFAC^MR||TESTPATIENT^IOTA",
            "PV1|1|O|CLINIC1||||||||||||||||VIS0091",
            "FT1|1|TXN0091||20240501|20240501|CG|99213^OFFICE VISIT EST^CPT|||1|135.50&USD",
        )
    )
    store_inputs(engine, split_path(path), source="test")
    process_pending(engine, config, as_of=dt.date(2024, 6, 1))
    post_journals(engine, config)
    live = with_destinations(config, destination("erp", server))
    with engine.begin() as conn:
        ids = conn.execute(select(journals.c.id, journals.c.journal_key)).all()
        created = enqueue_journals(conn, live, [row.id for row in ids])
        assert enqueue_journals(conn, live, [row.id for row in ids]) == created
    assert len(created) == len(ids) >= 1

    result = run_deliveries(engine, live, owner="w1")
    assert (result.claimed, result.delivered) == (len(ids), len(ids))
    key = f"carebridge:erp:journal:{ids[0].journal_key}"
    body = json.loads(server.bodies[key])
    assert body["journal"]["journal_key"] == ids[0].journal_key
    assert body["journal"]["total_debit"] == body["journal"]["total_credit"]
    assert isinstance(body["journal"]["total_debit"], str)
    amounts = {line["debit"] for line in body["lines"]} | {
        line["credit"] for line in body["lines"]
    }
    assert "135.50" in amounts
    assert all(
        line["source_message_id"] and line["source_record_id"] for line in body["lines"]
    )
    (row,) = rows(engine, deliveries.c.id == created[0])
    assert row.state == DELIVERED
    assert row.attempts == 1
    assert row.response.startswith("201")
    assert row.delivered_at is not None


def test_server_errors_are_retried_then_delivered(
    engine: Engine, config: Configuration, server: TestDestination
) -> None:
    live = with_destinations(config, destination("erp", server))
    (delivery_id,) = enqueue_records(engine, "erp", 1)
    server.fail_next(2, 503, "maintenance")

    first = run_deliveries(engine, live, owner="w1", now=T0)
    assert first.retried == 1
    (row,) = rows(engine)
    assert row.state == "pending"
    assert row.attempts == 1
    assert "503" in row.last_error
    assert (
        T0 <= row.next_attempt_at.replace(tzinfo=dt.UTC) <= T0 + dt.timedelta(seconds=2)
    )
    # Not due yet at T0: nothing is claimed early.
    drain(engine, live, T0 + dt.timedelta(seconds=10))
    (row,) = rows(engine)
    assert (row.id, row.state, row.attempts) == (delivery_id, DELIVERED, 3)
    assert server.accepted == {idempotency_key("erp", "journal", "J1"): 1}


def test_client_error_dead_at_once(
    engine: Engine, config: Configuration, server: TestDestination, caplog
) -> None:
    live = with_destinations(config, destination("erp", server))
    enqueue_records(engine, "erp", 1)
    server.always(400, "account 9999 is not in the chart")

    with caplog.at_level("WARNING", logger="carebridge.engine.deliveries"):
        result = run_deliveries(engine, live, owner="w1", now=T0)
    assert result.dead == 1
    (row,) = rows(engine)
    assert (row.state, row.attempts) == (DEAD, 1)
    assert (
        "400" in row.last_error and "account 9999 is not in the chart" in row.last_error
    )
    assert row.dead_at is not None
    dead_logs = [
        r for r in caplog.records if getattr(r, "action", "") == "delivery_dead"
    ]
    assert len(dead_logs) == 1
    assert dead_logs[0].delivery_id == row.id
    assert "9999" not in dead_logs[0].getMessage()  # logs carry ids, not content


def test_dead_after_the_retry_ceiling_with_the_reason(
    engine: Engine, config: Configuration, server: TestDestination
) -> None:
    live = with_destinations(config, destination("erp", server, max_attempts=3))
    enqueue_records(engine, "erp", 2)
    server.always(500, "database down")
    drain(engine, live, T0)
    for row in rows(engine):
        assert (row.state, row.attempts) == (DEAD, 3)
        assert row.last_error.startswith("gave up after 3 attempts: 500")
    assert len(server.received) == 6
    assert not server.accepted


def test_replay_one_a_destination_and_all_dead_letters(
    engine: Engine, config: Configuration, server: TestDestination
) -> None:
    erp, audit = destination("erp", server), destination("audit", server)
    live = with_destinations(config, erp, audit)
    erp_ids = enqueue_records(engine, "erp", 3)
    audit_ids = enqueue_records(engine, "audit", 2)
    server.always(422, "unprocessable")
    run_deliveries(engine, live, owner="w1", now=T0)
    assert len(rows(engine, deliveries.c.state == DEAD)) == 5
    server.always(None)

    with engine.begin() as conn:
        with pytest.raises(ValueError):
            replay(conn)
        one = replay(conn, delivery_ids=[erp_ids[0]], now=T0)
        assert replay(conn, delivery_ids=[erp_ids[0]], now=T0) == []  # already live
        assert replay(conn, delivery_ids=[one[0]]) == []  # not dead
    drain(engine, live, T0)
    with engine.begin() as conn:
        by_destination = replay(conn, destination="audit", now=T0)
    drain(engine, live, T0)
    with engine.begin() as conn:
        everything = replay(conn, all_dead=True, now=T0)
    drain(engine, live, T0)

    assert len(one) == 1
    assert len(by_destination) == 2
    assert len(everything) == 2
    copies = rows(engine, deliveries.c.replay_of.is_not(None))
    assert {row.replay_of for row in copies} == set(erp_ids) | set(audit_ids)
    originals = {row.id: row for row in rows(engine, deliveries.c.replay_of.is_(None))}
    for row in copies:
        assert row.state == DELIVERED
        assert row.idempotency_key == originals[row.replay_of].idempotency_key
        assert row.payload == originals[row.replay_of].payload
    assert all(row.state == DEAD for row in originals.values())
    assert len(server.accepted) == 5
    assert set(server.accepted.values()) == {1}


def test_expired_lease_reclaimed_once(
    engine: Engine, config: Configuration, server: TestDestination
) -> None:
    erp = destination("erp", server, lease_seconds=30.0)
    live = with_destinations(config, erp)
    (delivery_id,) = enqueue_records(engine, "erp", 1)
    # A worker claims, sends, and dies before writing the result.
    (held,) = claim(engine, erp, owner="dead-worker", now=T0, limit=10)
    first = build_destination(erp).send(held.outbound())
    assert first.status == 201
    # Its lease is still running, so no other worker may claim the delivery.
    assert (
        run_deliveries(
            engine, live, owner="w2", now=T0 + dt.timedelta(seconds=10)
        ).claimed
        == 0
    )

    after = run_deliveries(engine, live, owner="w2", now=T0 + dt.timedelta(seconds=31))
    assert (after.claimed, after.delivered) == (1, 1)
    (row,) = rows(engine)
    assert (row.id, row.state, row.lease_owner, row.attempts) == (
        delivery_id,
        DELIVERED,
        "w2",
        2,
    )
    assert row.response.startswith("409")
    key = idempotency_key("erp", "journal", "J1")
    assert server.received.count(key) == 2
    assert server.accepted[key] == 1
    # The dead worker wakes up: its late result is not written.
    late = record(engine, erp, held, first, now=T0 + dt.timedelta(seconds=40))
    assert late.state is None
    (again,) = rows(engine)
    assert again.lease_owner == "w2"
    assert again.response.startswith("409")


def test_disabled_destination_keeps_its_deliveries(
    engine: Engine, config: Configuration, server: TestDestination
) -> None:
    live = with_destinations(config, destination("erp", server, enabled=False))
    enqueue_records(engine, "erp", 3)
    assert run_deliveries(engine, live, owner="w1", now=T0).claimed == 0
    with engine.connect() as conn:
        assert delivery_summary(conn) == {
            "erp": {"pending": 3, "in_flight": 0, "delivered": 0, "dead": 0}
        }
    assert server.received == []


def test_concurrent_workers_send_each_delivery_once(
    engine: Engine, config: Configuration, server: TestDestination
) -> None:
    live = with_destinations(config, destination("erp", server, batch_size=10))
    enqueue_records(engine, "erp", 200)
    errors: list[BaseException] = []

    def work(owner: str) -> None:
        try:
            for _ in range(100):
                if run_deliveries(engine, live, owner=owner).claimed == 0:
                    return
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(4)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(60)
    assert errors == []
    with engine.connect() as conn:
        assert delivery_summary(conn)["erp"]["delivered"] == 200
    # No delivery was claimed by two workers: each key was sent exactly once.
    assert len(server.received) == 200 == len(set(server.received))
    owners = {row.lease_owner for row in rows(engine)}
    assert len(owners) > 1
