"""End-to-end throughput and memory of carebridge on SQLite and PostgreSQL.

One command::

    .venv/bin/python benchmarks/pipeline.py [--messages 100000] [--pg-url URL] [--repeat N] [--json]

It generates the load once (:mod:`carebridge.demo.loadgen`: the bundled
public messages cloned with fresh ids), then times, each on a fresh
database:

* SQLite: one ``carebridge ingest`` process (store, process, post);
* PostgreSQL: ``carebridge ingest --store-only``, then 1 and then 2
  ``carebridge worker --until-idle --no-claims`` processes started together
  (``--repeat N``: N trials of each, alternating, median reported),
  timed until all have exited and every charge and every moved supply issue
  is journaled. One ``carebridge worker --until-idle`` then bills the claims;
  its time is reported as ``claims_seconds``, apart from the rate, because
  claims come after the journal.

The SQLite ``ingest`` bills its claims before it exits, so its rate
includes them.

Rates count generated messages over wall time. Peak RSS is each process's
own high-water mark (``wait4``), measured at 10,000 messages and at the
full count to show whether memory grows with the load.

Without ``--pg-url`` the script starts a PostgreSQL 15 cluster of its own in
a temporary folder (loopback, a free port, as user ``postgres`` when run as
root) and stops it on exit. With ``--pg-url`` each run uses a fresh schema
of that database, dropped afterwards.
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
import atexit
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from carebridge.demo.loadgen import generate

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SMALL = 10_000


@dataclass(slots=True)
class Finished:
    """One finished child process."""

    seconds: float
    rss_mb: float
    stdout: str
    cpu_seconds: float = 0.0


def carebridge(*args: str) -> list[str]:
    """Return the command line of a ``carebridge`` subcommand in this interpreter."""
    return [sys.executable, "-m", "carebridge.cli", *args]


def _wait(process: subprocess.Popen[bytes], started: float) -> Finished:
    # wait4 gives this child's own peak RSS (kB on Linux), not the maximum
    # over every child this script ever had.
    _pid, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    out = process.stdout.read().decode() if process.stdout else ""
    err = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"{process.args} exited {process.returncode}: {err[-2000:]}")
    return Finished(seconds, usage.ru_maxrss / 1024, out, usage.ru_utime + usage.ru_stime)


def run(args: list[str]) -> Finished:
    """Run one command to its end and return its time and peak RSS."""
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return _wait(process, started)


def run_parallel(commands: list[list[str]]) -> tuple[float, list[Finished]]:
    """Start ``commands`` together; return the time until the last exits, and each."""
    started = time.perf_counter()
    processes = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for args in commands
    ]
    finished = [_wait(process, started) for process in processes]
    return time.perf_counter() - started, finished


def check(url: str, generated: int) -> dict[str, int | bool]:
    """Return the counts that show the run finished: nothing waiting, all posted."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            def one(sql: str) -> int:
                return int(conn.execute(text(sql)).scalar_one())

            counts: dict[str, int | bool] = {
                "messages": one("SELECT count(*) FROM messages"),
                "received": one("SELECT count(*) FROM messages WHERE state = 'received'"),
                "charges": one("SELECT count(*) FROM charge_lines"),
                "supply_issues": one("SELECT count(*) FROM supply_issues"),
                # A supply issue held for stock (no stock move yet) is
                # journaled only when it moves, so it is not counted here.
                "unjournaled": one(
                    "SELECT (SELECT count(*) FROM charge_lines WHERE journal_id IS NULL)"
                    " + (SELECT count(*) FROM supply_issues s WHERE s.journal_id IS NULL"
                    " AND (EXISTS (SELECT 1 FROM stock_moves m WHERE m.supply_issue_id = s.id)"
                    " OR NOT EXISTS (SELECT 1 FROM stock_moves)))"
                ),
                "supply_issues_held_for_stock": one(
                    "SELECT count(*) FROM supply_issues s WHERE NOT EXISTS"
                    " (SELECT 1 FROM stock_moves m WHERE m.supply_issue_id = s.id)"
                    " AND EXISTS (SELECT 1 FROM stock_moves)"
                ),
                "journals": one("SELECT count(*) FROM journals"),
                "work_items": one("SELECT count(*) FROM work_items"),
            }
            # SQLite returns the amounts as decimal strings, PostgreSQL as Decimal.
            unbalanced = conn.execute(text(
                "SELECT total_debit, total_credit FROM journals"
            )).all()
            counts["balanced"] = all(
                Decimal(str(debit)) == Decimal(str(credit)) for debit, credit in unbalanced
            )
    finally:
        engine.dispose()
    counts["complete"] = (counts["messages"] == generated and counts["received"] == 0
                          and counts["unjournaled"] == 0 and bool(counts["balanced"]))
    return counts


def claim_count(url: str) -> int:
    """Return how many claims the run built (released, held or replaced)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM claims")).scalar_one())
    finally:
        engine.dispose()


def bench_sqlite(load: Path, generated: int, workdir: Path) -> dict[str, object]:
    """Time one ``carebridge ingest`` into a fresh SQLite file."""
    database = workdir / f"sqlite-{generated}.db"
    url = f"sqlite:///{database}"
    done = run(carebridge("ingest", str(load), "--db", url, "--json"))
    counts = check(url, generated)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    return {"seconds": round(done.seconds, 2),
            "msgs_per_s": round(generated / done.seconds, 1),
            "rss_mb": round(done.rss_mb, 1), "counts": counts}


def bench_postgres(load: Path, generated: int, admin_url: str, workers: int,
                   postmaster: int | None = None) -> dict[str, object]:
    """Store with ``ingest --store-only``, then time ``workers`` workers to idle.

    Storing runs as one ``ingest`` per worker, each taking every N-th clone,
    as hosts that each receive their own feeds would; a clone stays in one
    process so its encounters are stored before its procedures.
    """
    with fresh_schema(admin_url) as url:
        shares: list[list[str]] = [[] for _ in range(workers)]
        clones = sorted({path.name for path in load.glob("*/c*") if path.is_dir()})
        for index, clone in enumerate(clones):
            shares[index % workers] += [str(path) for path in sorted(load.glob(f"*/{clone}"))]
        checkpoint(admin_url)
        server_at_start = server_cpu_seconds(postmaster)
        store_s, stored = run_parallel(
            [carebridge("ingest", "--store-only", *share, "--db", url, "--json")
             for share in shares if share]
        )
        store = Finished(store_s, max(f.rss_mb for f in stored), "",
                         sum(f.cpu_seconds for f in stored))
        server_after_store = server_cpu_seconds(postmaster)
        # Processing workers leave billing to a worker of its own
        # (worker --no-claims), as a deployment with several workers would.
        # That claims pass runs afterwards and is timed separately.
        checkpoint(admin_url)
        process_s, finished = run_parallel(
            [carebridge("worker", "--db", url, "--until-idle", "--no-claims")
             for _ in range(workers)]
        )
        worker_cpu = sum(f.cpu_seconds for f in finished)
        counts = check(url, generated)
        tail_s = 0.0
        if counts["unjournaled"]:
            # A worker that exits while another holds the posting lock can
            # leave its last records unposted, so one more worker posts them.
            # NOTE: inferred from worker.py; not seen in the runs so far.
            tail = run(carebridge("worker", "--db", url, "--until-idle", "--no-claims"))
            tail_s = tail.seconds
            worker_cpu += tail.cpu_seconds
            counts = check(url, generated)
            counts["posted_by_extra_worker"] = True
        server_at_end = server_cpu_seconds(postmaster)
        billed = run(carebridge("worker", "--db", url, "--until-idle"))
        counts["claims"] = claim_count(url)
    end_to_end = store.seconds + process_s + tail_s
    return {
        "workers": workers,
        "store_seconds": round(store.seconds, 2),
        "process_seconds": round(process_s + tail_s, 2),
        "seconds": round(end_to_end, 2),
        "msgs_per_s": round(generated / end_to_end, 1),
        "process_msgs_per_s": round(generated / (process_s + tail_s), 1),
        "claims_seconds": round(billed.seconds, 2),
        "store_rss_mb": round(store.rss_mb, 1),
        "worker_rss_mb": round(max(f.rss_mb for f in finished), 1),
        # CPU seconds per 1,000 messages: the ingest processes while storing,
        # the workers while processing, and the server in each phase (own
        # cluster only). They depend much less than wall time on what else the
        # machine runs.
        "cpu_s_per_1000": {
            "store_clients": round(store.cpu_seconds / generated * 1000, 3),
            "workers": round(worker_cpu / generated * 1000, 3),
            "server_store": _per_1000(server_at_start, server_after_store, generated),
            "server_process": _per_1000(server_after_store, server_at_end, generated),
        },
        "counts": counts,
    }


def _per_1000(start: float | None, end: float | None, generated: int) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) / generated * 1000, 3)


def server_cpu_seconds(postmaster: int | None) -> float | None:
    """Return the CPU seconds the PostgreSQL server has used so far, or ``None``.

    Counts the postmaster and every live child (backends, WAL writer,
    checkpointer, autovacuum), plus the children that have exited, which
    the kernel adds to the postmaster's ``cutime`` and ``cstime``. Only known
    for the cluster this script started.
    """
    if postmaster is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")

    def used(pid: int, with_children: bool) -> float:
        # Fields 14-17 of /proc/PID/stat: utime, stime, cutime, cstime.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(value) for value in fields[11:15 if with_children else 13]) / tick

    total = used(postmaster, True)
    for child in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split():
        try:
            total += used(int(child), False)
        except (FileNotFoundError, ProcessLookupError):
            pass  # it exited meanwhile and now counts in the postmaster's cutime
    return total


def checkpoint(admin_url: str) -> None:
    """Write out the dirty buffers of earlier runs before a timed phase.

    Otherwise a checkpoint that the previous run's writes made due lands in
    whichever run comes next. Needs a superuser (or pg_checkpoint); with a
    URL that lacks the right, the phase starts without it.
    """
    engine = create_engine(admin_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("CHECKPOINT"))
    except DBAPIError as exc:
        print(f"no CHECKPOINT before the phase: {exc.orig}", file=sys.stderr)
    finally:
        engine.dispose()


@contextmanager
def fresh_schema(admin_url: str) -> Iterator[str]:
    """Yield a URL whose connections use a new, empty schema; drop it after."""
    admin = create_engine(admin_url)
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(admin_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class OwnCluster:
    """A throwaway PostgreSQL 15 cluster on loopback, stopped on exit."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="carebridge-bench-pg."))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.started = False
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")

    def _pg(self, *args: str) -> None:
        command = [str(PG_BIN / args[0]), *args[1:]]
        if self.as_root:
            # initdb and postgres refuse to run as root.
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, cwd=self.dir, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)

    def start(self) -> str:
        """Create and start the cluster; return the URL of its ``carebridge`` database."""
        if not (PG_BIN / "postgres").exists():
            raise SystemExit(f"PostgreSQL 15 not found in {PG_BIN}; pass --pg-url")
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--locale=C.UTF-8")
        atexit.register(self.stop)
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w",
                 "-t", "60", "-o",
                 f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir}", "start")
        self.started = True
        self._pg("psql", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.dir), "-p",
                 str(self.port), "-U", "postgres", "-d", "postgres",
                 "-c", "CREATE ROLE carebridge LOGIN",
                 "-c", "CREATE DATABASE carebridge OWNER carebridge",
                 "-c", "GRANT pg_checkpoint TO carebridge")
        return f"postgresql+psycopg://carebridge@127.0.0.1:{self.port}/carebridge"

    def postmaster(self) -> int:
        """Return the process id of the running server."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        """Stop the server and remove its folder; safe to call twice."""
        if self.started:
            self.started = False
            try:
                self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cpu_ticks() -> tuple[int, int]:
    """Return the machine's (busy, total) CPU ticks so far, from ``/proc/stat``."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]  # idle and iowait
    return sum(values[:8]) - idle, sum(values[:8])


def machine_busy_share(start: tuple[int, int]) -> float:
    """Return the share of all CPUs busy since ``start``, this script's work included.

    A share near 1 means the runs competed for CPU with each other or with
    other programs, so the wall times and the 2 / 1 ratio are not representative.
    """
    busy, total = _cpu_ticks()
    return round((busy - start[0]) / max(total - start[1], 1), 2)


def machine() -> dict[str, object]:
    """Describe the machine the figures come from."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "system": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def median_run(runs: list[dict[str, object]]) -> dict[str, object]:
    """Return the run with the median end-to-end time (the slower middle one of an even count)."""
    ordered = sorted(runs, key=lambda run_: run_["seconds"])
    return ordered[len(ordered) // 2]


def table(result: dict[str, object]) -> str:
    """Format the result for a person."""
    sqlite = result["sqlite"]
    pg = result["postgresql"]
    lines = [
        f"carebridge pipeline benchmark: {result['messages']} messages, "
        f"{result['machine']['cpus']} CPUs, {result['machine']['date']}",
        f"  load generated in {result['generate_seconds']} s",
        "",
        f"  {'run':<28}{'msgs/s':>10}{'processing/s':>14}{'seconds':>10}{'peak RSS MB':>13}",
        f"  {'SQLite, 1 ingest process':<28}{sqlite['msgs_per_s']:>10}{'':>14}"
        f"{sqlite['seconds']:>10}{sqlite['rss_mb']:>13}",
    ]
    for run_ in pg:
        label = f"PostgreSQL, {run_['workers']} worker{'s' if run_['workers'] > 1 else ''}"
        lines.append(
            f"  {label:<28}{run_['msgs_per_s']:>10}{run_['process_msgs_per_s']:>14}"
            f"{run_['seconds']:>10}{run_['worker_rss_mb']:>13}"
        )
    lines += [
        "",
        f"  2 workers / 1 worker (end to end)   {result['pg_2_over_1']}",
        f"  2 workers / 1 worker (processing)   {result['pg_2_over_1_processing']}",
        f"  trials per worker count: {result['postgresql_trials']['repeat']}, "
        f"2 / 1 per trial: {result['postgresql_trials']['pg_2_over_1']}",
        f"  peak RSS, SQLite ingest: {result['rss_mb_at_10k']} MB at 10k, "
        f"{result['rss_mb_at_100k']} MB at {result['messages']}",
        f"  peak RSS, PostgreSQL worker: {result['pg_worker_rss_mb_at_10k']} MB at 10k, "
        f"{result['pg_worker_rss_mb_at_100k']} MB at {result['messages']}",
        f"  all runs complete (nothing waiting, all journaled, balanced): "
        f"{result['all_complete']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table, or one JSON object with ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--pg-url", default=None,
                        help="SQLAlchemy URL of a PostgreSQL database the benchmark may "
                        "create schemas in; default: start a cluster of its own")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeat", type=int, default=1,
                        help="PostgreSQL trials per worker count, alternating; the "
                        "figures are each count's median run (default 1)")
    args = parser.parse_args(argv)
    # atexit runs on SIGTERM only if the signal becomes a normal exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    say = (lambda *_a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    workdir = Path(tempfile.mkdtemp(prefix="carebridge-bench."))
    atexit.register(shutil.rmtree, workdir, True)
    started = time.perf_counter()
    big = generate(workdir / "load", args.messages, seed=args.seed)
    generate_seconds = round(time.perf_counter() - started, 3)
    small_size = min(SMALL, args.messages)
    generate(workdir / "load-small", small_size, seed=args.seed)
    load, small = workdir / "load", workdir / "load-small"

    machine_at_start = _cpu_ticks()
    cluster = None
    pg_url = args.pg_url
    if pg_url is None:
        say("starting a PostgreSQL 15 cluster of its own")
        cluster = OwnCluster()
        pg_url = cluster.start()
    try:
        say(f"SQLite, {small_size} messages")
        sqlite_small = bench_sqlite(small, small_size, workdir)
        say(f"SQLite, {args.messages} messages")
        sqlite_big = bench_sqlite(load, args.messages, workdir)
        say(f"PostgreSQL, 1 worker, {small_size} messages")
        postmaster = cluster.postmaster() if cluster is not None else None
        pg_small = bench_postgres(small, small_size, pg_url, 1, postmaster)
        trials: dict[int, list[dict[str, object]]] = {1: [], 2: []}
        for trial in range(1, args.repeat + 1):
            for workers in (1, 2):
                say(f"PostgreSQL, {workers} worker(s), {args.messages} messages, "
                    f"trial {trial} of {args.repeat}")
                trials[workers].append(
                    bench_postgres(load, args.messages, pg_url, workers, postmaster))
    finally:
        if cluster is not None:
            cluster.stop()

    # With --repeat the trials alternate 1, 2, 1, 2... so that a slow spell
    # of the machine lands on both; each figure is the run with the median
    # end-to-end time of its worker count.
    one, two = (median_run(trials[workers]) for workers in (1, 2))
    pg_runs = [one, two]
    result: dict[str, object] = {
        "messages": args.messages,
        "seed": args.seed,
        "load": {"by_format": big.by_format, "files": big.files, "clones": big.clones},
        "generate_seconds": generate_seconds,
        "machine": machine(),
        "postgresql_source": "own cluster (PostgreSQL 15, default settings)"
        if cluster else "given --pg-url",
        "sqlite_msgs_per_s": sqlite_big["msgs_per_s"],
        "pg_1_worker_msgs_per_s": one["msgs_per_s"],
        "pg_2_workers_msgs_per_s": two["msgs_per_s"],
        "pg_1_worker_process_msgs_per_s": one["process_msgs_per_s"],
        "pg_2_workers_process_msgs_per_s": two["process_msgs_per_s"],
        "pg_2_over_1": round(two["msgs_per_s"] / one["msgs_per_s"], 2),
        "pg_2_over_1_processing": round(
            two["process_msgs_per_s"] / one["process_msgs_per_s"], 2),
        "pg_cpu_s_per_1000": {"1_worker": one["cpu_s_per_1000"],
                              "2_workers": two["cpu_s_per_1000"]},
        "machine_busy_share": machine_busy_share(machine_at_start),
        "rss_mb_at_10k": sqlite_small["rss_mb"],
        "rss_mb_at_100k": sqlite_big["rss_mb"],
        "pg_worker_rss_mb_at_10k": pg_small["worker_rss_mb"],
        "pg_worker_rss_mb_at_100k": one["worker_rss_mb"],
        "sqlite": sqlite_big,
        "sqlite_10k": sqlite_small,
        "postgresql": pg_runs,
        "postgresql_10k": pg_small,
        "postgresql_trials": {
            "repeat": args.repeat,
            "pg_1_worker_msgs_per_s": [run_["msgs_per_s"] for run_ in trials[1]],
            "pg_2_workers_msgs_per_s": [run_["msgs_per_s"] for run_ in trials[2]],
            "pg_2_over_1": [round(b["msgs_per_s"] / a["msgs_per_s"], 2)
                            for a, b in zip(trials[1], trials[2], strict=True)],
        },
    }
    result["all_complete"] = all(
        run_["counts"]["complete"]
        for run_ in (sqlite_big, sqlite_small, pg_small, *trials[1], *trials[2])
    )
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(table(result))
    return 0 if result["all_complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
