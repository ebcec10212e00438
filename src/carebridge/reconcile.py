"""Clinical-to-finance reconciliation: did every documented event become a posting?

For each day and department, :func:`reconcile` compares what was documented
with what was posted and lists every difference, with the records and the
source message behind it:

- ``service_without_charge``: a documented service with no charge line;
- ``charge_not_journaled``: a charge line no journal carries;
- ``supply_without_issue``: a supply usage with no stock issue;
- ``supply_issue_not_journaled``: a stock issue no journal carries;
- ``message_not_processed``: a message that failed or is still waiting;
- ``journal_not_delivered``: a journal a destination has not confirmed;
- ``erp_missing`` / ``erp_amount_differs`` / ``erp_unknown``: the ledger
  compared with what the ERP holds, when an :class:`ErpLedger` is given.

A difference is *explained* when carebridge has recorded its cause: an open or
closed work item, a duplicate, a charge parked until its encounter arrives,
a delivery still in the outbox. Unexplained differences are the ones a
controller must chase; a clean run has none.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import Engine, String, and_, cast, func, literal, select

from carebridge.store.schema import (
    charge_lines,
    deliveries,
    encounters,
    journals,
    messages,
    services,
    supply_issues,
    supply_usages,
    work_items,
)
from carebridge.workflows.reasons import Reason

logger = logging.getLogger(__name__)

_STOCK_HOLDS = (Reason.NO_STOCK.value, Reason.QUANTITY_TOO_HIGH.value)
"""Work-item reasons that keep a supply issue off the shelf, and so unposted."""

_HOLDING_STATUSES = ("open", "claimed", "rejected")
"""A stock hold in these states still keeps its issue unposted."""


@dataclass(frozen=True, slots=True)
class Difference:
    """One thing documented but not posted, or posted but not matched."""

    kind: str
    day: str | None
    department: str | None
    record: str
    message_id: int | None
    explained: bool
    explanation: str
    amount: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ErpJournal:
    """A journal entry as stored in the ERP.

    ``external_key`` is the ``journal_key`` of carebridge's journal. A ledger
    whose ERP stores another key (such as a delivery's idempotency key) maps
    it back, and returns a key it cannot map as it is.
    """

    external_key: str
    debit: Decimal
    credit: Decimal


class ErpLedger(Protocol):
    """The part of an ERP that reconciliation reads: its journal entries by external key."""

    name: str

    def journals(self) -> Iterable[ErpJournal]:
        """Return every journal entry in the ERP that carebridge posted."""


@dataclass
class Report:
    """The reconciliation result; ``unexplained`` counts what needs a person."""

    differences: list[Difference] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def unexplained(self) -> int:
        return sum(1 for difference in self.differences if not difference.explained)

    def by_day_and_department(self) -> list[dict[str, Any]]:
        """Count differences per day and department, explained and not."""
        table: dict[tuple[str, str], dict[str, int]] = {}
        for difference in self.differences:
            key = (difference.day or "unknown", difference.department or "unknown")
            row = table.setdefault(key, {"explained": 0, "unexplained": 0})
            row["unexplained" if not difference.explained else "explained"] += 1
        return [
            {"day": day, "department": department, **counts}
            for (day, department), counts in sorted(table.items())
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "differences": [difference.as_dict() for difference in self.differences],
            "unexplained": self.unexplained,
            "explained": len(self.differences) - self.unexplained,
            "checked": self.checked,
            "by_day_and_department": self.by_day_and_department(),
        }

    def to_csv(self) -> str:
        buffer = io.StringIO()
        names = [name for name in Difference.__slots__]
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for difference in self.differences:
            writer.writerow(difference.as_dict())
        return buffer.getvalue()


def _day(value: dt.date | dt.datetime | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        value = value.date()
    return value.isoformat()


def _work_item_text(item_id: int | None, reason: str | None, status: str | None) -> str:
    return f"work item {item_id} ({reason}, {status})"


def reconcile(engine: Engine, *, erp: ErpLedger | None = None,
              destinations: Iterable[str] = ()) -> Report:
    """Compare documented events with postings and, when given, with the ERP.

    Args:
        engine: the carebridge database.
        erp: the ERP's ledger to compare journals with; skipped when None.
        destinations: the names of destinations that must confirm each journal.
    """
    report = Report()
    with engine.connect() as conn:
        _services(conn, report)
        _charges(conn, report)
        _supplies(conn, report)
        _messages(conn, report)
        for destination in destinations:
            _journal_deliveries(conn, report, destination)
        if erp is not None:
            _erp(conn, report, erp)
    logger.info("reconciliation: %d differences, %d unexplained",
                len(report.differences), report.unexplained)
    return report


def _services(conn: Any, report: Report) -> None:
    query = (
        select(services.c.id, services.c.service_key, services.c.message_id,
               services.c.outcome, services.c.service_date, encounters.c.department,
               work_items.c.id.label("item_id"), work_items.c.reason, work_items.c.status,
               charge_lines.c.id.label("charge_id"))
        .select_from(
            services.outerjoin(encounters, encounters.c.encounter_id == services.c.encounter_id)
            .outerjoin(work_items, work_items.c.id == services.c.work_item_id)
            .outerjoin(charge_lines, charge_lines.c.service_key == services.c.service_key)
        )
        .where(services.c.origin == "clinical")
    )
    checked = 0
    for row in conn.execute(query):
        checked += 1
        if row.charge_id is not None:
            continue
        common = {"kind": "service_without_charge", "day": _day(row.service_date),
                  "department": row.department, "record": f"service {row.id}",
                  "message_id": row.message_id}
        if row.outcome == "duplicate":
            continue  # the first copy carries the charge, or its own difference
        if row.item_id is not None:
            report.differences.append(Difference(
                **common, explained=True,
                explanation=_work_item_text(row.item_id, row.reason, row.status)))
        elif row.outcome == "waiting":
            report.differences.append(Difference(
                **common, explained=True, explanation="parked until its encounter arrives"))
        else:
            report.differences.append(Difference(
                **common, explained=False,
                explanation=f"outcome {row.outcome} but no charge line and no work item"))
    report.checked["services"] = checked


def _charges(conn: Any, report: Report) -> None:
    rows = conn.execute(
        select(charge_lines.c.id, charge_lines.c.service_date, charge_lines.c.department,
               charge_lines.c.source_message_id, charge_lines.c.amount)
        .where(charge_lines.c.journal_id.is_(None))
    )
    for row in rows:
        report.differences.append(Difference(
            kind="charge_not_journaled", day=_day(row.service_date),
            department=row.department, record=f"charge_line {row.id}",
            message_id=row.source_message_id, explained=False,
            explanation="priced but not posted; run a worker or `carebridge ingest` to post",
            amount=str(row.amount)))
    report.checked["charge_lines"] = conn.execute(
        select(func.count()).select_from(charge_lines)).scalar_one()


def _supplies(conn: Any, report: Report) -> None:
    query = (
        select(supply_usages.c.id, supply_usages.c.message_id, supply_usages.c.outcome,
               work_items.c.id.label("item_id"), work_items.c.reason, work_items.c.status,
               supply_issues.c.id.label("issue_id"))
        .select_from(
            supply_usages.outerjoin(work_items, work_items.c.id == supply_usages.c.work_item_id)
            .outerjoin(supply_issues, supply_issues.c.usage_key == supply_usages.c.usage_key)
        )
    )
    checked = 0
    for row in conn.execute(query):
        checked += 1
        if row.issue_id is not None or row.outcome == "duplicate":
            continue
        common = {"kind": "supply_without_issue", "day": None, "department": None,
                  "record": f"supply_usage {row.id}", "message_id": row.message_id}
        if row.item_id is not None:
            report.differences.append(Difference(
                **common, explained=True,
                explanation=_work_item_text(row.item_id, row.reason, row.status)))
        else:
            report.differences.append(Difference(
                **common, explained=False,
                explanation=f"outcome {row.outcome} but no stock issue and no work item"))
    report.checked["supply_usages"] = checked
    # An issue held for stock (no_stock, quantity_too_high) is journaled
    # only once it moves, so its open work item explains it.
    hold_of_issue = work_items.c.subject_key == literal("supply:", String) + supply_issues.c.usage_key
    rows = conn.execute(
        select(supply_issues.c.id, supply_issues.c.service_date, supply_issues.c.department,
               supply_issues.c.source_message_id, supply_issues.c.total_cost,
               work_items.c.id.label("item_id"), work_items.c.reason, work_items.c.status)
        .select_from(supply_issues.outerjoin(
            work_items, hold_of_issue & work_items.c.reason.in_(_STOCK_HOLDS)
            & work_items.c.status.in_(_HOLDING_STATUSES)))
        .where(supply_issues.c.journal_id.is_(None))
        .order_by(supply_issues.c.id)
    )
    seen: set[int] = set()
    for row in rows:
        if row.id in seen:
            continue
        seen.add(row.id)
        common = {"kind": "supply_issue_not_journaled", "day": _day(row.service_date),
                  "department": row.department, "record": f"supply_issue {row.id}",
                  "message_id": row.source_message_id, "amount": str(row.total_cost)}
        if row.item_id is not None:
            report.differences.append(Difference(
                **common, explained=True,
                explanation=(f"held for stock by "
                             f"{_work_item_text(row.item_id, row.reason, row.status)}; "
                             "posted when it moves")))
        else:
            report.differences.append(Difference(
                **common, explained=False,
                explanation="issued but not posted; run a worker or `carebridge ingest` to post"))


def _messages(conn: Any, report: Report) -> None:
    subject = literal("message:", String) + cast(messages.c.id, String)
    query = (
        select(messages.c.id, messages.c.state, messages.c.received_at,
               work_items.c.id.label("item_id"), work_items.c.reason, work_items.c.status)
        .select_from(messages.outerjoin(
            work_items, and_(work_items.c.message_id == messages.c.id,
                             work_items.c.subject_key == subject)))
        .where(messages.c.state.in_(("failed", "received")))
    )
    for row in conn.execute(query):
        common = {"kind": "message_not_processed", "day": _day(row.received_at),
                  "department": None, "record": f"message {row.id}", "message_id": row.id}
        if row.item_id is not None:
            report.differences.append(Difference(
                **common, explained=True,
                explanation=_work_item_text(row.item_id, row.reason, row.status)))
        elif row.state == "received":
            report.differences.append(Difference(
                **common, explained=True, explanation="stored, waiting for a worker"))
        else:
            report.differences.append(Difference(
                **common, explained=False, explanation="failed without a work item"))
    report.checked["messages"] = conn.execute(
        select(func.count()).select_from(messages)).scalar_one()


def _journal_deliveries(conn: Any, report: Report, destination: str) -> None:
    latest: Mapping[int, tuple[str, str | None]] = {}
    rows = conn.execute(
        select(deliveries.c.record_id, deliveries.c.state, deliveries.c.last_error)
        .where(deliveries.c.destination == destination, deliveries.c.kind == "journal")
        .order_by(deliveries.c.id)
    )
    for record_id, state, error in rows:
        latest[record_id] = (state, error)  # a replay supersedes its dead original
    for row in conn.execute(select(journals.c.id, journals.c.posting_date,
                                   journals.c.department, journals.c.total_debit)):
        state, error = latest.get(row.id, (None, None))
        if state == "delivered":
            continue
        explained = state in ("pending", "failed", "dead")
        explanation = {
            None: f"never queued for {destination}",
            "dead": f"dead letter at {destination}: replay it with "
                    "`carebridge deliveries replay`",
        }.get(state, f"in the outbox for {destination} ({state})")
        report.differences.append(Difference(
            kind="journal_not_delivered", day=_day(row.posting_date),
            department=row.department, record=f"journal {row.id}", message_id=None,
            explained=explained and state != "dead", explanation=explanation,
            amount=str(row.total_debit)))


def _erp(conn: Any, report: Report, erp: ErpLedger) -> None:
    held = {entry.external_key: entry for entry in erp.journals()}
    first_message: dict[int, int] = {}
    for table in (supply_issues, charge_lines):
        rows = conn.execute(
            select(table.c.journal_id, func.min(table.c.source_message_id))
            .where(table.c.journal_id.is_not(None))
            .group_by(table.c.journal_id)
        )
        for journal_id, message_id in rows:
            # A journal may carry both supply issues and charges.
            first_message[journal_id] = min(first_message.get(journal_id, message_id),
                                            message_id)
    ours = conn.execute(select(
        journals.c.id, journals.c.journal_key, journals.c.posting_date, journals.c.department,
        journals.c.total_debit, journals.c.total_credit))
    seen = set()
    for row in ours:
        seen.add(row.journal_key)
        entry = held.get(row.journal_key)
        common = {"day": _day(row.posting_date), "department": row.department,
                  "record": f"journal {row.id} ({row.journal_key})",
                  "message_id": first_message.get(row.id)}
        if entry is None:
            report.differences.append(Difference(
                kind="erp_missing", **common, explained=False,
                explanation=f"posted by carebridge, not found in {erp.name}",
                amount=str(row.total_debit)))
        elif entry.debit != row.total_debit or entry.credit != row.total_credit:
            report.differences.append(Difference(
                kind="erp_amount_differs", **common, explained=False,
                explanation=f"{erp.name} holds {entry.debit}/{entry.credit}, carebridge "
                            f"{row.total_debit}/{row.total_credit}",
                amount=str(row.total_debit - entry.debit)))
    for key, entry in held.items():
        if key not in seen:
            report.differences.append(Difference(
                kind="erp_unknown", day=None, department=None, record=key, message_id=None,
                explained=False, explanation=f"in {erp.name} but not in carebridge's ledger",
                amount=str(entry.debit)))
    report.checked["erp_journals"] = len(held)
