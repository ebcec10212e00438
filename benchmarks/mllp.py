"""Benchmark the MLLP listener: durable ACKs per second and ACK latency.

The listener runs as its own process on a fresh SQLite database, as
``carebridge serve`` would run it; the senders run in this process over
loopback. Each sender connection waits for every ACK before sending its
next message, as a real interface engine does. A bare baseline is measured
in the same run: python-hl7's own asyncio MLLP server answering ``AA``
without storing anything.

    python benchmarks/mllp.py [--connections 50] [--seconds 10] [--json]
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

# Python puts this folder first on sys.path, where benchmarks/fhir.py would
# hide the fhir package that fhir.resources lives in.
_sys.path[:] = [
    p for p in _sys.path if _Path(p or ".").resolve() != _Path(__file__).resolve().parent
]

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

END = b"\x1c\r"
_COUNTER = itertools.count(1)


def dft_message() -> bytes:
    """A DFT^P03 of realistic size with a fresh control id and transaction id."""
    n = next(_COUNTER)
    return (
        f"MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|B{n:09d}|P|2.5\r"
        f"EVN|P03|20240501120000\r"
        f"PID|1||MRN{n % 5000:05d}^^^SENDFAC^MR||TESTPATIENT^BENCH||19800101|F\r"
        f"PV1|1|O|CLINIC1||||||||||||||||VIS{n % 20000:06d}\r"
        f"FT1|1|TXN{n:09d}||20240501|20240501|CG|99213^OFFICE VISIT EST^CPT|||1|"
        f"135.50&USD|135.50&USD\r"
    ).encode("ascii")


async def _sender(port: int, deadline: float, interval: float | None,
                  latencies: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    next_send = time.perf_counter()
    try:
        while time.perf_counter() < deadline:
            if interval is not None:
                next_send += interval
                delay = next_send - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            started = time.perf_counter()
            writer.write(b"\x0b" + dft_message() + END)
            ack = await reader.readuntil(END)
            latencies.append(time.perf_counter() - started)
            if b"MSA|AA|" not in ack and b"MSA|CA|" not in ack:
                raise RuntimeError("a message was not accepted")
            sent += 1
    finally:
        writer.close()
    return sent


async def drive(port: int, connections: int, seconds: float,
                rate: float | None = None) -> tuple[float, list[float]]:
    """Send for ``seconds`` from ``connections`` senders; ``rate`` paces them all.

    Returns acknowledged messages per second and every ACK latency.
    """
    latencies: list[float] = []
    interval = connections / rate if rate else None
    started = time.perf_counter()
    counts = await asyncio.gather(*(
        _sender(port, started + seconds, interval, latencies) for _ in range(connections)))
    return sum(counts) / (time.perf_counter() - started), latencies


def start(command: list[str]) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening "):
        process.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return process, int(line.rsplit(":", 1)[1])


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


async def _baseline_server() -> None:
    """python-hl7's asyncio MLLP server: parse, create_ack, write; no storage."""
    import hl7
    import hl7.mllp

    async def serve(reader, writer) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                writer.writemessage(message.create_ack())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await hl7.mllp.start_hl7_server(serve, "127.0.0.1", 0)
    print(f"listening 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def measure(command: list[str], args: argparse.Namespace) -> tuple[float, list[float]]:
    process, port = start(command)
    try:
        asyncio.run(drive(port, args.connections, 1.0))  # warm up
        return asyncio.run(drive(port, args.connections, args.seconds))
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="offered msgs/s for the latency run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        asyncio.run(_baseline_server())
        return
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'bench.db'}"
        listener = [sys.executable, "-m", "carebridge.ingest.hl7v2.mllp",
                    "--db", url, "--port", "0"]
        durable, durable_latencies = measure(listener, args)
        process, port = start(listener)
        try:
            _, paced = asyncio.run(drive(port, args.connections, args.seconds, args.rate))
        finally:
            stop(process)
    baseline, _ = measure([sys.executable, __file__, "--baseline-server"], args)
    result = {
        "durable_msgs_per_s": round(durable, 1),
        "baseline_msgs_per_s": round(baseline, 1),
        "p50_ms_at_1000": round(statistics.median(paced) * 1000, 2),
        "p99_ms_at_1000": round(percentile(paced, 0.99) * 1000, 2),
        "p99_ms_at_full_load": round(percentile(durable_latencies, 0.99) * 1000, 2),
        "connections": args.connections,
        "seconds": args.seconds,
        "offered_rate": args.rate,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"durable (SQLite, {args.connections} connections): "
          f"{result['durable_msgs_per_s']:.0f} acknowledged msgs/s, "
          f"p99 {result['p99_ms_at_full_load']} ms")
    print(f"baseline (python-hl7 server, no storage): {result['baseline_msgs_per_s']:.0f} msgs/s")
    print(f"at {args.rate:.0f} msgs/s offered: ACK latency p50 "
          f"{result['p50_ms_at_1000']} ms, p99 {result['p99_ms_at_1000']} ms")


if __name__ == "__main__":
    main()
