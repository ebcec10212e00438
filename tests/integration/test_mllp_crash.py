"""Contract: an ``AA`` survives ``kill -9`` of the listener process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from carebridge.store.db import open_engine, sqlite_url
from carebridge.store.schema import messages

from .mllp_helpers import END, frame, hl7, msa


def start_listener(url: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "carebridge.ingest.hl7v2.mllp", "--db", url, "--port", "0"],
        stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("listening "), line
    return process, int(line.rsplit(":", 1)[1])


def message(sender: int, number: int) -> bytes:
    return hl7(
        f"MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||ADT^A04|K{sender}-{number}|P|2.5",
        f"PID|1||MRN{sender:04d}^^^SENDFAC^MR||TESTPATIENT^CRASH",
    )


async def send_until_killed(port: int, process: subprocess.Popen[str], target: int) -> set[str]:
    """Send from 20 connections; kill the listener once ``target`` AAs arrived."""
    acknowledged: set[str] = set()

    async def sender(number: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for sequence in range(100_000):
                writer.write(frame(message(number, sequence)))
                block = await reader.readuntil(END)
                code, control_id = msa(block[1:-2])
                assert code == "AA"
                acknowledged.add(control_id)
                if len(acknowledged) >= target and process.poll() is None:
                    os.kill(process.pid, signal.SIGKILL)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    await asyncio.gather(*(sender(n) for n in range(20)))
    return acknowledged


def test_kill_nine_loses_no_acknowledged_message(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "crash.db")
    open_engine(url).dispose()  # migrate before the listener starts
    process, port = start_listener(url)
    try:
        acknowledged = asyncio.run(send_until_killed(port, process, target=500))
    finally:
        process.kill()
        process.wait(10)
    assert process.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 500
    engine = open_engine(url)
    with engine.connect() as conn:
        keys = set(conn.execute(select(messages.c.dedup_key)).scalars())
    stored_ids = {key.rsplit("|", 1)[1] for key in keys}
    assert acknowledged <= stored_ids
    # After a restart, a resend of an acknowledged message is a duplicate.
    process, port = start_listener(url)
    try:
        resent = next(iter(acknowledged))
        sender, number = resent[1:].split("-")

        async def resend() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(frame(message(int(sender), int(number))))
            block = await reader.readuntil(END)
            writer.close()
            return block[1:-2]

        assert msa(asyncio.run(resend())) == ("AA", resent)
    finally:
        process.terminate()
        process.wait(10)
    with engine.connect() as conn:
        assert conn.execute(
            select(messages.c.state).order_by(messages.c.id.desc()).limit(1)
        ).scalar_one() == "duplicate"
