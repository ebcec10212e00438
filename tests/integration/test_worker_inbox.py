"""The worker loop and the serve inbox: durable before a file is moved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from carebridge.config.model import Configuration
from carebridge.engine import worker as worker_module
from carebridge.engine.worker import Worker, WorkerOptions
from carebridge.store.schema import charge_lines, journals, messages

from .conftest import DEMO, hl7

DFT = hl7(
    "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|CTL0900|P|2.5",
    "EVN|P03|20240501120000",
    "PID|1||MRN0900^^^SENDFAC^MR||TESTPATIENT^NU",
    "PV1|1|O|CLINIC1||||||||||||||||VIS0900",
    "FT1|1|TXN0900||20240501|20240501|CG|99213^OFFICE VISIT EST^CPT|||1|135.50&USD|135.50&USD",
)


def drop(inbox: Path, name: str, data: bytes) -> Path:
    inbox.mkdir(parents=True, exist_ok=True)
    path = inbox / name
    path.write_bytes(data)
    old = time.time() - 10  # older than the settle time, so it counts as complete
    os.utime(path, (old, old))
    return path


def count(engine: Engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_inbox_file_processed_and_moved(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, "charge.hl7", DFT)
    stats = Worker(engine, config, WorkerOptions(inbox=inbox, idle_seconds=0.05)).run(
        until_idle=True
    )
    assert stats.files == 1
    assert not (inbox / "charge.hl7").exists()
    assert len(list((inbox / "done").iterdir())) == 1
    assert count(engine, charge_lines) == 1
    assert count(engine, journals) == 1


def test_file_stays_when_store_fails(
    engine: Engine, config: Configuration, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox, "charge.hl7", DFT)

    def broken_store(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(worker_module, "store_inputs", broken_store)
    with pytest.raises(RuntimeError):
        Worker(engine, config, WorkerOptions(inbox=inbox)).step()
    assert (inbox / "charge.hl7").exists()
    assert count(engine, messages) == 0


def test_file_still_written_is_left(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "growing.hl7").write_bytes(DFT)  # modified just now
    Worker(engine, config, WorkerOptions(inbox=inbox)).step()
    assert (inbox / "growing.hl7").exists()
    assert count(engine, messages) == 0


def test_serve_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    database = tmp_path / "serve.db"
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "carebridge.cli", "-vv", "serve", "--inbox", str(inbox),
             "--db", f"sqlite:///{database}"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
        try:
            drop(inbox, "charge.hl7", DFT)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (inbox / "charge.hl7").exists():
                time.sleep(0.2)
            assert not (inbox / "charge.hl7").exists(), log_path.read_text()
            time.sleep(1.0)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
    text = log_path.read_text()
    assert "worker started" in text
    assert "signal received" in text
    assert "worker stopped" in text
    assert "Traceback" not in text
    import sqlite3

    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM charge_lines").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM messages WHERE state = 'received'"
                            ).fetchone()[0] == 0


def test_demo_data_through_worker(engine: Engine, config: Configuration) -> None:
    from carebridge.engine.intake import store_inputs
    from carebridge.ingest.files.sources import discover, split_path

    for path in discover([DEMO / "data" / "hl7v2"]).files:
        store_inputs(engine, split_path(path), source="test")
    stats = Worker(engine, config, WorkerOptions(idle_seconds=0.05)).run(until_idle=True)
    assert stats.processed > 0
    with engine.connect() as conn:
        pending = conn.execute(
            select(func.count()).select_from(messages).where(messages.c.state == "received")
        ).scalar_one()
        unposted = conn.execute(
            select(func.count()).select_from(charge_lines)
            .where(charge_lines.c.journal_id.is_(None))
        ).scalar_one()
    assert pending == 0
    assert unposted == 0


def test_serve_acknowledges_and_posts_over_mllp(tmp_path: Path) -> None:
    import shutil
    import socket

    import yaml

    from .mllp_helpers import exchange

    config_dir = tmp_path / "config"
    shutil.copytree(DEMO / "config", config_dir)
    settings_path = config_dir / "carebridge.yaml"
    settings = yaml.safe_load(settings_path.read_text())
    relative = settings["chargemaster"]["path"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = settings_path.read_text().replace(relative, str((DEMO / "config" / relative).resolve()))
    text += f"\nlisteners:\n  - name: billing\n    host: 127.0.0.1\n    port: {port}\n"
    settings_path.write_text(text)
    database = tmp_path / "serve.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "carebridge.cli", "serve", "--config", str(config_dir),
         "--inbox", str(tmp_path / "inbox"), "--db", f"sqlite:///{database}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        reply = None
        while time.monotonic() < deadline and reply is None:
            try:
                reply = exchange(port, DFT)
            except OSError:
                time.sleep(0.2)
        assert reply is not None, "the listener did not start"
        assert reply.value("MSA-1") == "AA"
        assert reply.value("MSA-2") == "CTL0900"
        import sqlite3

        charged = 0
        while time.monotonic() < deadline and not charged:
            with sqlite3.connect(database) as conn:
                charged = conn.execute("SELECT count(*) FROM charge_lines").fetchone()[0]
            time.sleep(0.2)
        assert charged == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
