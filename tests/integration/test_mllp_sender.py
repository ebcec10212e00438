"""MLLP deliveries through the outbox to receivers on 127.0.0.1: ACK matching, NAK policy, outages."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from carebridge.config.model import Configuration, DestinationConfig, ListenerConfig
from carebridge.destinations.dft import enqueue_charge_lines
from carebridge.destinations.mllp import control_id_for
from carebridge.destinations.registry import build_destination
from carebridge.engine.deliveries import (
    DEAD,
    DELIVERED,
    PENDING,
    claim,
    enqueue,
    idempotency_key,
    run_deliveries,
)
from carebridge.engine.intake import store_inputs
from carebridge.engine.processor import process_pending
from carebridge.ingest.files.sources import split_path
from carebridge.ingest.hl7v2.mllp import FrameDecoder, ListenerThread
from carebridge.store.db import open_engine, sqlite_url
from carebridge.store.schema import charge_lines, deliveries, messages

from .conftest import hl7

T0 = dt.datetime(2024, 6, 1, 8, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def dft(number: int) -> str:
    return (
        hl7(
            f"MSH|^~\\&|CAREBRIDGE|HOSP|BILLING|HOSP|20240501120000||DFT^P03|OUT{number:04d}|P|2.5",
            "EVN|P03|20240501120000",
            f"PID|1||MRN{number:04d}^^^HOSP^MR||TESTPATIENT^ALPHA",
            f"FT1|1|TX{number:04d}||20240501|20240501|CG|99213^OFFICE VISIT^CPT|||1|135.50&USD",
        )
        .decode("ascii")
    )


class ScriptedReceiver:
    """An MLLP receiver whose reply to each frame is the next entry of ``script``.

    Replies: ``aa``, ``ae``, ``ar`` (matching MSA-2), ``stale`` (AA for
    ``stale_id``), ``garbage`` (unframed ``fail``), ``no_msa1`` (an MSA
    segment without fields), ``silent`` (no reply). An empty script means ``aa``.
    """

    def __init__(self, port: int = 0) -> None:
        self.script: list[str] = []
        self.stale_id = "OUT0001"
        self.received: list[tuple[str, str]] = []
        self._server = socket.create_server(("127.0.0.1", port))
        self.port = self._server.getsockname()[1]
        # close() cannot wake a blocked accept(), so accept polls a flag.
        self._server.settimeout(0.05)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        decoder = FrameDecoder(1 << 20)
        with sock:
            while data := sock.recv(65536):
                for payload in decoder.feed(data):
                    self._answer(sock, payload)

    def _answer(self, sock: socket.socket, payload: bytes) -> None:
        control_id = payload.split(b"\r")[0].split(b"|")[9].decode()
        reply = self.script.pop(0) if self.script else "aa"
        self.received.append((control_id, reply))
        header = "MSH|^~\\&|BILLING|HOSP|CAREBRIDGE|HOSP|20240501120001||ACK^P03^ACK|A1|P|2.5"
        bodies = {
            "aa": f"MSA|AA|{control_id}",
            "ae": f"MSA|AE|{control_id}\rERR||FT1^1^7|103^Table value not found^HL70357|E||||unknown charge code",
            "ar": f"MSA|AR|{control_id}\rERR||MSH^1^9|207^Application internal error^HL70357|E||||busy",
            "stale": f"MSA|AA|{self.stale_id}",
            "no_msa1": "MSA",
        }
        if reply == "garbage":
            sock.sendall(b"fail")
        elif reply in bodies:
            sock.sendall(b"\x0b" + f"{header}\r{bodies[reply]}\r".encode() + b"\x1c\r")

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        self._server.close()


@pytest.fixture()
def receiver() -> Iterator[ScriptedReceiver]:
    server = ScriptedReceiver()
    yield server
    server.close()


def mllp_destination(port: int, **options) -> DestinationConfig:
    settings = {
        "host": "127.0.0.1",
        "port": port,
        "ack_timeout_seconds": 0.5,
        "connect_timeout_seconds": 2.0,
        **options.pop("settings", {}),
    }
    defaults = {
        "max_attempts": 10,
        "backoff_base_seconds": 1.0,
        "backoff_cap_seconds": 8.0,
        "circuit_failure_threshold": 100,
        "circuit_cooldown_seconds": 30.0,
        "lease_seconds": 60.0,
        "batch_size": 50,
    }
    return DestinationConfig(
        "billing", "mllp", ("charge_line",), settings, **{**defaults, **options}
    )


def live(config: Configuration, target: DestinationConfig) -> Configuration:
    return dataclasses.replace(config, destinations=(target,))


def enqueue_dft(engine: Engine, number: int, now: dt.datetime = T0) -> tuple[int, str]:
    key = idempotency_key("billing", "charge_line", f"OUT{number:04d}")
    with engine.begin() as conn:
        delivery_id = enqueue(conn, "billing", "charge_line", number, key, dft(number), now=now)
    return delivery_id, control_id_for(key)


def row(engine: Engine, delivery_id: int):
    with engine.connect() as conn:
        return conn.execute(select(deliveries).where(deliveries.c.id == delivery_id)).one()


def one_pass(engine: Engine, config: Configuration, now: dt.datetime):
    return run_deliveries(engine, config, owner="w1", now=now, rng=random.Random(7))


def test_only_matching_ack_delivers(
    engine: Engine, config: Configuration, receiver: ScriptedReceiver
) -> None:
    settings = live(config, mllp_destination(receiver.port))
    first, first_id = enqueue_dft(engine, 1)
    receiver.stale_id = first_id
    # OUT0001: the first send times out, the resend is acknowledged.
    receiver.script = ["silent", "aa"]
    assert one_pass(engine, settings, T0).retried == 1
    assert row(engine, first).state == PENDING
    assert row(engine, first).last_error == "no ACK within 0.5 s"
    assert one_pass(engine, settings, T0 + HOUR).delivered == 1

    second, second_id = enqueue_dft(engine, 2, T0 + HOUR)
    receiver.script = ["stale", "garbage", "no_msa1", "silent", "aa"]
    expected_errors = [
        f"stale ACK: MSA-2 {first_id} does not match MSH-10 {second_id}",
        "no ACK within 0.5 s (4 bytes outside a complete frame)",
        "ACK without MSA-1",
        "no ACK within 0.5 s",
    ]
    for step, error in enumerate(expected_errors, start=2):
        result = one_pass(engine, settings, T0 + step * HOUR)
        assert (result.claimed, result.retried) == (1, 1), error
        assert (row(engine, second).state, row(engine, second).last_error) == (PENDING, error)
    assert one_pass(engine, settings, T0 + 6 * HOUR).delivered == 1

    done_first, done_second = row(engine, first), row(engine, second)
    assert (done_first.state, done_first.attempts) == (DELIVERED, 2)
    assert done_first.response == f"AA MSA-2={first_id} ACK MSH-10=A1"
    delivered_at = done_first.delivered_at.replace(tzinfo=dt.UTC)
    assert T0 + HOUR <= delivered_at < T0 + HOUR + dt.timedelta(seconds=5)
    assert (done_second.state, done_second.attempts) == (DELIVERED, 5)
    assert done_second.response.startswith(f"AA MSA-2={second_id}")
    assert [sent for sent, _ in receiver.received] == [first_id] * 2 + [second_id] * 5


def test_ae_dead_with_err_text(
    engine: Engine, config: Configuration, receiver: ScriptedReceiver
) -> None:
    settings = live(config, mllp_destination(receiver.port))
    delivery_id, control_id = enqueue_dft(engine, 3)
    receiver.script = ["ae"]
    assert one_pass(engine, settings, T0).dead == 1
    dead = row(engine, delivery_id)
    assert (dead.state, dead.attempts) == (DEAD, 1)
    assert dead.last_error == (
        f"AE MSA-2={control_id} ACK MSH-10=A1: "
        "103 Table value not found: unknown charge code"
    )
    assert one_pass(engine, settings, T0 + HOUR).claimed == 0


def test_ar_retried_then_dead_at_ceiling(
    engine: Engine, config: Configuration, receiver: ScriptedReceiver
) -> None:
    settings = live(config, mllp_destination(receiver.port, max_attempts=3))
    delivery_id, _ = enqueue_dft(engine, 4)
    receiver.script = ["ar"] * 3
    assert one_pass(engine, settings, T0).retried == 1
    waiting = row(engine, delivery_id)
    assert waiting.state == PENDING
    assert "207 Application internal error: busy" in waiting.last_error
    assert T0 <= waiting.next_attempt_at.replace(tzinfo=dt.UTC) <= T0 + dt.timedelta(seconds=1)
    assert one_pass(engine, settings, T0 + HOUR).retried == 1
    assert one_pass(engine, settings, T0 + 2 * HOUR).dead == 1
    dead = row(engine, delivery_id)
    assert (dead.state, dead.attempts) == (DEAD, 3)
    assert dead.last_error.startswith("gave up after 3 attempts: AR MSA-2=")
    assert len(receiver.received) == 3


@pytest.mark.parametrize(
    ("actions", "reply", "state", "error_start"),
    [
        ({"AE": "retry"}, "ae", PENDING, "AE MSA-2="),
        ({"AR": "dead"}, "ar", DEAD, "AR MSA-2="),
        ({"AE": "work_item"}, "ae", DEAD, "a person must act (work_item): AE MSA-2="),
    ],
)
def test_ack_actions_override_the_policy(
    engine: Engine,
    config: Configuration,
    receiver: ScriptedReceiver,
    actions: dict,
    reply: str,
    state: str,
    error_start: str,
) -> None:
    target = mllp_destination(receiver.port, settings={"ack_actions": actions})
    delivery_id, _ = enqueue_dft(engine, 5)
    receiver.script = [reply]
    one_pass(engine, live(config, target), T0)
    result = row(engine, delivery_id)
    assert result.state == state
    assert result.last_error.startswith(error_start)


def test_outage_backlog_drains_once_with_one_alert(
    engine: Engine, config: Configuration, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    target = mllp_destination(
        port, circuit_failure_threshold=3, circuit_cooldown_seconds=30.0, max_attempts=8
    )
    settings = live(config, target)
    ids = [enqueue_dft(engine, number)[0] for number in range(10, 16)]
    caplog.set_level(logging.INFO, logger="carebridge")
    now = T0
    for _ in range(4):
        one_pass(engine, settings, now)
        now += dt.timedelta(minutes=5)
    assert {row(engine, i).state for i in ids} == {PENDING}
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["circuit opened: deliveries paused"]

    receiver = ScriptedReceiver(port)
    try:
        for _ in range(10):
            one_pass(engine, settings, now)
            now += dt.timedelta(minutes=5)
            if {row(engine, i).state for i in ids} == {DELIVERED}:
                break
        assert {row(engine, i).state for i in ids} == {DELIVERED}
        sent = [control_id for control_id, _ in receiver.received]
        assert len(sent) == len(set(sent)) == len(ids)
    finally:
        receiver.close()
    assert max(row(engine, i).attempts for i in ids) < target.max_attempts


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[tuple[Engine, int]]:
    receiving = open_engine(sqlite_url(tmp_path / "receiver.db"))
    thread = ListenerThread(receiving, [ListenerConfig(name="billing", port=0)])
    (running,) = thread.start()
    try:
        yield receiving, running.port
    finally:
        thread.stop()
        receiving.dispose()


def test_dft_messages_reach_carebridges_own_listener_once(
    engine: Engine,
    config: Configuration,
    listener: tuple[Engine, int],
    tmp_path: Path,
) -> None:
    receiving, port = listener
    path = tmp_path / "charges.hl7"
    path.write_bytes(
        b"".join(
            hl7(
                f"MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|SRC{n}|P|2.5",
                "EVN|P03|20240501120000",
                f"PID|1||MRN009{n}^^^SENDFAC^MR||TESTPATIENT^IOTA",
                f"PV1|1|O|CLINIC1||||||||||||||||VIS009{n}",
                f"FT1|1|TXN009{n}||20240501|20240501|CG|99213^OFFICE VISIT EST^CPT|||1|135.50&USD",
            )
            for n in range(1, 4)
        )
    )
    store_inputs(engine, split_path(path), source="test")
    process_pending(engine, config, as_of=dt.date(2024, 6, 1))
    target = mllp_destination(port, settings={"ack_timeout_seconds": 10.0})
    settings = live(config, target)
    with engine.begin() as conn:
        line_ids = conn.execute(select(charge_lines.c.id)).scalars().all()
        created = enqueue_charge_lines(conn, settings, line_ids, now=T0)
        assert enqueue_charge_lines(conn, settings, line_ids, now=T0) == created
    assert len(created) == len(line_ids) == 3

    # A lost ACK: the first delivery reaches the listener, but its result is
    # never recorded, as when a worker dies after the send.
    (lost,) = claim(engine, target, owner="w0", now=T0, limit=1)
    assert build_destination(target).send(lost.outbound()).verdict.value == DELIVERED

    result = one_pass(engine, settings, T0 + HOUR)
    assert (result.claimed, result.delivered) == (3, 3)
    resent = row(engine, lost.delivery_id)
    assert (resent.state, resent.attempts) == (DELIVERED, 2)
    expected_id = control_id_for(lost.idempotency_key)
    assert resent.response.startswith(f"AA MSA-2={expected_id}")
    with receiving.connect() as conn:
        stored = conn.execute(
            select(messages.c.dedup_key, messages.c.state).order_by(messages.c.id)
        ).all()
        processed = conn.execute(
            select(func.count()).select_from(messages).where(messages.c.state != "duplicate")
        ).scalar_one()
    keys = [key for key, _ in stored]
    assert processed == 3
    assert len(set(keys)) == 3
    assert keys.count(f"hl7v2|CAREBRIDGE|CAREBRIDGE|{expected_id}") == len(keys) - 2
