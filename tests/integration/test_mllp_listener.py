"""The MLLP listener over real sockets, on SQLite and PostgreSQL.

Field cases BR-03, BR-07, BR-09, BR-10, BR-11, BR-14 and BR-16 are sent as
a sender would send them; the ACK and what was stored are both checked.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

from carebridge.config.model import Configuration
from carebridge.engine.worker import Worker, WorkerOptions
from carebridge.ingest.hl7v2 import receiver
from carebridge.store.schema import (
    message_bodies,
    messages,
    patients,
    services,
    work_items,
)

from .mllp_helpers import (
    Client,
    ack,
    exchange,
    frame,
    hl7,
    msa,
    running_listener,
    send_and_wait,
    wait_until,
)


def stored(engine: Engine) -> list[tuple]:
    with engine.connect() as conn:
        return list(conn.execute(
            select(messages.c.id, messages.c.state, messages.c.duplicate_of)
            .order_by(messages.c.id)))


def raws(engine: Engine) -> list[bytes]:
    """Return the stored bytes of every message, in arrival order."""
    with engine.connect() as conn:
        return list(conn.execute(
            select(message_bodies.c.raw).order_by(message_bodies.c.message_id)).scalars())


def count(engine: Engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def process(engine: Engine, config: Configuration) -> None:
    Worker(engine, config, WorkerOptions(deliver=False)).run(until_idle=True)


BR03 = hl7(
    "MSH|^~\\&#|SENDAPP|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03^DFT_P03|CTL0003|P|2.7",
    "EVN|P03|20240501120000",
    "PID|1||MRN0003^^^SENDFAC^MR||TESTPATIENT^GAMMA",
    "PV1|1|O|CLINIC1||||||||||||||||VIS0003",
    "FT1|1|TXN0003||20240501|20240501|CG|SUP1001^GAUZE PAD 4X4 \\P\\2 PLY^LOCAL|||2|7.50&USD|3.75&USD",
)


def test_br03_five_encoding_characters_acknowledged(engine: Engine) -> None:
    with running_listener(engine) as thread:
        answer = exchange(thread.listeners[0].port, BR03)
    assert answer.value("MSA-1") == "AA"
    assert answer.value("MSA-2") == "CTL0003"
    assert answer.value("MSH-2") == "^~\\&#"
    assert answer.value("MSH-9.2") == "P03"
    assert raws(engine) == [BR03]


BR07 = (b"MSH|^~\\&|SENDAPP|SENDFAC|RCVAPP|RCVFAC|20240501120000||ADT^A04|CTL0007|P|2.5"
        b"||||||8859/1\r"
        b"EVN|A04|20240501120000\r"
        b"PID|1||MRN0007^^^SENDFAC^MR||MUSTERMANN^BJ\xd6RN||19700101|M|||"
        b"TESTSTRA\xdfE 1^^K\xd6LN^^50667\r")
BR07_NO_CHARSET = BR07.replace(b"|2.5||||||8859/1\r", b"|2.5\r")


def test_br07a_latin1_declared_in_msh18(engine: Engine, config: Configuration) -> None:
    with running_listener(engine) as thread:
        answer = exchange(thread.listeners[0].port, BR07)
    assert (answer.value("MSA-1"), answer.value("MSA-2")) == ("AA", "CTL0007")
    assert answer.value("MSH-18") == "8859/1"
    process(engine, config)
    assert [row[1] for row in stored(engine)] == ["processed"]
    assert raws(engine) == [BR07]


def test_br07b_undeclared_latin1_is_ae_and_kept(engine: Engine, config: Configuration) -> None:
    with running_listener(engine) as thread:
        started = time.monotonic()
        answer = exchange(thread.listeners[0].port, BR07_NO_CHARSET)
        assert time.monotonic() - started < 5
    assert (answer.value("MSA-1"), answer.value("MSA-2")) == ("AE", "CTL0007")
    assert "character set" in answer.value("ERR-8")
    assert "offset 142" in answer.value("ERR-8")
    process(engine, config)
    assert [row[1] for row in stored(engine)] == ["failed"]
    assert raws(engine) == [BR07_NO_CHARSET]
    with engine.connect() as conn:
        assert conn.execute(select(work_items.c.reason)).scalars().all() == ["malformed_input"]
        assert conn.execute(select(func.count()).select_from(patients)).scalar_one() == 0


def test_br07_channel_default_latin1(engine: Engine, config: Configuration) -> None:
    with running_listener(engine, default_charset="8859/1") as thread:
        answer = exchange(thread.listeners[0].port, BR07_NO_CHARSET)
    assert answer.value("MSA-1") == "AA"
    process(engine, config)
    with engine.connect() as conn:
        assert conn.execute(select(messages.c.state)).scalar_one() == "processed"


BR09 = (b"MSH|^~\\&|SENDAPP|SENDFAC|RCVAPP|RCVFAC|20240501120000||ORU^R01|CTL0009|P|2.5\r"
        b"PID|1||MRN0009^^^SENDFAC^MR||TESTPATIENT^IOTA\r"
        b"OBR|1||ACC0009|71045^CHEST XRAY 1 VIEW^CPT\r"
        b"OBX|1|TX|REPORT^Report text||" + b"A" * 70000 + b"||||||F\r")


@pytest.mark.parametrize("size", [1000, 65536])
def test_br09_long_frame_in_chunks(engine: Engine, size: int) -> None:
    data = frame(BR09)
    with running_listener(engine) as thread:
        client = Client(thread.listeners[0].port)
        for start in range(0, len(data) - 2, size):
            client.send(data[start : min(start + size, len(data) - 2)])
        client.send(data[-2:-1])  # 0x1C alone: the frame is not complete yet
        assert client.nothing_pending()
        client.send(data[-1:])
        assert msa(client.read_ack()) == ("AA", "CTL0009")
        client.close()
    assert raws(engine) == [BR09]


def test_br09_short_message_one_byte_per_send(engine: Engine) -> None:
    message = BR09.replace(b"A" * 70000, b"A" * 10)
    data = frame(message)
    with running_listener(engine) as thread:
        client = Client(thread.listeners[0].port)
        for index in range(len(data)):
            client.send(data[index : index + 1])
        assert msa(client.read_ack()) == ("AA", "CTL0009")
        client.close()
    assert raws(engine) == [message]


def test_br09_peer_closes_mid_frame(engine: Engine) -> None:
    with running_listener(engine) as thread:
        client = Client(thread.listeners[0].port)
        client.send(frame(BR09)[:-1])
        client.close()
        wait_until(lambda: thread.listeners[0].stats.open_connections == 0)
    assert stored(engine) == []


BR10_A = hl7(
    "MSH|^~\\&|SENDAPP|SENDFAC|RCVAPP|RCVFAC|20240501120000||ADT^A04|CTL0010A|P|2.5",
    "PID|1||MRN0010^^^SENDFAC^MR||TESTPATIENT^KAPPA",
)
BR10_B = BR10_A.replace(b"ADT^A04|CTL0010A", b"ADT^A08|CTL0010B")
BR10_C = BR10_A.replace(b"ADT^A04|CTL0010A", b"ADT^A08|CTL0010C")


def test_br10_three_messages_two_reads(engine: Engine) -> None:
    read1 = frame(BR10_A) + b"\x00\x00\r\n" + frame(BR10_B) + b"\x0b" + BR10_C[:20]
    read2 = BR10_C[20:] + b"\x1c\r"
    with running_listener(engine) as thread:
        client = Client(thread.listeners[0].port)
        client.send(read1)
        assert msa(client.read_ack()) == ("AA", "CTL0010A")
        assert msa(client.read_ack()) == ("AA", "CTL0010B")
        assert client.nothing_pending()
        client.send(read2)
        assert msa(client.read_ack()) == ("AA", "CTL0010C")
        client.close()
        wait_until(lambda: thread.listeners[0].stats.open_connections == 0)
        assert thread.listeners[0].stats.filler_bytes == 4
    assert raws(engine) == [BR10_A, BR10_B, BR10_C]


BR11_X = hl7(
    "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|CTL0011|P|2.5",
    "EVN|P03|20240501120000",
    "PID|1||MRN0011^^^SENDFAC^MR||TESTPATIENT^THETA",
    "PV1|1|O|CLINIC1||||||||||||||||VIS0011",
    "FT1|1|TXN0011||20240501|20240501|CG|99213^OFFICE VISIT EST^CPT|||1|135.50&USD|135.50&USD",
)
BR11_Y = hl7(
    "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501121500||DFT^P03|CTL0011|P|2.5",
    "EVN|P03|20240501121500",
    "PID|1||MRN0011^^^SENDFAC^MR||TESTPATIENT^THETA",
    "PV1|1|O|CLINIC1||||||||||||||||VIS0011",
    "FT1|1|TXN0012||20240501|20240501|CG|99212^OFFICE VISIT EST^CPT|||1|80.00&USD|80.00&USD",
)


def test_resend_and_control_id_reuse(
    engine: Engine, config: Configuration
) -> None:
    with running_listener(engine) as thread:
        port = thread.listeners[0].port
        lost = Client(port)
        lost.send(frame(BR11_X))
        wait_until(lambda: len(stored(engine)) == 1)
        lost.close()  # the connection drops before the ACK is read
        second = Client(port)
        second.send(frame(BR11_X))
        resent = second.read_ack()
        second.send(frame(BR11_X))
        again = second.read_ack()
        second.send(frame(BR11_Y))
        reused = ack(second.read_ack())
        second.close()
    first_id = stored(engine)[0][0]
    assert msa(resent) == ("AA", "CTL0011")
    assert ack(resent).value("MSH-10") == f"CB{first_id}"
    assert again == resent  # the original ACK, byte for byte
    assert (reused.value("MSA-1"), reused.value("MSA-2")) == ("AE", "CTL0011")
    assert reused.value("ERR-3.1") == "205"
    assert [row[1:] for row in stored(engine)] == [
        ("received", None), ("duplicate", first_id), ("duplicate", first_id),
        ("failed", None)]
    process(engine, config)
    with engine.connect() as conn:
        codes = conn.execute(select(services.c.code)).scalars().all()
        reasons = conn.execute(select(work_items.c.reason)).scalars().all()
    assert codes == ["99213"]
    assert "control_id_reused" in reasons


BR14_A = hl7(
    "MSH|^~\\&|PHARMAPP|SENDFAC|FINAPP|RCVFAC|20240501120000||RDE^O11^RDE_O11|CTL0014A|P|2.5",
    "PID|1||MRN0014^^^SENDFAC^MR||TESTPATIENT^KAPPA",
    "ORC|NW|ORD0014",
)
BR14_B = hl7(
    "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P99|CTL0014B|P|2.5",
    "EVN|P99|20240501120000",
    "PID|1||MRN0014^^^SENDFAC^MR||TESTPATIENT^KAPPA",
)


def test_br14_unsupported_type_and_trigger_rejected(engine: Engine) -> None:
    with running_listener(engine) as thread:
        port = thread.listeners[0].port
        a, b = exchange(port, BR14_A), exchange(port, BR14_B)
    assert a.value("MSH-9") == "ACK"
    assert a.value("MSH-9.2") == "O11"
    assert (a.value("MSA-1"), a.value("MSA-2"), a.value("ERR-3.1")) == ("AR", "CTL0014A", "200")
    assert a.value("ERR-3.3") == "HL70357"
    assert a.value("ERR-4") == "E"
    assert (b.value("MSA-1"), b.value("MSA-2"), b.value("ERR-3.1")) == ("AR", "CTL0014B", "201")
    assert stored(engine) == []
    assert count(engine, work_items) == 0


BR16 = hl7(
    "MSH|^~\\&|RISAPP|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|CTL0016|P|2.5",
    "EVN|P03|20240501120000",
    "PID|1||MRN0016^^^SENDFAC^MR||TESTPATIENT^LAMBDA||19900202|F",
    "PV1|1|O|CLINIC1||||||||||||||||VIS0016",
    "GT1|1||TESTGUARANTOR^MU||9 TEST RD^^TESTVILLE^TS^00002|555-0116|||||SEL^SELF",
    "FT1|1|TXN0016A||20240501|20240501|CG|71045^CHEST XRAY 1 VIEW^CPT|||1|125.00&USD|125.00&USD",
    "FT1|2|TXN0016B||20240501|20240501|CG|A4550^SURGICAL TRAY^HCPCS|||2|39.00&USD|19.50&USD",
)


def test_gt1_before_ft1_captured(
    engine: Engine, config: Configuration
) -> None:
    with running_listener(engine) as thread:
        answer = exchange(thread.listeners[0].port, BR16)
    assert (answer.value("MSA-1"), answer.value("MSA-2")) == ("AA", "CTL0016")
    process(engine, config)
    with engine.connect() as conn:
        rows = conn.execute(
            select(services.c.code, services.c.quantity, services.c.encounter_id)
            .order_by(services.c.id)).all()
    assert [tuple(row) for row in rows] == [
        ("71045", Decimal("1"), "VIS0016"), ("A4550", Decimal("2"), "VIS0016")]


def test_mllp_send_command_line_client(engine: Engine, tmp_path: Path) -> None:
    batch = tmp_path / "batch.hl7"
    batch.write_bytes(frame(BR10_A) + frame(BR10_B) + frame(BR14_A) + frame(BR10_C))
    mllp_send = Path(sys.executable).parent / "mllp_send"
    with running_listener(engine) as thread:
        result = subprocess.run(
            [str(mllp_send), "-p", str(thread.listeners[0].port), "-f", str(batch),
             "127.0.0.1"], capture_output=True, timeout=60, check=True)
    lines = [line for line in result.stdout.split(b"\r") if line.startswith(b"MSA")]
    assert lines == [b"MSA|AA|CTL0010A", b"MSA|AA|CTL0010B", b"MSA|AR|CTL0014A",
                     b"MSA|AA|CTL0010C"]


def message_for(index: int) -> bytes:
    return hl7(
        f"MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||ADT^A04|C{index:06d}|P|2.5",
        f"PID|1||MRN{index % 97:04d}^^^SENDFAC^MR||TESTPATIENT^N{index}",
    )


def test_hundreds_of_concurrent_connections_keep_ack_order(engine: Engine) -> None:
    connections, each = 200, 5

    async def run(port: int) -> list[list[tuple[bytes, float]]]:
        return await asyncio.gather(*(
            send_and_wait(port, [message_for(c * each + i) for i in range(each)])
            for c in range(connections)))

    with running_listener(engine) as thread:
        results = asyncio.run(run(thread.listeners[0].port))
    for c, acks in enumerate(results):
        assert [msa(raw) for raw, _ in acks] == [
            ("AA", f"C{c * each + i:06d}") for i in range(each)]
    assert len(stored(engine)) == connections * each


def test_back_pressure_bounds_pending_messages(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups: list[int] = []
    real = receiver.store_inputs

    def slow_store(engine_, inputs, **kwargs):
        groups.append(len(inputs))
        time.sleep(0.05)
        return real(engine_, inputs, **kwargs)

    monkeypatch.setattr(receiver, "store_inputs", slow_store)
    payloads = [message_for(i) for i in range(60)]
    with running_listener(engine, max_pending=4) as thread:
        client = Client(thread.listeners[0].port)
        client.send(b"".join(frame(p) for p in payloads))  # a pipelining sender
        answers = [msa(client.read_ack()) for _ in payloads]
        client.close()
    assert answers == [("AA", f"C{i:06d}") for i in range(60)]
    assert max(groups) <= 4


def test_no_aa_when_the_commit_fails(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args, **_kwargs):
        raise OperationalError("INSERT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(receiver, "store_inputs", broken)
    with running_listener(engine) as thread:
        port = thread.listeners[0].port
        client = Client(port)
        client.send(frame(BR10_A) + frame(BR10_B))
        refused = [ack(client.read_ack()), ack(client.read_ack())]
        monkeypatch.undo()
        client.send(frame(BR10_A))
        accepted = ack(client.read_ack())
        client.close()
    for answer, control_id in zip(refused, ("CTL0010A", "CTL0010B"), strict=True):
        assert (answer.value("MSA-1"), answer.value("MSA-2")) == ("AR", control_id)
        assert answer.value("ERR-3.1") == "207"
    assert accepted.value("MSA-1") == "AA"
    assert [row[1] for row in stored(engine)] == ["received"]


def test_oversize_frame_closes_only_its_connection(engine: Engine) -> None:
    with running_listener(engine, max_frame_bytes=2048) as thread:
        port = thread.listeners[0].port
        client = Client(port)
        client.send(b"\x0b" + b"A" * 5000)
        with pytest.raises(ConnectionError):
            client.read_ack()
        client.close()
        assert exchange(port, BR10_A).value("MSA-1") == "AA"
        assert thread.listeners[0].stats.oversize == 1


def test_idle_connection_is_closed(engine: Engine) -> None:
    with running_listener(engine, idle_timeout_seconds=0.3) as thread:
        client = Client(thread.listeners[0].port)
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            client.read_ack()
        assert time.monotonic() - started < 5
        client.close()
        assert thread.listeners[0].stats.idle_closed == 1


def test_enhanced_mode_accept_acknowledgements(engine: Engine) -> None:
    always = BR10_A.replace(b"|P|2.5", b"|P|2.5|||AL|NE")
    never = BR10_B.replace(b"|P|2.5", b"|P|2.5|||NE|AL")
    on_error = BR14_A.replace(b"|P|2.5", b"|P|2.5|||ER|NE")
    with running_listener(engine) as thread:
        client = Client(thread.listeners[0].port)
        client.send(frame(always) + frame(never) + frame(on_error))
        assert msa(client.read_ack()) == ("CA", "CTL0010A")
        assert msa(client.read_ack()) == ("CR", "CTL0014A")
        client.close()
    assert len(stored(engine)) == 2
