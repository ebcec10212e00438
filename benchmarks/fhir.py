"""Throughput of the FHIR API from request to stored canonical records.

One command::

    .venv/bin/python benchmarks/fhir.py [--clones 10] [--clients 2] [--api-workers 2] [--json]

It builds transaction Bundles from the four bundled Synthea bundles: each
clone is a copy of the four with every UUID replaced by a new one, so that
every clone creates new resources and new canonical records. It then starts
``carebridge serve --api-workers N`` (the worker in one process, the API in
N processes of its own; 0 puts the API on a thread of the worker's process)
on a temporary SQLite database and a free loopback port, posts the Bundles
over HTTP from ``--clients`` threads, and waits until the worker has
processed every message, i.e. until the canonical records (patients,
encounters, services) are stored. ``resources_per_s`` is the resources
posted over that wall time. One more clone, posted and processed before the
clock starts, warms the server up. Each client thread keeps one connection
open, and each connection stays with the API process that accepted it.

Next to it, ``validate_only_resources_per_s`` is how fast fhir.resources
(the R4B ``Bundle`` model) alone validates the same Bundles in this process.

CPU time is counted over the same wall time from ``/proc`` (Linux only):
``service_cpu_ms_per_resource`` for the ``carebridge serve`` process (the
worker, and the API when it runs on a thread), ``api_cpu_ms_per_resource``
for its child processes (the API processes, or the validation processes of
an API on a thread). ``machine_busy_share`` is the share of all CPUs busy
meanwhile, other programs included, and ``load_average`` the 1-minute load
average when the timed posting starts and when it ends.
``api_cpu_ms_per_resource_by_process`` splits the API figure by process:
a connection stays with the process that accepted it, so with few clients
one API process may serve every connection while the other idles.
``server_log_actions`` counts the server's INFO log lines by ``action``, over
the whole run, warm-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path

# Python puts this script's folder first on sys.path, where this file (fhir.py)
# would shadow the fhir.resources package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]

import httpx
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import create_engine, func, select

from carebridge.api.security import Role, create_api_key, create_client
from carebridge.store.db import open_engine, sqlite_url
from carebridge.store.schema import messages

SYNTHEA = Path(__file__).resolve().parents[1] / "src/carebridge/demo/data/synthea/fhir"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def build_bundles(clones: int, first: int = 0) -> tuple[list[bytes], int]:
    """Return copies ``first`` to ``first + clones - 1`` of the Synthea Bundles with new
    UUIDs, and their resource count."""
    texts = [path.read_text(encoding="utf-8") for path in sorted(SYNTHEA.glob("*.json"))]
    bundles: list[bytes] = []
    resources = 0
    for clone in range(first, first + clones):
        fresh: dict[str, str] = {}

        def replace(match: re.Match[str], clone: int = clone,
                    fresh: dict[str, str] = fresh) -> str:
            original = match.group(0)
            if original not in fresh:
                fresh[original] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{clone}/{original}"))
            return fresh[original]

        for text in texts:
            bundle = _UUID.sub(replace, text)
            bundles.append(bundle.encode("utf-8"))
            resources += len(json.loads(bundle)["entry"])
    return bundles, resources


def validate_only(bundles: list[bytes]) -> float:
    """Return the seconds fhir.resources takes to validate ``bundles`` (JSON parsing excluded)."""
    documents = [json.loads(body, parse_float=Decimal) for body in bundles]
    Bundle.model_validate(documents[0])  # imports the entry models before timing
    started = time.perf_counter()
    for document in documents:
        Bundle.model_validate(document)
    return time.perf_counter() - started


def _cpu_ticks() -> tuple[int, int]:
    """Return the machine's (busy, total) CPU ticks so far, from ``/proc/stat``."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]  # idle and iowait
    return sum(values[:8]) - idle, sum(values[:8])


def _process_ticks(pid: int) -> int:
    """Return the user and system CPU ticks of process ``pid``, 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in task.read_text().split()]
        except OSError:
            continue
    return found


def _tree_ticks(pid: int) -> dict[int, int]:
    """Return the CPU ticks of ``pid`` and of each process below it."""
    ticks = {pid: _process_ticks(pid)}
    pending = _children(pid)
    while pending:
        child = pending.pop()
        ticks[child] = _process_ticks(child)
        pending += _children(child)
    return ticks


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(base: str, server: subprocess.Popen[bytes], log_path: Path,
                timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            error = log_path.read_text(errors="replace")
            raise RuntimeError(f"carebridge serve exited with status {server.returncode}: "
                               f"{error[-2000:]}")
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"carebridge serve did not respond within {timeout:.0f}s")


def _post_all(base: str, key: str, bundles: list[bytes], clients: int) -> None:
    failures: list[str] = []
    pending = list(reversed(bundles))
    lock = threading.Lock()

    def post() -> None:
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    if not pending or failures:
                        return
                    body = pending.pop()
                response = http.post(f"{base}/fhir", content=body, headers={
                    "X-API-Key": key, "Content-Type": "application/fhir+json"})
                if response.status_code != 200:
                    with lock:
                        failures.append(f"{response.status_code}: {response.text[:300]}")

    threads = [threading.Thread(target=post) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"the server rejected a Bundle: {failures[0]}")


def _wait_processed(db_url: str, expected: int, timeout: float) -> None:
    engine = create_engine(db_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                done = conn.execute(
                    select(func.count()).select_from(messages)
                    .where(messages.c.state != "received")
                ).scalar_one()
            if done >= expected:
                return
            time.sleep(0.05)
    finally:
        engine.dispose()
    raise RuntimeError(f"the worker did not process {expected} messages in {timeout:.0f}s")


def run(clones: int, clients: int, api_workers: int) -> dict[str, object]:
    bundles, resources = build_bundles(clones)
    warm_up, _ = build_bundles(1, first=clones)
    with tempfile.TemporaryDirectory(prefix="carebridge-fhir-bench-") as folder:
        db_url = sqlite_url(Path(folder) / "bench.db")
        engine = open_engine(db_url)
        create_client(engine, "bench", frozenset({Role.INTERFACE}))
        key = create_api_key(engine, "bench")
        engine.dispose()
        port = _free_port()
        # The server's log goes to a file: a pipe that is never read would fill up
        # and stop the server at its next log line.
        log_path = Path(folder) / "server.log"
        log_file = log_path.open("wb")
        env = {**os.environ, "CAREBRIDGE_API_SIGNING_KEY": uuid.uuid4().hex * 2}
        # Without --api-workers the script also runs a carebridge that predates it.
        processes = ["--api-workers", str(api_workers)] if api_workers else []
        server = subprocess.Popen(
            [sys.executable, "-m", "carebridge.cli", "serve", "--db", db_url,
             "--host", "127.0.0.1", "--port", str(port), "--no-deliver", "-vv",
             "--inbox", str(Path(folder) / "inbox"), *processes],
            stdout=subprocess.DEVNULL, stderr=log_file, env=env,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(base, server, log_path)
            # One untimed clone: authenticates the key (then cached) and lets the
            # server and its validation processes import the FHIR models.
            _post_all(base, key, warm_up, clients)
            # The warm-up's messages are processed before the clock starts.
            _wait_processed(db_url, len(warm_up), timeout=600)
            load_before = os.getloadavg()[0]
            machine_before = _cpu_ticks()
            ticks_before = _tree_ticks(server.pid)
            started = time.perf_counter()
            _post_all(base, key, bundles, clients)
            posted = time.perf_counter() - started
            _wait_processed(db_url, len(bundles) + len(warm_up), timeout=600)
            seconds = time.perf_counter() - started
            ticks_after = _tree_ticks(server.pid)
            machine_after = _cpu_ticks()
            load_after = os.getloadavg()[0]
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
            log_file.close()
        actions = Counter(re.findall(r"action=(\w+)", log_path.read_text(errors="replace")))
    validate_seconds = validate_only(bundles)
    per_tick_ms = 1000 / os.sysconf("SC_CLK_TCK") / resources
    service_ticks = ticks_after[server.pid] - ticks_before.get(server.pid, 0)
    by_child = sorted((ticks - ticks_before.get(pid, 0)
                       for pid, ticks in ticks_after.items() if pid != server.pid),
                      reverse=True)
    child_ticks = sum(by_child)
    busy, total = (after - before for after, before in zip(machine_after, machine_before,
                                                           strict=True))
    return {
        "bundles": len(bundles),
        "resources": resources,
        "clients": clients,
        "api_workers": api_workers,
        "seconds": round(seconds, 3),
        "post_seconds": round(posted, 3),
        "resources_per_s": round(resources / seconds),
        "validate_only_seconds": round(validate_seconds, 3),
        "validate_only_resources_per_s": round(resources / validate_seconds),
        "service_cpu_ms_per_resource": round(service_ticks * per_tick_ms, 3),
        "api_cpu_ms_per_resource": round(child_ticks * per_tick_ms, 3),
        "api_cpu_ms_per_resource_by_process": [
            round(ticks * per_tick_ms, 3) for ticks in by_child if ticks],
        "machine_busy_share": round(busy / max(total, 1), 2),
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "server_log_actions": dict(sorted(actions.items())),
        "database": "sqlite",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clones", type=int, default=10,
                        help="Copies of the four Synthea Bundles to post (default 10).")
    parser.add_argument("--clients", type=int, default=2,
                        help="Threads posting Bundles at once (default 2).")
    parser.add_argument("--api-workers", type=int, default=2,
                        help="API processes of carebridge serve; 0 serves the API from a "
                        "thread of the worker's process (default 2).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    result = run(args.clones, args.clients, args.api_workers)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for name, value in result.items():
            print(f"{name:32} {value}")


if __name__ == "__main__":
    main()
