"""MLLP clients for the listener tests: a blocking one and an asyncio one."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

from sqlalchemy import Engine

from carebridge.config.model import ListenerConfig
from carebridge.ingest.hl7v2 import Hl7Message, parse_message
from carebridge.ingest.hl7v2.mllp import ListenerThread

END = b"\x1c\r"


def frame(payload: bytes) -> bytes:
    return b"\x0b" + payload + END


def hl7(*segments: str) -> bytes:
    return ("\r".join(segments) + "\r").encode("ascii")


@contextlib.contextmanager
def running_listener(engine: Engine, **settings) -> Iterator[ListenerThread]:
    """Run one listener on a free loopback port for the duration of a test."""
    options = {k: settings.pop(k) for k in ("max_pending", "max_group") if k in settings}
    config = ListenerConfig(name="test", port=0, **settings)
    thread = ListenerThread(engine, [config], **options)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


class Client:
    """A blocking MLLP client that reads ACK frames however they arrive."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_ack(self) -> bytes:
        """Return the next ACK payload; raise TimeoutError if none comes."""
        while END not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the listener")
            self.buffer += chunk
        block, self.buffer = self.buffer.split(END, 1)
        assert block.startswith(b"\x0b"), block[:10]
        return block[1:]

    def nothing_pending(self, wait: float = 0.3) -> bool:
        """Return True if no byte arrives within ``wait`` seconds."""
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(10.0)
        self.buffer += chunk
        return False

    def close(self) -> None:
        self.sock.close()


def exchange(port: int, payload: bytes) -> Hl7Message:
    """Send one message on a new connection and return its parsed ACK."""
    client = Client(port)
    try:
        client.send(frame(payload))
        return ack(client.read_ack())
    finally:
        client.close()


def ack(raw: bytes) -> Hl7Message:
    return parse_message(raw, default_charset="latin-1")


def msa(raw: bytes) -> tuple[str, str]:
    message = ack(raw)
    return str(message.value("MSA-1")), str(message.value("MSA-2"))


async def send_and_wait(
    port: int, payloads: list[bytes], *, pace: float | None = None
) -> list[tuple[bytes, float]]:
    """Send each payload and wait for its ACK before the next (asyncio client).

    Returns each ACK with its latency in seconds. ``pace`` spaces the sends.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    results = []
    try:
        for payload in payloads:
            started = time.perf_counter()
            writer.write(frame(payload))
            block = await reader.readuntil(END)
            results.append((block[1:-2], time.perf_counter() - started))
            if pace:
                await asyncio.sleep(pace)
    finally:
        writer.close()
    return results


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)
