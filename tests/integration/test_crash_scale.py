"""kill -9 at scale: 20,000 cloned messages, ten kills, nothing lost or doubled.

Each test kills carebridge processes at ten seeded random moments, restarts
them, lets them finish, and then compares the database with an
uninterrupted run of the same input. Two ways of running are covered, each
on SQLite and on PostgreSQL:

* ``ingest`` (store, process and post in one process); on PostgreSQL a
  ``worker`` runs beside it, so two processes process at once;
* ``ingest --store-only`` first, then ``worker --until-idle`` (two of them
  at once on PostgreSQL).

The uninterrupted run is one SQLite ``ingest``: the same input must give the
same charges on either backend.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from carebridge.demo.loadgen import generate
from carebridge.store.db import sqlite_url

pytestmark = pytest.mark.timeout(420)

MESSAGES = 20_000
KILLS = 10
STALLED_SECONDS = 5.0
"""How long a stage may show no progress before a kill lands anyway."""
ORPHAN_SECONDS = 15.0
"""How long the children of a killed process may outlive it."""
SEED = 20240611
CENT = Decimal("0.01")


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "carebridge.cli", *args]


def start(args: list[str]) -> subprocess.Popen[bytes]:
    # stderr goes to a file, because a pipe that is never read could fill
    # and stall a long-running worker.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
    process.log = log  # type: ignore[attr-defined]
    return process


def errors(process: subprocess.Popen[bytes]) -> str:
    log = process.log  # type: ignore[attr-defined]
    log.seek(0)
    return log.read().decode(errors="replace")[-3000:]


def finish(process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    process.wait(timeout=timeout)
    assert process.returncode == 0, errors(process)


def run_to_end(args: list[str]) -> float:
    started = time.perf_counter()
    finish(start(args))
    return time.perf_counter() - started


def descendants(pid: int) -> set[int]:
    """Return the ids of every process below ``pid`` (Linux ``/proc``)."""
    found: set[int] = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            listed = children.read_text().split()
        except OSError:
            continue
        for child in map(int, listed):
            found |= {child} | descendants(child)
    return found


def process_alive(pid: int) -> bool:
    """Return whether ``pid`` is a process that has not exited (zombies have)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rpartition(")")[2].split()[0] != "Z"


def kill(process: subprocess.Popen[bytes]) -> bool:
    """SIGKILL ``process`` if it still runs; return whether it did.

    The processes it started (claim validation processes) must exit by
    themselves soon after, as they would after a crash in production.
    """
    alive = process.poll() is None
    children = descendants(process.pid) if alive else set()
    if alive:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    deadline = time.monotonic() + ORPHAN_SECONDS
    while any(map(process_alive, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = sorted(pid for pid in children if process_alive(pid))
    for orphan in orphans:
        os.kill(orphan, signal.SIGKILL)
    assert orphans == [], f"processes {orphans} outlived their killed parent"
    return alive


@dataclass(frozen=True)
class Outcome:
    """What a finished database holds, reduced to what must match."""

    message_keys: frozenset[tuple[str, str]]
    charged: frozenset[tuple[str, Decimal, str | None]]
    issued: frozenset[tuple[str, Decimal]]
    conflicted: frozenset[str]


def amount(value: object) -> Decimal:
    # SQLite hands amounts back as decimal strings, PostgreSQL as Decimal.
    return Decimal(str(value)).quantize(CENT)


def inspect(url: str) -> Outcome:
    """Check every invariant of a finished run and return its outcome."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            def rows(sql: str) -> list[tuple]:
                return [tuple(row) for row in conn.execute(text(sql))]

            assert rows("SELECT count(*) FROM messages WHERE state = 'received'") == [(0,)]
            for table, key in (("charge_lines", "service_key"),
                               ("supply_issues", "usage_key")):
                total, distinct = rows(f"SELECT count(*), count(DISTINCT {key}) FROM {table}")[0]
                assert total == distinct, f"{table}: {total - distinct} doubled {key}"
            assert rows("SELECT count(*) FROM charge_lines WHERE journal_id IS NULL") == [(0,)]
            # The demo configuration keeps stock, so an issue is journaled
            # once it has left the shelf. An issue held for stock waits, and
            # its no_stock (or quantity_too_high) work item names it.
            moved = "SELECT supply_issue_id FROM stock_moves WHERE supply_issue_id IS NOT NULL"
            assert rows(f"SELECT count(*) FROM supply_issues WHERE journal_id IS NULL "
                        f"AND id IN ({moved})") == [(0,)]
            assert rows(f"SELECT count(*) FROM supply_issues WHERE id NOT IN ({moved}) "
                        "AND ('supply:' || usage_key) NOT IN (SELECT subject_key FROM "
                        "work_items WHERE reason IN ('no_stock', 'quantity_too_high'))"
                        ) == [(0,)]

            records = {("charge", record_id) for (record_id,) in rows("SELECT id FROM charge_lines")}
            records |= {("supply", record_id) for (record_id,) in rows(
                f"SELECT id FROM supply_issues WHERE id IN ({moved})")}
            sides: Counter[tuple[str, int, str]] = Counter()
            journal_sums: dict[int, list[Decimal]] = {}
            for journal_id, kind, record_id, debit, credit in rows(
                "SELECT journal_id, source_kind, source_record_id, debit, credit "
                "FROM journal_lines"
            ):
                debit, credit = amount(debit), amount(credit)
                sides[(kind, record_id, "debit" if debit else "credit")] += 1
                sums = journal_sums.setdefault(journal_id, [Decimal(0), Decimal(0)])
                sums[0] += debit
                sums[1] += credit
            doubled = [side for side, count in sides.items() if count > 1]
            assert not doubled, f"journal lines doubled: {doubled[:5]}"
            journaled = {(kind, record_id) for kind, record_id, _side in sides}
            assert journaled == records, "a record is not journaled, or a line names none"
            for journal_id, debit, credit in rows(
                "SELECT id, total_debit, total_credit FROM journals"
            ):
                assert amount(debit) == amount(credit), f"journal {journal_id} unbalanced"
                assert journal_sums.get(journal_id) == [amount(debit), amount(credit)], (
                    f"journal {journal_id} totals differ from its lines")

            return Outcome(
                message_keys=frozenset(rows(
                    "SELECT DISTINCT dedup_key, content_sha256 FROM messages")),
                charged=frozenset((key, amount(value), encounter) for key, value, encounter
                                  in rows("SELECT service_key, amount, encounter_id "
                                          "FROM charge_lines")),
                issued=frozenset((key, amount(value)) for key, value in rows(
                    "SELECT usage_key, total_cost FROM supply_issues")),
                conflicted=frozenset(
                    match.group(1)
                    for (detail,) in rows("SELECT detail FROM work_items "
                                          "WHERE reason = 'encounter_patient_conflict'")
                    if (match := CONFLICT.match(detail))
                ),
            )
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def load(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("crash-scale") / "load"
    generate(folder, MESSAGES, seed=SEED)
    return folder


@dataclass(frozen=True)
class Reference:
    outcome: Outcome


@pytest.fixture(scope="module")
def reference(load: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """An uninterrupted SQLite ingest of the load."""
    url = sqlite_url(tmp_path_factory.mktemp("crash-scale-clean") / "clean.db")
    run_to_end(command("ingest", str(load), "--db", url, "--json"))
    engine = create_engine(url)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM messages")).scalar_one()
    engine.dispose()
    assert stored == MESSAGES
    outcome = inspect(url)
    assert outcome.charged, "the load should price some services"
    return Reference(outcome)


CONFLICT = re.compile(r"encounter (\S+) belongs to patient")


def assert_same(crashed: Outcome, clean: Outcome) -> None:
    assert crashed.message_keys == clean.message_keys, "stored messages differ"
    # Two patients sending the same visit number are in different lanes, so
    # which of them keeps the encounter depends on processing order across
    # workers; the other message becomes an encounter_patient_conflict work
    # item either way. Charges on such encounters are compared apart.
    assert crashed.conflicted == clean.conflicted, "contested encounters differ"
    settled = {(key, value) for key, value, encounter in crashed.charged
               if encounter not in crashed.conflicted}
    expected = {(key, value) for key, value, encounter in clean.charged
                if encounter not in clean.conflicted}
    assert settled == expected, "charged services differ"
    assert crashed.issued == clean.issued, "supply issues differ"


class Progress:
    """Counts, read while processes run, that tell which stage a run is in."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)

    def counts(self) -> tuple[int, int]:
        """Return (messages stored, messages processed); (0, 0) before the schema exists."""
        try:
            with self.engine.connect() as conn:
                return tuple(conn.execute(text(
                    "SELECT count(*), coalesce(sum(CASE WHEN state = 'processed' "
                    "THEN 1 ELSE 0 END), 0) FROM messages")).one())
        except SQLAlchemyError:
            return (0, 0)

    def close(self) -> None:
        self.engine.dispose()


def wait_for_stage(progress: Progress, stage: str, processes: list[subprocess.Popen[bytes]],
                   rounds: random.Random) -> None:
    """Return at a random moment of ``stage`` of this round, or when all processes ended.

    ``store`` is while messages are being stored, ``process`` while they are
    being processed, ``any`` a random time that also hits start-up and posting.
    """
    if stage == "any":
        time.sleep(rounds.uniform(0.5, 4.0))
        return
    column = 0 if stage == "store" else 1
    delay = rounds.uniform(0.0, 0.4)
    before = progress.counts()[column]
    # A stage that is over never moves again (every message stored, or a
    # worker idle). A worker without --until-idle never exits, so waiting for
    # movement alone could use up the test's time.
    deadline = time.monotonic() + STALLED_SECONDS
    while time.monotonic() < deadline:
        if all(process.poll() is not None for process in processes):
            return
        if progress.counts()[column] > before:
            time.sleep(delay)
            return
        time.sleep(0.02)


def kill_rounds(
    starters: list[list[str]], url: str, stages: tuple[str, ...], rounds: random.Random
) -> tuple[int, list[subprocess.Popen[bytes]]]:
    """Keep ``starters`` running; SIGKILL one at random ``KILLS`` times, restarting it.

    Each kill lands at a seeded random moment of a seeded random stage, so
    kills hit storing, processing and the rest whatever the machine's speed.
    Returns how many kills hit a live process and the processes still running
    afterwards. A process that ended on its own is started again, so the next
    kill has something to hit.
    """
    progress = Progress(url)
    running = [start(args) for args in starters]
    hits = 0
    try:
        for _ in range(KILLS):
            wait_for_stage(progress, rounds.choice(stages), running, rounds)
            victim = rounds.randrange(len(running))
            hits += kill(running[victim])
            for index, process in enumerate(running):
                if index == victim or process.poll() is not None:
                    if index != victim:
                        assert process.returncode == 0, errors(process)
                    running[index] = start(starters[index])
    finally:
        progress.close()
    return hits, running


def test_ingest_killed_ten_times(db_url: str, load: Path, reference: Reference) -> None:
    ingest = command("ingest", str(load), "--db", db_url, "--json")
    rounds = random.Random(SEED)
    if db_url.startswith("sqlite"):
        hits, running = kill_rounds([ingest], db_url, ("store", "process", "any"), rounds)
        finish(running[0])
    else:
        worker = command("worker", "--db", db_url, "--no-deliver")
        hits, (ingest_process, worker_process) = kill_rounds(
            [ingest, worker], db_url, ("store", "process", "any"), rounds)
        finish(ingest_process)
        worker_process.send_signal(signal.SIGTERM)
        finish(worker_process, timeout=120)
        # A killed worker may have processed a batch it never posted, and the
        # ingest may have posted before the worker's last batch committed;
        # a worker run to idle posts what is left, as an operator would.
        run_to_end(command("worker", "--db", db_url, "--until-idle", "--no-deliver"))
    assert hits >= KILLS // 2, f"only {hits} of {KILLS} kills hit a running process"
    assert_same(inspect(db_url), reference.outcome)


def test_workers_killed_ten_times(db_url: str, load: Path, reference: Reference) -> None:
    run_to_end(command("ingest", "--store-only", str(load), "--db", db_url, "--json"))
    worker = command("worker", "--db", db_url, "--until-idle", "--no-deliver")
    workers = 1 if db_url.startswith("sqlite") else 2
    hits, running = kill_rounds([worker] * workers, db_url, ("process", "process", "any"),
                                random.Random(SEED + 1))
    for process in running:
        finish(process)
    # A killed worker may have processed a batch it never posted; with
    # --until-idle no other worker is left to post it, so one more does.
    run_to_end(worker)
    assert hits >= KILLS // 2, f"only {hits} of {KILLS} kills hit a running process"
    assert_same(inspect(db_url), reference.outcome)
