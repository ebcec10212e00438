"""Micro-benchmark of intake alone: store HL7 v2 messages with ``store_inputs``.

The raw inputs are built first and not timed. They are then stored on a
fresh SQLite database (or a fresh schema of ``--pg-url``) in batches, as
the file intake and the MLLP listener's group commit do. The script reports
wall time and CPU time per message::

    python benchmarks/intake.py [--messages 10000] [--batch-size 500] [--json]
    python benchmarks/intake.py --profile 25     # cProfile, top 25 by own time
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
import cProfile
import json
import pstats
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import text

from carebridge.engine.intake import store_inputs
from carebridge.ingest.files.sources import (
    HL7V2,
    RawInput,
    hl7_content_digest,
    hl7_dedup_key,
    hl7_ordering_key,
    sha256,
)
from carebridge.store.db import open_engine


def dft_message(n: int) -> bytes:
    """Return a DFT^P03 like the MLLP benchmark's, with control id ``n``."""
    return (
        f"MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|B{n:09d}|P|2.5\r"
        f"EVN|P03|20240501120000\r"
        f"PID|1||MRN{n % 5000:05d}^^^SENDFAC^MR||TESTPATIENT^BENCH||19800101|F\r"
        f"PV1|1|O|CLINIC1||||||||||||||||VIS{n % 20000:06d}\r"
        f"FT1|1|TXN{n:09d}||20240501|20240501|CG|99213^OFFICE VISIT EST^CPT|||1|"
        f"135.50&USD|135.50&USD\r"
    ).encode("ascii")


def raw_inputs(count: int, duplicates: int) -> list[RawInput]:
    """Return ``count`` inputs; every ``duplicates``-th one resends an earlier one."""
    inputs = []
    for n in range(count):
        payload = dft_message(n // 2 if duplicates and n % duplicates == 0 else n)
        digest = sha256(payload)
        inputs.append(RawInput(
            format=HL7V2,
            origin=f"bench@{n}",
            raw=payload,
            content_sha256=digest,
            dedup_key=hl7_dedup_key(payload, digest),
            dedup_digest=hl7_content_digest(payload),
            ordering_key=hl7_ordering_key(payload),
        ))
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--duplicates", type=int, default=0,
                        help="make every Nth message a resend (0: none)")
    parser.add_argument("--pg-url", help="PostgreSQL URL; a fresh schema is used")
    parser.add_argument("--profile", type=int, metavar="N", default=0,
                        help="run under cProfile and print the top N functions")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    inputs = raw_inputs(args.messages, args.duplicates)
    with tempfile.TemporaryDirectory() as folder:
        if args.pg_url:
            schema = f"bench_{uuid.uuid4().hex[:8]}"
            from sqlalchemy import create_engine

            admin = create_engine(args.pg_url)
            with admin.begin() as conn:
                conn.execute(text(f"CREATE SCHEMA {schema}"))
            url = args.pg_url + ("&" if "?" in args.pg_url else "?") + (
                f"options=-csearch_path%3D{schema}")
        else:
            url = f"sqlite:///{Path(folder) / 'bench.db'}"
        engine = open_engine(url)
        profiler = cProfile.Profile() if args.profile else None
        cpu, wall = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        result = store_inputs(engine, inputs, source="bench", batch_size=args.batch_size)
        if profiler:
            profiler.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        engine.dispose()
        if args.pg_url:
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            admin.dispose()
    if profiler:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)
    figures = {
        "messages": args.messages,
        "batch_size": args.batch_size,
        "stored": result.stored,
        "duplicates": result.duplicates,
        "msgs_per_s": round(args.messages / wall, 1),
        "cpu_us_per_msg": round(cpu / args.messages * 1e6, 1),
        "wall_us_per_msg": round(wall / args.messages * 1e6, 1),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{figures['messages']} messages in batches of {figures['batch_size']}: "
              f"{figures['msgs_per_s']:.0f} msgs/s, {figures['cpu_us_per_msg']} µs CPU "
              f"and {figures['wall_us_per_msg']} µs wall per message")


if __name__ == "__main__":
    main()
