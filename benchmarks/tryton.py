"""Benchmark deliveries into Tryton: journals (posted moves) and supply issues per second.

The script builds a SQLite Tryton database with carebridge's module and the
demo's master data and starts trytond on a free loopback port. It runs the
bundled demo into a fresh carebridge database. Then it copies the demo's
journal and supply-issue deliveries under new keys until ``--records``
deliveries are queued, and times the delivery passes that send them. Each key is new to Tryton, so
every delivery creates and posts (or issues) one document. A second,
smaller run sends with one record per claim for comparison.

    python benchmarks/tryton.py [--records 2000] [--batch 100] [--single 100] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections import Counter
from importlib import resources
from pathlib import Path

# Python puts this folder first on sys.path, where benchmarks/fhir.py would
# shadow the fhir.resources package that carebridge imports.
sys.path[:] = [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent
]

from sqlalchemy import select

from carebridge.config import load_configuration
from carebridge.config.model import Configuration, DestinationConfig
from carebridge.engine.deliveries import (
    delivery_summary,
    enqueue,
    idempotency_key,
    run_deliveries,
)
from carebridge.engine.job import JobOptions, run_job
from carebridge.erp import rpc
from carebridge.erp.server import TrytonServer, TrytonSite, create_database, free_port
from carebridge.erp.setup import setup_company
from carebridge.store.db import open_engine, sqlite_url
from carebridge.store.schema import deliveries

DEMO = Path(str(resources.files("carebridge").joinpath("demo")))
PASSWORD_ENV = "CAREBRIDGE_BENCH_TRYTON_PASSWORD"
CALLS: Counter[str] = Counter()


def _count_calls() -> None:
    original = rpc.TrytonClient._post

    def counted(self, path, method, params, *, auth):  # type: ignore[no-untyped-def]
        CALLS[method] += 1
        return original(self, path, method, params, auth=auth)

    rpc.TrytonClient._post = counted  # type: ignore[method-assign]


def _destination(name: str, site: TrytonSite, batch: int) -> DestinationConfig:
    return DestinationConfig(
        name=name,
        type="tryton",
        kinds=("journal", "supply_issue"),
        settings={"port": site.port, "database": "erp", "password_env": PASSWORD_ENV},
        batch_size=batch,
    )


def _queue_copies(engine, destination: str, records: int) -> dict[str, int]:
    """Queue ``records`` deliveries for ``destination``: copies of the demo's, new keys."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(deliveries.c.kind, deliveries.c.record_id, deliveries.c.payload)
            .where(deliveries.c.destination == "demo-source")
            .order_by(deliveries.c.id)
        ).all()
    kinds: Counter[str] = Counter()
    with engine.begin() as conn:
        for number in range(records):
            kind, record_id, payload = rows[number % len(rows)]
            key = idempotency_key(destination, kind, f"copy-{number}")
            enqueue(conn, destination, kind, record_id, key, payload)
            kinds[kind] += 1
    return dict(kinds)


def _drain(engine, config: Configuration) -> float:
    started = time.perf_counter()
    while True:
        result = run_deliveries(engine, config, owner="benchmark")
        if result.claimed == 0:
            return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--records",
        type=int,
        default=2000,
        help="deliveries sent in batches (default 2000)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=100,
        help="deliveries per claim, and so per batch (default 100)",
    )
    parser.add_argument(
        "--single",
        type=int,
        default=100,
        help="deliveries sent one per claim for comparison (default 100)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args()
    _count_calls()
    os.environ[PASSWORD_ENV] = "admin"
    config = load_configuration(DEMO / "config")
    report: dict[str, object] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    with tempfile.TemporaryDirectory(prefix="carebridge-tryton-bench-") as folder:
        site = TrytonSite(Path(folder) / "tryton", port=free_port())
        started = time.perf_counter()
        create_database(site, "erp")
        report["create_database_seconds"] = round(time.perf_counter() - started, 1)
        engine = open_engine(sqlite_url(Path(folder) / "carebridge.db"))
        source = dataclasses.replace(
            config, destinations=(_destination("demo-source", site, options.batch),)
        )
        run_job(engine, source, JobOptions(paths=[DEMO / "data"], out_dir=None))
        with TrytonServer(site, "erp"):
            client = site.client("erp")
            started = time.perf_counter()
            setup_company(client, config, years=range(1990, dt.date.today().year + 2))
            report["setup_seconds"] = round(time.perf_counter() - started, 1)
            for label, count, batch in (
                ("batched", options.records, options.batch),
                ("one_per_claim", options.single, 1),
            ):
                name = f"bench-{label}".replace("_", "-")
                kinds = _queue_copies(engine, name, count)
                run = dataclasses.replace(
                    config, destinations=(_destination(name, site, batch),)
                )
                CALLS.clear()
                seconds = _drain(engine, run)
                with engine.connect() as conn:
                    states = delivery_summary(conn)[name]
                report[label] = {
                    "deliveries": count,
                    "by_kind": kinds,
                    "per_claim": batch,
                    "seconds": round(seconds, 2),
                    "per_second": round(count / seconds, 1),
                    "rpc_calls": sum(CALLS.values()),
                    "delivered": states["delivered"],
                    "dead": states["dead"],
                }
    if options.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return
    for key, value in report.items():
        print(f"{key:<26}{value}")


if __name__ == "__main__":
    main()
