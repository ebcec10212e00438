"""The worker loop: process messages, post journals, build claims, deliver, until stopped.

Any number of workers, in one process or on many hosts, can share one
PostgreSQL database: message batches are claimed by lane with SKIP LOCKED,
posting is serialised by an advisory lock, and deliveries are claimed with
leases. On SQLite one process writes at a time, which suits the embedded
default of one worker.

A stop request (SIGTERM, SIGINT or :meth:`Worker.stop`) is honoured between
batches: the batch in hand commits or rolls back as a whole, so nothing is
left half done.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from carebridge.claims.step import run_claims
from carebridge.config.model import Configuration
from carebridge.engine.deliveries import run_deliveries
from carebridge.engine.intake import store_inputs
from carebridge.engine.lanes import ensure_lanes
from carebridge.engine.posting import post_journals
from carebridge.engine.processor import process_batch
from carebridge.engine.waits import resume_waits
from carebridge.errors import StoreError
from carebridge.ingest.files.sources import split_path
from carebridge.workflows.charge_capture import ChargeCapture
from carebridge.workflows.steps import run_workflow_steps

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every carebridge process.
_PG_POSTING_LOCK = 0x706F7374


def worker_id() -> str:
    """Return an id naming this process: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True)
class WorkerStats:
    """Counts since the worker started."""

    processed: int = 0
    failed: int = 0
    batches: int = 0
    journals: int = 0
    delivered: int = 0
    errors: int = 0
    files: int = 0
    claims_released: int = 0


@dataclass(slots=True)
class WorkerOptions:
    """Tuning of one worker."""

    batch_size: int = 500
    idle_seconds: float = 0.5
    post_every_seconds: float = 2.0
    deliver: bool = True
    inbox: Path | None = None
    claims: bool = True
    claims_every_seconds: float = 60.0
    claims_after_posting_seconds: float = 10.0
    recheck_held_after: dt.timedelta = dt.timedelta(minutes=5)
    owner: str = field(default_factory=worker_id)


class Worker:
    """One worker: a loop over process, post and deliver steps."""

    def __init__(self, engine: Engine, config: Configuration, options: WorkerOptions):
        self.engine = engine
        self.config = config
        self.options = options
        self.stats = WorkerStats()
        self._stopping = threading.Event()
        self._last_post = 0.0
        self._last_claims = 0.0
        self._last_steps = 0.0
        self._dirty = False

    def stop(self, *_args: object) -> None:
        """Ask the loop to stop after the batch in hand."""
        if not self._stopping.is_set():
            log.info("worker stopping", extra={"action": "worker_stop_requested",
                                               "worker": self.options.owner})
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        """Stop gracefully on SIGTERM and SIGINT (main thread only)."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal received", extra={"action": "worker_signal",
                                               "signal": signal.Signals(signum).name})
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self, *, until_idle: bool = False) -> WorkerStats:
        """Run until stopped, or with ``until_idle`` until nothing is left to do."""
        log.info("worker started", extra={"action": "worker_start",
                                          "worker": self.options.owner})
        with self.engine.begin() as conn:
            ensure_lanes(conn)
        while not self._stopping.is_set():
            try:
                busy = self.step()
            except SQLAlchemyError as exc:
                self.stats.errors += 1
                log.error("worker step failed; retrying",
                          extra={"action": "worker_retry", "worker": self.options.owner,
                                 "error_type": type(exc).__name__})
                self._stopping.wait(min(5.0, self.options.idle_seconds * 4))
                continue
            if not busy:
                if until_idle:
                    break
                self._stopping.wait(self.options.idle_seconds)
        self._post(idle=True, wait=True)
        log.info("worker stopped", extra={"action": "worker_done",
                                          "worker": self.options.owner,
                                          "processed": self.stats.processed,
                                          "failed": self.stats.failed})
        return self.stats

    def step(self) -> bool:
        """Do one round of every duty; return whether any did work."""
        busy = self._take_inbox()
        capture = ChargeCapture(self.config, dt.date.today())
        processed, failed = process_batch(
            self.engine, self.config, capture, batch_size=self.options.batch_size
        )
        if processed + failed:
            busy = True
            self._dirty = True
            self.stats.processed += processed
            self.stats.failed += failed
            self.stats.batches += 1
        resumed = resume_waits(self.engine, self.config)
        busy = busy or bool(resumed.charged or resumed.work_items or resumed.expired)
        # Stock, authorizations and procurement read what processing stored.
        # A busy worker runs them as often as it posts, not after every
        # batch: each pass reads every held issue and unread message again.
        now = time.monotonic()
        if not processed + failed or now - self._last_steps >= self.options.post_every_seconds:
            self._last_steps = now
            busy = run_workflow_steps(self.engine, self.config).busy or busy
        posted = self._post(idle=not processed + failed)
        if self.options.deliver and self.config.destinations:
            result = run_deliveries(self.engine, self.config, owner=self.options.owner)
            self.stats.delivered += result.delivered
            busy = busy or result.claimed > 0
        return busy or posted

    def _post(self, *, idle: bool, wait: bool = False) -> bool:
        """Post journals when due.

        A worker that processed messages posts as soon as it is idle; every
        worker also posts every few seconds, which picks up records that a
        worker which died before posting left behind. With ``wait`` (the
        final post before the worker exits) it waits for another poster to
        finish instead of skipping, so nothing it processed stays unposted.
        """
        now = time.monotonic()
        due = now - self._last_post >= self.options.post_every_seconds
        if not (due or (idle and self._dirty)):
            return False
        self._last_post = now
        try:
            with self.engine.connect() as conn:
                if conn.dialect.name == "postgresql":
                    # One poster at a time; the others skip instead of waiting.
                    if wait:
                        conn.execute(text("SELECT pg_advisory_lock(:key)"),
                                     {"key": _PG_POSTING_LOCK})
                        locked = True
                    else:
                        locked = conn.execute(
                            text("SELECT pg_try_advisory_lock(:key)"),
                            {"key": _PG_POSTING_LOCK},
                        ).scalar()
                    conn.commit()
                    if not locked:
                        return False
                try:
                    result = post_journals(self.engine, self.config)
                    self._claims(posted=result.journals > 0, final=wait)
                finally:
                    if conn.dialect.name == "postgresql":
                        conn.execute(text("SELECT pg_advisory_unlock(:key)"),
                                     {"key": _PG_POSTING_LOCK})
                        conn.commit()
        except StoreError as exc:
            log.warning("posting deferred", extra={"action": "post_deferred",
                                                   "error_type": type(exc).__name__})
            return False
        self._dirty = False
        self.stats.journals += result.journals
        return result.journals > 0

    def _claims(self, *, posted: bool, final: bool) -> None:
        """Run the claims step after posting, while holding the posting lock.

        It runs before the worker exits, every ``claims_every_seconds`` so
        that held claims are checked again, and after a posting once
        ``claims_after_posting_seconds`` have passed since its last run. A
        worker under steady load posts every few seconds, and the claims step
        (pyx12 validation above all) would otherwise take a large share of its
        time; a claim released within seconds of its charges gains nothing.
        """
        if not self.options.claims:
            return
        now = time.monotonic()
        since = now - self._last_claims
        due = (final or since >= self.options.claims_every_seconds
               or (posted and since >= self.options.claims_after_posting_seconds))
        if not due:
            return
        self._last_claims = now
        try:
            result = run_claims(self.engine, self.config,
                                recheck_held_after=self.options.recheck_held_after)
        except SQLAlchemyError:
            raise
        except Exception as exc:  # noqa: BLE001 - claims must not stop posting and deliveries
            log.error("claims step failed", extra={"action": "claims_failed",
                                                   "error_type": type(exc).__name__})
            return
        self.stats.claims_released += result.released

    def _take_inbox(self) -> bool:
        """Store files dropped in the inbox, then move each to ``done/``.

        A file moves only after its messages are committed, so a crash
        between the two leaves it in the inbox, and taking it again stores
        its messages as duplicates: nothing is lost and nothing posts twice.
        """
        inbox = self.options.inbox
        if inbox is None:
            return False
        done = inbox / "done"
        done.mkdir(parents=True, exist_ok=True)
        taken = False
        for path in sorted(p for p in inbox.iterdir() if p.is_file()):
            if path.name.startswith(".") or _still_written(path):
                continue
            store_inputs(self.engine, split_path(path), source=f"inbox:{inbox}")
            target = done / f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}-{path.name}"
            shutil.move(str(path), target)
            log.info("inbox file stored", extra={"action": "inbox_file", "file": path.name})
            self.stats.files += 1
            taken = True
        return taken


def _still_written(path: Path, settle_seconds: float = 1.0) -> bool:
    # A file modified within the last second may still be being written;
    # writers that rename into the inbox are never caught by this.
    return time.time() - path.stat().st_mtime < settle_seconds
