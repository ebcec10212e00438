"""The main job: ingest files, process them, post journals, write outputs.

Each run gets a row in ``runs``. Its summary counts the messages that run
read and what it created from the messages it processed. A second run over
the same input therefore shows every message as a duplicate and posts
nothing.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select

from carebridge.claims.outputs import claims_summary, write_claim_files
from carebridge.claims.step import run_claims
from carebridge.config.model import Configuration
from carebridge.destinations.ledger import (
    check_beancount,
    write_beancount,
    write_journal_csv,
)
from carebridge.engine.intake import IntakeResult, store_inputs
from carebridge.engine.posting import post_journals
from carebridge.engine.processor import process_pending
from carebridge.ingest.files.sources import RawInput, discover, split_path
from carebridge.store.schema import (
    charge_lines,
    journals,
    messages,
    runs,
    services,
    supply_issues,
    work_items,
)
from carebridge.workflows.steps import run_workflow_steps

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``."""


@dataclass(frozen=True, slots=True)
class JobOptions:
    """Inputs and output folder of one run."""

    paths: Sequence[Path]
    out_dir: Path | None
    source: str = "files"
    as_of: dt.date | None = None


def start_run(engine: Engine, command: str, config: Configuration) -> int:
    """Insert a ``runs`` row and return its id."""
    with engine.begin() as conn:
        return conn.execute(
            insert(runs).values(
                command=command,
                started_at=dt.datetime.now(dt.UTC),
                chargemaster_version=config.chargemaster_version.version_id,
            )
        ).inserted_primary_key[0]


def ingest_files(
    engine: Engine,
    paths: Sequence[Path],
    *,
    source: str,
    run_id: int,
    progress: ProgressCallback | None = None,
) -> IntakeResult:
    """Store every message of the files under ``paths``, file by file."""
    found = discover(paths)
    files = found.files
    total = IntakeResult()
    total.skipped_files = [(str(path), reason) for path, reason in found.skipped]
    for path, reason in found.skipped:
        log.info("file skipped", extra={"action": "file_skipped", "file": str(path),
                                        "reason": reason})
    total.add(store_inputs(engine, inputs_of(files, progress), source=source, run_id=run_id))
    return total


def inputs_of(files: Sequence[Path], progress: ProgressCallback | None = None
              ) -> Iterator[RawInput]:
    """Yield the messages of ``files`` in order, reporting each file once it is read.

    The messages of many small files (one HL7 v2 message each, say) share a
    transaction, where a transaction per file cost more than the file.
    """
    for number, path in enumerate(files, start=1):
        yield from split_path(path)
        if progress:
            progress("ingest", number, len(files))


def run_job(
    engine: Engine,
    config: Configuration,
    options: JobOptions,
    *,
    command: str = "demo",
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Run the main job and return its summary (see :func:`summarize`)."""
    started = time.perf_counter()
    run_id = start_run(engine, command, config)
    log.info("run started", extra={"action": "run_start", "run_id": run_id})

    intake = ingest_files(
        engine, options.paths, source=options.source, run_id=run_id, progress=progress
    )
    with engine.connect() as conn:
        pending = conn.execute(
            select(func.count()).select_from(messages).where(messages.c.state == "received")
        ).scalar_one()
    done = 0

    def on_batch(count: int) -> None:
        nonlocal done
        done += count
        if progress:
            progress("process", done, pending)

    process_pending(engine, config, as_of=options.as_of, run_id=run_id, progress=on_batch)
    # Stock, authorizations and procurement read what processing stored.
    run_workflow_steps(engine, config, as_of=options.as_of, until_idle=True)
    posting = post_journals(engine, config)
    run_claims(engine, config, run_id=run_id)
    outputs = write_outputs(engine, config, options.out_dir) if options.out_dir else {}

    elapsed = time.perf_counter() - started
    with engine.begin() as conn:
        conn.execute(
            runs.update().where(runs.c.id == run_id).values(finished_at=dt.datetime.now(dt.UTC))
        )
    with engine.connect() as conn:
        summary = summarize(conn, run_id, posting_batches=posting.batches)
    summary["messages_by_format"] = dict(sorted(intake.by_format.items()))
    summary["files_skipped"] = [
        {"path": path, "reason": reason} for path, reason in intake.skipped_files
    ]
    summary["elapsed_seconds"] = round(elapsed, 3)
    summary["messages_per_second"] = round(intake.read / elapsed, 1) if elapsed else None
    summary["database"] = engine.url.render_as_string(hide_password=True)
    summary["chargemaster"] = {
        "version": config.chargemaster_version.version_id,
        "items": len(config.chargemaster),
        "bad_rows": len(config.chargemaster_problems),
    }
    summary["outputs"] = {name: str(path) for name, path in outputs.items()}
    if "beancount" in outputs:
        errors = check_beancount(outputs["beancount"])
        summary["ledger_check"] = {"ok": not errors, "errors": errors[:20]}
    log.info("run finished", extra={"action": "run_done", "run_id": run_id})
    return summary


def money(value: Decimal | None) -> str:
    """Format an amount as a string with two decimals."""
    return f"{(value or Decimal(0)):.2f}"


def _count(conn: Connection, query) -> int:
    return conn.execute(query).scalar_one()


def _sum(conn: Connection, column, *where) -> Decimal:
    # Summed in Python: SQLite stores these as text and SUM() would use floats.
    values = conn.execute(select(column).where(*where)).scalars()
    return sum(values, Decimal(0))


def summarize(
    conn: Connection, run_id: int, *, posting_batches: tuple[int, ...]
) -> dict[str, Any]:
    """Count what run ``run_id`` read, and what it created from what it processed.

    A run also processes messages an earlier, stopped run stored, so service,
    charge and work-item counts follow the run that processed each message.
    The identity ``services == charged + work_items + duplicates + waiting``
    holds for documented (clinical) services, where ``waiting`` counts charges
    parked until their encounter is registered. Chargeable supplies add
    charges of their own, reported under ``charges.from_supplies``.
    """
    run_messages = select(messages.c.id).where(messages.c.processed_run_id == run_id)
    in_run = services.c.message_id.in_(run_messages)

    def services_with(*where) -> int:
        return _count(conn, select(func.count()).select_from(services).where(in_run, *where))

    clinical = services.c.origin == "clinical"
    accounted = {
        "charged": services_with(clinical, services.c.outcome == "charged"),
        "work_items": services_with(clinical, services.c.outcome == "work_item"),
        "duplicates": services_with(clinical, services.c.outcome == "duplicate"),
        "waiting": services_with(clinical, services.c.outcome == "waiting"),
    }
    service_total = services_with(clinical)
    accounted["identity_holds"] = service_total == (
        accounted["charged"] + accounted["work_items"] + accounted["duplicates"]
        + accounted["waiting"]
    )

    charge_where = (charge_lines.c.source_message_id.in_(run_messages),)
    supply_charge = charge_lines.c.service_key.like("supply-charge:%")
    issue_where = (supply_issues.c.source_message_id.in_(run_messages),)
    item_where = work_items.c.message_id.in_(run_messages)
    by_reason = dict(
        conn.execute(
            select(work_items.c.reason, func.count())
            .where(item_where)
            .group_by(work_items.c.reason)
            .order_by(work_items.c.reason)
        ).all()
    )
    message_states = dict(
        conn.execute(
            select(messages.c.state, func.count())
            .where(messages.c.run_id == run_id)
            .group_by(messages.c.state)
        ).all()
    )
    journal_where = journals.c.posting_batch.in_(posting_batches or (-1,))
    journal_rows = conn.execute(
        select(journals.c.total_debit, journals.c.total_credit).where(journal_where)
    ).all()
    all_balanced = all(row.total_debit == row.total_credit for row in
                       conn.execute(select(journals.c.total_debit, journals.c.total_credit)))
    return {
        "run_id": run_id,
        "messages_read": sum(message_states.values()),
        "duplicates": message_states.get("duplicate", 0),
        "messages_failed": message_states.get("failed", 0),
        "services": service_total,
        "services_accounted": accounted,
        "charges": {
            "count": _count(conn, select(func.count()).select_from(charge_lines).where(*charge_where)),
            "total": money(_sum(conn, charge_lines.c.amount, *charge_where)),
            "from_services": accounted["charged"],
            "from_supplies": _count(
                conn,
                select(func.count()).select_from(charge_lines).where(*charge_where, supply_charge),
            ),
        },
        "supply_postings": {
            "count": _count(conn, select(func.count()).select_from(supply_issues).where(*issue_where)),
            "total_cost": money(_sum(conn, supply_issues.c.total_cost, *issue_where)),
        },
        "journals": {
            "count": len(journal_rows),
            "balanced": all(row.total_debit == row.total_credit for row in journal_rows),
            "debit_total": money(sum((row.total_debit for row in journal_rows), Decimal(0))),
            "credit_total": money(sum((row.total_credit for row in journal_rows), Decimal(0))),
            "ledger_balanced": all_balanced,
        },
        "work_items": {"total": sum(by_reason.values()), "by_reason": by_reason},
        "claims": claims_summary(conn, run_id),
    }


def write_outputs(engine: Engine, config: Configuration, out_dir: Path) -> dict[str, Path]:
    """Write the journal CSV, beancount ledger, charges, work items and claims to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "journal_csv": out_dir / "journal_lines.csv",
        "beancount": out_dir / "ledger.beancount",
        "charges_csv": out_dir / "charge_lines.csv",
        "work_items_csv": out_dir / "work_items.csv",
    }
    with engine.connect() as conn:
        write_journal_csv(conn, config, paths["journal_csv"])
        write_beancount(conn, config, paths["beancount"])
        _write_table(conn, charge_lines, paths["charges_csv"])
        _write_table(conn, work_items, paths["work_items_csv"])
        if config.billing is not None:
            paths["claims_dir"] = out_dir / "claims"
            write_claim_files(conn, paths["claims_dir"])
    return paths


def _write_table(conn: Connection, table, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([column.name for column in table.columns])
        for row in conn.execute(select(table).order_by(table.c.id)):
            writer.writerow(["" if value is None else value for value in row])
