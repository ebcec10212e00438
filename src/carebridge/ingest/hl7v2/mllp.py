"""MLLP listener: HL7 v2 over TCP, acknowledged only after the commit.

A frame is ``0x0B`` payload ``0x1C 0x0D`` (HL7 v2.5 appendix C, MLLP release
1). Frames are found on raw bytes, before any decoding, whatever the TCP
reads look like: a frame split over many reads, several frames in one read,
filler between frames. Each payload goes to a shared
:class:`~carebridge.ingest.hl7v2.receiver.GroupCommitter`; a connection's
ACKs are written in the order its frames arrived.

Run one listener on its own (tests, benchmarks)::

    python -m carebridge.ingest.hl7v2.mllp --db sqlite:///carebridge.db --port 2575

``carebridge serve`` starts the listeners of carebridge.yaml through
:class:`ListenerThread`.

NOTE: on a shared 2-core machine with SQLite, benchmarks/mllp.py measured
5,600 to 5,800 durable messages/s (50 connections), close to the 5,000
target. The event loop now costs more CPU per message than intake does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine

from carebridge.config.model import ListenerConfig
from carebridge.ingest.hl7v2.receiver import GroupCommitter, ListenerPolicy

log = logging.getLogger(__name__)

START_BLOCK = 0x0B
END_BLOCK = b"\x1c\x0d"
_FILLER = b" \t\r\n\x00"
_READ_SIZE = 65536
_WRITE_HIGH_WATER = 256 * 1024


class FrameTooLarge(Exception):
    """A frame grew beyond the listener's ``max_frame_bytes``."""


@dataclass(slots=True)
class FrameDecoder:
    """Cut MLLP frames out of a byte stream; nothing is decoded here.

    Bytes outside frames are dropped and counted: ``filler_bytes`` for
    whitespace and NUL (seen between frames in the wild), ``stray_bytes``
    for anything else, ``broken_frames`` for a start block that a second
    start block interrupted before its end block.
    """

    max_frame_bytes: int
    filler_bytes: int = 0
    stray_bytes: int = 0
    broken_frames: int = 0
    _buffer: bytearray = field(default_factory=bytearray)
    _in_frame: bool = False
    _scanned: int = 0

    @property
    def partial_bytes(self) -> int:
        """Bytes of a frame started but not finished."""
        return len(self._buffer) if self._in_frame else 0

    def feed(self, data: bytes) -> list[bytes]:
        """Add one read's bytes and return the payloads it completed, in order.

        Raises:
            FrameTooLarge: the frame in progress exceeds ``max_frame_bytes``.
        """
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        while buffer:
            if not self._in_frame and not self._open_frame():
                break
            # Resume where the last read stopped; one byte back in case the
            # read ended between 0x1C and 0x0D.
            start = max(self._scanned - 1, 0)
            end = buffer.find(END_BLOCK, start)
            restart = buffer.find(START_BLOCK, start, len(buffer) if end < 0 else end)
            if restart >= 0:
                self.broken_frames += 1
                del buffer[:restart]
                self._in_frame, self._scanned = False, 0
                continue
            if end < 0:
                self._scanned = len(buffer)
                if len(buffer) > self.max_frame_bytes:
                    raise FrameTooLarge(len(buffer))
                break
            if end > self.max_frame_bytes:
                raise FrameTooLarge(end)
            frames.append(bytes(buffer[:end]))
            del buffer[: end + len(END_BLOCK)]
            self._in_frame, self._scanned = False, 0
        return frames

    def _open_frame(self) -> bool:
        """Drop bytes before the next start block; return whether one was found."""
        buffer = self._buffer
        begin = buffer.find(START_BLOCK)
        gap = buffer if begin < 0 else buffer[:begin]
        if gap:
            if gap.strip(_FILLER):
                self.stray_bytes += len(gap)
            else:
                self.filler_bytes += len(gap)
        if begin < 0:
            buffer.clear()
            return False
        del buffer[: begin + 1]
        self._in_frame, self._scanned = True, 0
        return True


@dataclass(slots=True)
class ListenerStats:
    """Counts of one listener since it started."""

    connections: int = 0
    open_connections: int = 0
    frames: int = 0
    filler_bytes: int = 0
    stray_bytes: int = 0
    broken_frames: int = 0
    oversize: int = 0
    idle_closed: int = 0


class MllpListener:
    """One listening socket and its connections.

    Args:
        config: The listener's settings.
        committer: Stores frames and gives back their ACKs.
    """

    def __init__(self, config: ListenerConfig, committer: GroupCommitter) -> None:
        self.config = config
        self.policy = ListenerPolicy(config)
        self.committer = committer
        self.stats = ListenerStats()
        self._server: asyncio.Server | None = None
        self._activity: dict[asyncio.StreamWriter, float] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when the configuration asked for port 0)."""
        assert self._server is not None, "listener not started"
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Bind the socket and start accepting connections."""
        self._server = await asyncio.start_server(
            self._handle, self.config.host, self.config.port,
            ssl=_tls_context(self.config), limit=_READ_SIZE * 2,
        )
        self._sweeper = asyncio.create_task(self._sweep_idle())
        log.info("MLLP listener started", extra={
            "action": "mllp_listen", "listener": self.config.name,
            "host": self.config.host, "port": self.port, "tls": bool(self.config.tls_cert)})

    async def close(self) -> None:
        """Stop accepting, close every connection, wait for their handlers."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        # Cancelling a handler stops its reading only: its finally block
        # still writes the ACKs of frames already queued, then closes.
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=30)
        log.info("MLLP listener stopped", extra={
            "action": "mllp_stopped", "listener": self.config.name,
            "connections": self.stats.connections, "frames": self.stats.frames})

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection: read frames, queue them, write ACKs in order."""
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        peer = _peer(writer)
        self.stats.connections += 1
        self.stats.open_connections += 1
        self._activity[writer] = asyncio.get_running_loop().time()
        log.info("MLLP connection opened", extra={
            "action": "mllp_open", "listener": self.config.name, "peer": peer})
        acks: asyncio.Queue[asyncio.Future[bytes | None] | None] = asyncio.Queue()
        ack_writer = asyncio.create_task(self._write_acks(writer, acks, peer))
        decoder = FrameDecoder(self.config.max_frame_bytes)
        try:
            await self._read_frames(reader, writer, decoder, acks, peer)
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            log.info("MLLP connection error", extra={
                "action": "mllp_conn_error", "listener": self.config.name, "peer": peer,
                "error_type": type(exc).__name__})
        finally:
            acks.put_nowait(None)
            await _finish(ack_writer)
            self._close(writer, decoder, peer)
            self._handlers.discard(task)

    async def _read_frames(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: FrameDecoder,
        acks: asyncio.Queue[asyncio.Future[bytes | None] | None],
        peer: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        while data := await reader.read(_READ_SIZE):
            self._activity[writer] = loop.time()
            try:
                frames = decoder.feed(data)
            except FrameTooLarge as exc:
                self.stats.oversize += 1
                log.error("MLLP frame too large; connection closed", extra={
                    "action": "mllp_oversize", "listener": self.config.name, "peer": peer,
                    "bytes": exc.args[0], "max_frame_bytes": self.config.max_frame_bytes})
                return
            for payload in frames:
                self.stats.frames += 1
                # Waits while too many messages are unacknowledged; reading
                # stops meanwhile, so TCP flow control slows the senders.
                acks.put_nowait(await self.committer.submit(payload, self.policy, peer))

    async def _write_acks(
        self,
        writer: asyncio.StreamWriter,
        acks: asyncio.Queue[asyncio.Future[bytes | None] | None],
        peer: str,
    ) -> None:
        """Write each ACK once its message's commit settled, in arrival order."""
        broken = False
        while (future := await acks.get()) is not None:
            ack = await future
            if ack is None or broken or writer.is_closing():
                continue
            try:
                writer.write(b"\x0b" + ack + END_BLOCK)
                if writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                    await writer.drain()
            except (ConnectionError, OSError) as exc:
                broken = True
                log.info("MLLP ACK not delivered", extra={
                    "action": "mllp_ack_lost", "listener": self.config.name, "peer": peer,
                    "error_type": type(exc).__name__})

    def _close(self, writer: asyncio.StreamWriter, decoder: FrameDecoder, peer: str) -> None:
        self._activity.pop(writer, None)
        self.stats.open_connections -= 1
        self.stats.filler_bytes += decoder.filler_bytes
        self.stats.stray_bytes += decoder.stray_bytes
        self.stats.broken_frames += decoder.broken_frames
        extra = {"listener": self.config.name, "peer": peer}
        if decoder.stray_bytes or decoder.broken_frames or decoder.partial_bytes:
            log.warning("MLLP bytes outside complete frames discarded", extra={
                "action": "mllp_discarded", **extra, "stray_bytes": decoder.stray_bytes,
                "broken_frames": decoder.broken_frames,
                "unterminated_bytes": decoder.partial_bytes})
        if decoder.filler_bytes:
            log.info("MLLP filler between frames skipped", extra={
                "action": "mllp_filler", **extra, "bytes": decoder.filler_bytes})
        writer.close()
        log.info("MLLP connection closed", extra={"action": "mllp_close", **extra})

    async def _sweep_idle(self) -> None:
        """Close connections that sent nothing for ``idle_timeout_seconds``."""
        timeout = self.config.idle_timeout_seconds
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = loop.time()
            for writer, last in list(self._activity.items()):
                if now - last > timeout and not writer.is_closing():
                    self.stats.idle_closed += 1
                    log.info("MLLP connection idle; closed", extra={
                        "action": "mllp_idle", "listener": self.config.name,
                        "peer": _peer(writer), "idle_seconds": timeout})
                    writer.close()


async def _finish(ack_writer: asyncio.Task[None]) -> None:
    """Wait for the ACK writer even if the handler is cancelled meanwhile."""
    while not ack_writer.done():
        try:
            await asyncio.shield(ack_writer)
        except asyncio.CancelledError:
            # A stop cancels handlers to end their reading; the ACKs of
            # frames already committed must still be written.
            continue


def _peer(writer: asyncio.StreamWriter) -> str:
    address = writer.get_extra_info("peername")
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _tls_context(config: ListenerConfig) -> ssl.SSLContext | None:
    # NOTE: no test covers a TLS connection yet; only the plain TCP path runs.
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


async def run_listeners(
    engine: Engine,
    listeners: Sequence[ListenerConfig],
    stop_event: asyncio.Event,
    *,
    started: asyncio.Future[list[MllpListener]] | None = None,
    max_group: int = 500,
    max_pending: int = 5000,
) -> list[MllpListener]:
    """Run the enabled listeners until ``stop_event`` is set.

    On stop, the sockets close first, then every queued message is committed
    and answered before this returns, so a stop loses no received frame.

    Args:
        engine: The carebridge database.
        listeners: Listener settings; disabled ones are skipped.
        stop_event: Set it to stop.
        started: Resolved with the running listeners once all are bound, or
            with the bind error.
        max_group: Maximum number of messages per commit.
        max_pending: Maximum number of unacknowledged messages before reading pauses.

    Returns:
        The listeners, with their counts.
    """
    committer = GroupCommitter(engine, max_group=max_group, max_pending=max_pending)
    # The storer outlives the sockets: handlers that are closing still wait
    # for the commits of frames they queued.
    storer_stop = asyncio.Event()
    storer = asyncio.create_task(committer.run(storer_stop))
    running: list[MllpListener] = []
    try:
        for config in listeners:
            if config.enabled:
                listener = MllpListener(config, committer)
                await listener.start()
                running.append(listener)
    except BaseException as exc:
        stop_event.set()
        if started is not None and not started.done():
            started.set_exception(exc)
        for listener in running:
            await listener.close()
        storer_stop.set()
        await storer
        raise
    if started is not None and not started.done():
        started.set_result(running)
    await stop_event.wait()
    await asyncio.gather(*(listener.close() for listener in running))
    storer_stop.set()
    await storer
    return running


class ListenerThread:
    """Runs :func:`run_listeners` on its own event loop in a daemon thread.

    For a synchronous host such as the worker loop of ``carebridge serve``::

        listeners = ListenerThread(engine, config.listeners)
        listeners.start()          # raises if a port cannot be bound
        try:
            worker.run()
        finally:
            listeners.stop()
    """

    def __init__(self, engine: Engine, listeners: Sequence[ListenerConfig], **options: int):
        self.engine = engine
        self.configs = tuple(listeners)
        self.options = options
        self.listeners: list[MllpListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> list[MllpListener]:
        """Start the thread and wait until every enabled listener is bound."""
        self._thread = threading.Thread(target=self._main, name="mllp", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("MLLP listeners did not start in time")
        if self._error is not None:
            raise self._error
        return self.listeners

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting, answer what is queued, and join the thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        started: asyncio.Future[list[MllpListener]] = self._loop.create_future()
        task = asyncio.create_task(
            run_listeners(self.engine, self.configs, self._stop, started=started, **self.options)
        )
        try:
            self.listeners = await started
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
        self._ready.set()
        try:
            await task
        except Exception as exc:  # noqa: BLE001 - already reported through started
            log.error("MLLP listeners stopped on error", extra={
                "action": "mllp_failed", "error_type": type(exc).__name__})


def main(argv: Sequence[str] | None = None) -> int:
    """Run one listener until SIGTERM or SIGINT (``python -m`` entry point)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--db", required=True, help="SQLAlchemy URL of the database")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--name", default="mllp")
    parser.add_argument("--default-charset", default="UNICODE UTF-8")
    parser.add_argument("--max-frame-bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--idle-timeout", type=float, default=600.0)
    parser.add_argument("--processing-ids", default="P", help="comma separated, e.g. P,T")
    parser.add_argument("--max-pending", type=int, default=5000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # The storer thread holds the GIL while SQLAlchemy builds a group; a
    # short switch interval lets the event loop answer sockets in between.
    sys.setswitchinterval(0.0005)
    from carebridge.store.db import open_engine

    engine = open_engine(args.db)
    config = ListenerConfig(
        name=args.name, host=args.host, port=args.port,
        default_charset=args.default_charset, max_frame_bytes=args.max_frame_bytes,
        idle_timeout_seconds=args.idle_timeout,
        processing_ids=tuple(args.processing_ids.split(",")),
    )
    asyncio.run(_serve_until_signal(engine, config, args.max_pending))
    return 0


async def _serve_until_signal(engine: Engine, config: ListenerConfig, max_pending: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    started: asyncio.Future[list[MllpListener]] = loop.create_future()
    task = asyncio.create_task(
        run_listeners(engine, [config], stop, started=started, max_pending=max_pending)
    )
    listeners = await started
    # Tests and scripts wait for this line to learn the bound port.
    print(f"listening {config.host}:{listeners[0].port}", flush=True)
    await task


if __name__ == "__main__":
    raise SystemExit(main())
