"""``carebridge serve --api-workers 2``: the API in processes of its own, one audit chain."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select
from starlette.requests import Request

from carebridge import audit
from carebridge.api.app import create_app
from carebridge.api.server import share_web_session_key
from carebridge.config.model import Configuration
from carebridge.store.schema import audit_events, fhir_resources
from carebridge.web.session import session_key
from tests.integration.fhir_api_helpers import interface_key

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(),
                                reason="counts API processes in /proc (Linux)")

FHIR = "application/fhir+json"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _api_processes(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        children += [int(child) for child in task.read_text().split()]
    return [child for child in children
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


@contextmanager
def serve(db_url: str, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``carebridge serve --api-workers 2``; yield its base URL and its process."""
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "CAREBRIDGE_API_SIGNING_KEY": uuid.uuid4().hex * 2}
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "carebridge.cli", "-vv", "serve", "--db", db_url,
             "--host", "127.0.0.1", "--port", str(port), "--api-workers", "2",
             "--no-deliver", "--inbox", str(tmp_path / "inbox")],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                try:
                    if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            # The port accepts connections once the first API process serves, so wait for both.
            while "in 2 processes" not in log_path.read_text():
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            yield base, process
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0, log_path.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    assert "Traceback" not in log_path.read_text()


def test_two_api_processes_keep_one_audit_chain(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    key = interface_key(engine)
    headers = {"X-API-Key": key, "Content-Type": FHIR}
    statuses: list[int] = []
    lock = threading.Lock()

    def post(base: str, thread: int) -> None:
        for number in range(6):
            # A connection per request, so that both processes accept some.
            response = httpx.post(f"{base}/fhir/Patient", headers=headers, timeout=60,
                                  content=json.dumps({
                                      "resourceType": "Patient",
                                      "name": [{"family": f"Chain{thread}x{number}"}],
                                  }))
            with lock:
                statuses.append(response.status_code)

    with serve(db_url, tmp_path) as (base, process):
        assert len(_api_processes(process.pid)) == 2
        threads = [threading.Thread(target=post, args=(base, thread)) for thread in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)

    assert statuses == [201] * 48
    check = audit.verify(engine)
    assert check.ok, check.problem
    with engine.connect() as conn:
        creates = conn.execute(select(audit_events.c.object_id)
                               .where(audit_events.c.action == "fhir.create")).scalars().all()
        stored = conn.execute(select(fhir_resources.c.resource_id)).scalars().all()
    assert sorted(creates) == sorted(stored)
    assert len(stored) == 48


def test_killed_api_process_is_replaced(engine: Engine, db_url: str, tmp_path: Path) -> None:
    interface_key(engine)
    with serve(db_url, tmp_path) as (base, process):
        first = _api_processes(process.pid)
        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        now = first
        while time.monotonic() < deadline:
            now = _api_processes(process.pid)
            if len(now) == 2 and first[0] not in now:
                break
            time.sleep(0.2)
        assert len(now) == 2
        assert first[0] not in now
        assert httpx.get(f"{base}/ready", timeout=10).status_code == 200
    for pid in now:
        assert not Path(f"/proc/{pid}").exists()


def test_web_session_key_shared_without_hs256(engine: Engine, config: Configuration) -> None:
    settings = dataclasses.replace(config, api=dataclasses.replace(config.api,
                                                                   signing_keys=()))
    apps = [create_app(engine, settings) for _ in range(2)]
    drawn = {session_key(Request({"type": "http", "app": app})) for app in apps}
    assert len(drawn) == 2  # each process would draw its own key

    shared = secrets.token_bytes(32)
    apps = [create_app(engine, settings) for _ in range(2)]
    for app in apps:
        share_web_session_key(app, shared)
    assert {session_key(Request({"type": "http", "app": app})) for app in apps} == {shared}


def test_old_keep_alive_connection_closed(engine: Engine, db_url: str, tmp_path: Path) -> None:
    # The demo configuration closes a keep-alive connection after a second,
    # so that clients connect again and spread over the API processes.
    closing: list[str] = []
    with serve(db_url, tmp_path) as (base, _process), httpx.Client(timeout=30) as http:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            response = http.get(f"{base}/health")
            assert response.status_code == 200
            if response.headers.get("connection") == "close":
                closing.append(response.headers["connection"])
            time.sleep(0.05)
        assert http.get(f"{base}/health").status_code == 200
    assert 1 <= len(closing) <= 3
