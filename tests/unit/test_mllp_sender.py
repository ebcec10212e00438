"""The MLLP destination on its own: settings, MSH-10, ACK reading and split reads."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pydantic import ValidationError

import carebridge.config  # noqa: F401 - loads the registry's dependencies first
from carebridge.destinations.mllp import (
    AckAction,
    MllpDestination,
    MllpSettings,
    UnreadableAck,
    control_id_for,
    message_bytes,
    read_ack,
)
from carebridge.destinations.registry import Outbound, Verdict, validate_settings

KEY = "carebridge:billing:charge_line:svc-1"
MESSAGE = (
    "MSH|^~\\&|CAREBRIDGE|HOSP|BILLING|HOSP|20240501120000||DFT^P03^DFT_P03|CL1|P|2.5\r"
    "EVN|P03|20240501120000\r"
    "PID|1||MRN0001^^^^MR\r"
    "FT1|1|1||20240501|20240501120000|CG|100^^CDM||1|12.50&USD\r"
)


def ack(code: str, acknowledged: str, *extra: str) -> bytes:
    segments = [
        "MSH|^~\\&|BILLING|HOSP|CAREBRIDGE|HOSP|20240501120001||ACK^P03^ACK|ACK1|P|2.5",
        f"MSA|{code}|{acknowledged}",
        *extra,
    ]
    return ("\r".join(segments) + "\r").encode("ascii")


def outbound(payload: str = MESSAGE, key: str = KEY) -> Outbound:
    return Outbound(1, "billing", "charge_line", key, payload, 1)


# ------------------------------------------------------------------ settings


def test_settings_default_nak_policy() -> None:
    settings = MllpSettings(host="127.0.0.1", port=2575)
    assert settings.ack_timeout_seconds == 30.0
    assert settings.ack_actions == {"AE": AckAction.DEAD, "AR": AckAction.RETRY}
    assert settings.action("CE") is AckAction.DEAD
    assert settings.action("CR") is AckAction.RETRY


def test_ack_actions_partial_keeps_defaults() -> None:
    settings = MllpSettings(host="h", port=1, ack_actions={"AE": "work_item"})
    assert settings.ack_actions == {"AE": AckAction.WORK_ITEM, "AR": AckAction.RETRY}


@pytest.mark.parametrize(
    "settings",
    [
        {"host": "h", "port": 0},
        {"host": "h", "port": 1, "ack_actions": {"AA": "retry"}},
        {"host": "h", "port": 1, "ack_actions": {"AE": "ignore"}},
        {"host": "h", "port": 1, "tls_ca_file": "/ca.pem"},
        {"host": "h", "port": 1, "tls_verify": False},
        {"host": "h", "port": 1, "tls": True, "tls_key_file": "/k.pem"},
        {"host": "h", "port": 1, "default_charset": "NO SUCH CHARSET"},
        {"host": "h", "port": 1, "control_id_prefix": "A-B"},
        {"host": "h", "port": 1, "url": "mllp://h"},
    ],
)
def test_invalid_settings_are_rejected(settings: dict) -> None:
    with pytest.raises(ValidationError):
        validate_settings("mllp", settings)


# ------------------------------------------------------------- control id


def test_control_id_fixed_per_key() -> None:
    first = control_id_for(KEY)
    assert first == control_id_for(KEY)
    assert first != control_id_for(KEY + "x")
    assert len(first) == 20
    assert first.startswith("CB")
    assert first.isalnum()
    assert control_id_for(KEY, "") != first
    assert len(control_id_for(KEY, "")) == 20


def test_message_bytes_sets_msh10_and_cr_terminators() -> None:
    sent = message_bytes(MESSAGE.replace("\r", "\n"), "CBX1", "UNICODE UTF-8")
    header = sent.split(b"\r")[0].split(b"|")
    assert header[9] == b"CBX1"
    assert b"\n" not in sent
    assert sent.endswith(b"\r")
    assert sent.count(b"\r") == 4


def test_message_bytes_pads_a_short_header() -> None:
    sent = message_bytes("MSH|^~\\&|A|B\rPID|1\r", "CBX2", "ASCII")
    assert sent.split(b"\r")[0] == b"MSH|^~\\&|A|B||||||CBX2"


def test_message_bytes_follows_msh18() -> None:
    text = MESSAGE.replace("|2.5\r", "|2.5||||||8859/1\r", 1).replace("MRN0001", "M\u00fcller")
    assert "M\u00fcller".encode("latin-1") in message_bytes(text, "C", "ASCII")
    with pytest.raises(ValueError, match="cannot be encoded"):
        message_bytes(MESSAGE.replace("MRN0001", "\u4e2d"), "C", "ASCII")


def test_send_non_hl7_payload_is_dead() -> None:
    destination = MllpDestination("billing", MllpSettings(host="127.0.0.1", port=9))
    result = destination.send(outbound('{"journal": 1}'))
    assert result.verdict is Verdict.DEAD
    assert "no MSH segment" in result.detail


# ------------------------------------------------------------------ ACK reading


def test_read_ack_reads_msa_and_err_text() -> None:
    reply = read_ack(
        ack(
            "AE",
            "CB1",
            "ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3 is empty",
        )
    )
    assert (reply.code, reply.acknowledged_id, reply.control_id) == ("AE", "CB1", "ACK1")
    assert reply.errors == ("101 Required field missing: PID-3 is empty",)


def test_read_ack_reads_v23_err1_and_msa3() -> None:
    reply = read_ack(ack("AR", "CB1", "ERR|PID^1^3^101&Required field missing").replace(
        b"MSA|AR|CB1", b"MSA|AR|CB1|try later"
    ))
    assert reply.errors == ("try later", "101 Required field missing")


@pytest.mark.parametrize("frame", [b"fail", b"", b"MSA|AA|CB1\r", b"MSH|^~\\&|A\rPID|1\r"])
def test_replies_without_msh_or_msa_are_unreadable(frame: bytes) -> None:
    with pytest.raises(UnreadableAck):
        read_ack(frame)


def test_read_ack_msa_without_msa1() -> None:
    reply = read_ack(b"MSH|^~\\&|A|B|C|D|20240501||ACK|X|P|2.5\rMSA\r")
    assert reply.code == ""
    assert reply.acknowledged_id == ""


@pytest.mark.parametrize(
    ("frame", "verdict", "text"),
    [
        (ack("AA", "{id}"), Verdict.DELIVERED, "AA MSA-2={id} ACK MSH-10=ACK1"),
        (ack("CA", "{id}"), Verdict.DELIVERED, "CA MSA-2={id}"),
        (ack("AA", "OUT0001"), Verdict.RETRY, "stale ACK: MSA-2 OUT0001"),
        (ack("AA", ""), Verdict.RETRY, "stale ACK: MSA-2 (empty)"),
        (ack("", "{id}"), Verdict.RETRY, "ACK without MSA-1"),
        (b"fail", Verdict.RETRY, "unreadable reply"),
        (ack("XX", "{id}"), Verdict.RETRY, "unknown MSA-1 'XX'"),
        (ack("AE", "{id}", "ERR||||E||||bad FT1"), Verdict.DEAD, "AE MSA-2={id}"),
        (ack("CE", "{id}"), Verdict.DEAD, "CE MSA-2={id}"),
        (ack("AR", "{id}"), Verdict.RETRY, "AR MSA-2={id}"),
        (ack("CR", "{id}"), Verdict.RETRY, "CR MSA-2={id}"),
    ],
)
def test_judge_matches_msa2_to_msh10(frame: bytes, verdict: Verdict, text: str) -> None:
    destination = MllpDestination("billing", MllpSettings(host="h", port=1))
    control_id = control_id_for(KEY)
    result = destination.judge(outbound(), control_id, frame.replace(b"{id}", control_id.encode()))
    assert result.verdict is verdict
    assert text.replace("{id}", control_id) in result.detail


def test_judge_work_item_action_is_dead() -> None:
    settings = MllpSettings(host="h", port=1, ack_actions={"AE": "work_item", "AR": "dead"})
    destination = MllpDestination("billing", settings)
    control_id = control_id_for(KEY)
    result = destination.judge(
        outbound(), control_id, ack("AE", control_id, "ERR||||E||||unknown charge code")
    )
    assert result.verdict is Verdict.DEAD
    assert result.detail.startswith("a person must act")
    assert "unknown charge code" in result.detail
    assert destination.judge(outbound(), control_id, ack("AR", control_id)).verdict is Verdict.DEAD


# ------------------------------------------------------ split reads


class OneShotServer:
    """Accepts one connection, reads one frame, then runs ``reply(sock, payload)``."""

    def __init__(self, reply: Callable[[socket.socket, bytes], None]) -> None:
        self.reply = reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        sock, _ = self.listener.accept()
        with sock:
            buffer = b""
            while b"\x1c\r" not in buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            payload = buffer[1 : buffer.index(b"\x1c\r")]
            self.received.append(payload)
            self.reply(sock, payload)
            # Hold the connection so that only the reply can end the exchange.
            sock.settimeout(5)
            try:
                sock.recv(1)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.fixture()
def serve() -> Iterator[Callable[..., OneShotServer]]:
    servers: list[OneShotServer] = []

    def start(reply: Callable[[socket.socket, bytes], None]) -> OneShotServer:
        servers.append(OneShotServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _control_id(payload: bytes) -> str:
    return payload.split(b"\r")[0].split(b"|")[9].decode()


def _in_pieces(*pieces: bytes, pause: float = 0.15) -> Callable[[socket.socket, bytes], None]:
    def reply(sock: socket.socket, payload: bytes) -> None:
        body = _control_id(payload).encode()
        for piece in pieces:
            time.sleep(pause)
            sock.sendall(piece.replace(b"{id}", body))

    return reply


def test_send_ack_split_over_four_reads(serve) -> None:
    body = ack("AA", "{id}")
    server = serve(_in_pieces(b"\x0b", body, b"\x1c", b"\r"))
    destination = MllpDestination(
        "billing", MllpSettings(host="127.0.0.1", port=server.port, ack_timeout_seconds=5)
    )
    started = time.monotonic()
    result = destination.send(outbound())
    elapsed = time.monotonic() - started
    assert result.verdict is Verdict.DELIVERED, result.detail
    assert result.detail.startswith("AA MSA-2=" + control_id_for(KEY))
    # Four pieces 0.15 s apart: returning sooner means the trailer was not awaited.
    assert elapsed >= 0.55
    assert _control_id(server.received[0]) == control_id_for(KEY)


def test_send_frame_without_final_cr_times_out(serve) -> None:
    server = serve(_in_pieces(b"\x0b" + ack("AA", "{id}") + b"\x1c", pause=0))
    destination = MllpDestination(
        "billing", MllpSettings(host="127.0.0.1", port=server.port, ack_timeout_seconds=0.5)
    )
    started = time.monotonic()
    result = destination.send(outbound())
    assert time.monotonic() - started >= 0.5
    assert result.verdict is Verdict.RETRY
    assert result.detail.startswith("no ACK within 0.5 s")
    assert "bytes outside a complete frame" in result.detail


def test_send_unframed_garbage_is_retried(serve) -> None:
    def garbage(sock: socket.socket, payload: bytes) -> None:
        sock.sendall(b"fail")
        sock.shutdown(socket.SHUT_WR)

    server = serve(garbage)
    destination = MllpDestination(
        "billing", MllpSettings(host="127.0.0.1", port=server.port, ack_timeout_seconds=5)
    )
    result = destination.send(outbound())
    assert result.verdict is Verdict.RETRY
    assert result.detail == (
        "connection closed before a complete ACK (4 bytes outside a complete frame)"
    )


def test_send_refused_connection_is_retried() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    destination = MllpDestination("billing", MllpSettings(host="127.0.0.1", port=port))
    result = destination.send(outbound())
    assert result.verdict is Verdict.RETRY
    assert "ConnectionRefusedError" in result.detail
