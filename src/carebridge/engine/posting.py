"""Post journals for charge lines and supply issues not yet journaled.

Journals, their lines and the ``journal_id`` marks on the posted records
commit in one transaction, so a record is journaled exactly once however
often posting runs. Where the configuration keeps stock, a supply issue is
journaled only after its stock move exists; one held for stock waits.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, Table, func, select, text

from carebridge.config.model import Configuration
from carebridge.destinations.dft import enqueue_charge_lines
from carebridge.engine.batch_write import insert_returning_ids, insert_rows
from carebridge.engine.deliveries import enqueue_journals, enqueue_supply_issues
from carebridge.errors import StoreError
from carebridge.store.schema import (
    charge_lines,
    journal_lines,
    journals,
    stock_moves,
    supply_issues,
)
from carebridge.workflows.journals import (
    JournalDraft,
    build_journals,
    charge_posting,
    supply_posting,
)
from carebridge.workflows.stock import tracks_stock

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every carebridge process
# and differ from the worker's posting lock.
_SLICE_LOCK = 0x736C6963

_LINES_PER_INSERT = 2000


@dataclass(frozen=True, slots=True)
class PostingResult:
    """Counts of the journals and lines one posting pass wrote."""

    batch: int | None
    journals: int
    lines: int
    batches: tuple[int, ...] = ()


def post_journals(
    engine: Engine, config: Configuration, *, slice_size: int = 5000
) -> PostingResult:
    """Journal every unjournaled charge line and supply issue.

    Records are posted in slices of at most ``slice_size`` charge lines and
    as many supply issues, one posting batch and transaction per slice, so
    memory stays flat however large the backlog is.
    """
    batches: list[int] = []
    journal_count = line_count = 0
    while True:
        result = _post_slice(engine, config, slice_size)
        if result.batch is None:
            break
        batches.append(result.batch)
        journal_count += result.journals
        line_count += result.lines
    return PostingResult(
        batch=batches[-1] if batches else None,
        journals=journal_count,
        lines=line_count,
        batches=tuple(batches),
    )


def _post_slice(engine: Engine, config: Configuration, limit: int) -> PostingResult:
    """Journal up to ``limit`` charge lines and ``limit`` supply issues in one batch."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Posting batches are numbered max + 1, so two processes posting
            # at once (an ingest and a worker) would pick the same number.
            # The lock ends with the transaction; SQLite's BEGIN IMMEDIATE
            # already serialises writers.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SLICE_LOCK})
        charges = conn.execute(
            select(charge_lines)
            .where(charge_lines.c.journal_id.is_(None))
            .order_by(charge_lines.c.id)
            .limit(limit)
        ).mappings().all()
        unposted = supply_issues.c.journal_id.is_(None)
        if tracks_stock(config):
            # Where stock is kept, an issue costs money only once it has
            # left the shelf: one held for stock (a no_stock or
            # quantity_too_high work item) waits for its stock move.
            unposted &= supply_issues.c.id.in_(
                select(stock_moves.c.supply_issue_id).where(
                    stock_moves.c.supply_issue_id.is_not(None)))
        issues = conn.execute(
            select(supply_issues)
            .where(unposted)
            .order_by(supply_issues.c.id)
            .limit(limit)
        ).mappings().all()
        postings = [charge_posting(dict(row), config.receivable_account) for row in charges]
        postings += [supply_posting(dict(row)) for row in issues]
        if not postings:
            return PostingResult(batch=None, journals=0, lines=0)

        drafts = build_journals(postings, config)
        batch = (conn.execute(select(func.max(journals.c.posting_batch))).scalar() or 0) + 1
        now = dt.datetime.now(dt.UTC)
        journal_ids = insert_returning_ids(conn, journals, [
            {
                "journal_key": (
                    f"{batch}:{draft.posting_date.isoformat()}:"
                    f"{draft.department}:{draft.currency}"
                ),
                "posting_batch": batch,
                "posting_date": draft.posting_date,
                "department": draft.department,
                "cost_center": draft.cost_center,
                "currency": draft.currency,
                "total_debit": draft.total_debit,
                "total_credit": draft.total_credit,
                "created_at": now,
            }
            for draft in drafts
        ])
        # Lines go in a few thousand at a time, so memory does not grow with
        # the slice.
        line_count = 0
        lines: list[dict[str, object]] = []
        for draft, journal_id in zip(drafts, journal_ids, strict=True):
            lines += [
                {
                    "journal_id": journal_id,
                    "line_no": number,
                    "account": line.account,
                    "debit": line.debit,
                    "credit": line.credit,
                    "cost_center": draft.cost_center,
                    "source_kind": line.source_kind,
                    "source_record_id": line.source_record_id,
                    "source_key": line.source_key,
                    "source_message_id": line.source_message_id,
                }
                for number, line in enumerate(draft.lines, start=1)
            ]
            if len(lines) >= _LINES_PER_INSERT:
                insert_rows(conn, journal_lines, lines)
                line_count += len(lines)
                lines = []
        insert_rows(conn, journal_lines, lines)
        line_count += len(lines)
        _mark_journaled(conn, drafts, journal_ids)
        # The outbox rows commit with the journals, so every journal is
        # promised to each destination exactly when it exists.
        enqueue_journals(conn, config, journal_ids, now=now)
        # Billing systems get each charge line once it is journaled, in the
        # same transaction, so a charge is never billed without its journal.
        enqueue_charge_lines(conn, config, [row["id"] for row in charges], now=now)
        # Stock systems get each supply issue with the journal that costs it.
        enqueue_supply_issues(conn, config, [row["id"] for row in issues], now=now)
    log.info(
        "journals posted",
        extra={"action": "journals_posted", "batch": batch, "journals": len(drafts),
               "lines": line_count},
    )
    return PostingResult(batch=batch, journals=len(drafts), lines=line_count)


def _mark_journaled(conn: Connection, drafts: list[JournalDraft],
                    journal_ids: list[int]) -> None:
    """Set ``journal_id`` on every record the drafts post, one statement per table.

    Raises:
        StoreError: a record was journaled by another posting pass meanwhile.
    """
    journal_of: dict[str, dict[int, int]] = defaultdict(dict)
    for draft, journal_id in zip(drafts, journal_ids, strict=True):
        for line in draft.lines:
            journal_of[line.source_kind][line.source_record_id] = journal_id
    tables = {"charge": charge_lines, "supply": supply_issues}
    for kind, records in journal_of.items():
        table = tables[kind]
        marked = _set_journal_ids(conn, table, records)
        if marked != len(records):
            # Another posting pass journaled some of these records after this
            # one read them; raising rolls this whole pass back.
            raise StoreError(
                f"{len(records) - marked} {kind} records were journaled by a "
                "concurrent posting pass; run posting again"
            )


def _set_journal_ids(conn: Connection, table: Table, records: dict[int, int]) -> int:
    """Set ``journal_id`` of each record still without one; return how many were set."""
    if conn.dialect.name == "postgresql":
        return conn.execute(
            text(
                f"UPDATE {table.name} SET journal_id = posted.journal_id "
                "FROM unnest(CAST(:ids AS integer[]), CAST(:journal_ids AS integer[])) "
                f"AS posted(id, journal_id) WHERE {table.name}.id = posted.id "
                f"AND {table.name}.journal_id IS NULL"
            ),
            {"ids": list(records), "journal_ids": list(records.values())},
        ).rowcount
    by_journal: dict[int, list[int]] = defaultdict(list)
    for record_id, journal_id in records.items():
        by_journal[journal_id].append(record_id)
    marked = 0
    for journal_id, record_ids in by_journal.items():
        marked += conn.execute(
            table.update()
            .where(table.c.id.in_(sorted(record_ids)), table.c.journal_id.is_(None))
            .values(journal_id=journal_id)
        ).rowcount
    return marked
