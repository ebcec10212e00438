"""Journals: balanced double entry per posting date and department.

A charge debits patient receivables and credits the department's revenue
account (a credit transaction reverses both sides). A supply issue debits the
department's supply expense and credits inventory. Each line names the record
and the message it came from, so a controller can trace any amount.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from carebridge.config.model import Configuration

ZERO = Decimal("0.00")


@dataclass(frozen=True, slots=True)
class Posting:
    """An amount to journal: one charge line or one supply issue."""

    kind: str  # "charge" or "supply"
    record_id: int
    key: str
    amount: Decimal
    posting_date: dt.date
    department: str
    debit_account: str
    credit_account: str
    currency: str
    source_message_id: int


@dataclass(frozen=True, slots=True)
class LineDraft:
    """One journal line before it is stored."""

    account: str
    debit: Decimal
    credit: Decimal
    source_kind: str
    source_record_id: int
    source_key: str
    source_message_id: int


@dataclass(slots=True)
class JournalDraft:
    """A journal for one posting date, department and currency."""

    posting_date: dt.date
    department: str
    cost_center: str
    currency: str
    lines: list[LineDraft] = field(default_factory=list)

    @property
    def total_debit(self) -> Decimal:
        """Sum of the debit column."""
        return sum((line.debit for line in self.lines), ZERO)

    @property
    def total_credit(self) -> Decimal:
        """Sum of the credit column."""
        return sum((line.credit for line in self.lines), ZERO)

    @property
    def balanced(self) -> bool:
        """Whether debits equal credits."""
        return self.total_debit == self.total_credit


def charge_posting(row: dict, receivable_account: str) -> Posting:
    """Return the posting of a stored charge line (a ``charge_lines`` row)."""
    amount: Decimal = row["amount"]
    debit, credit = receivable_account, row["gl_account"]
    if amount < 0:
        debit, credit = credit, debit
    return Posting(
        kind="charge",
        record_id=row["id"],
        key=row["service_key"],
        amount=abs(amount),
        posting_date=row["service_date"],
        department=row["department"],
        debit_account=debit,
        credit_account=credit,
        currency=row["currency"],
        source_message_id=row["source_message_id"],
    )


def supply_posting(row: dict) -> Posting:
    """Return the posting of a stored supply issue (a ``supply_issues`` row)."""
    return Posting(
        kind="supply",
        record_id=row["id"],
        key=row["usage_key"],
        amount=row["total_cost"],
        posting_date=row["service_date"],
        department=row["department"],
        debit_account=row["expense_account"],
        credit_account=row["inventory_account"],
        currency=row["currency"],
        source_message_id=row["source_message_id"],
    )


def build_journals(postings: list[Posting], config: Configuration) -> list[JournalDraft]:
    """Group ``postings`` into balanced journals per date, department and currency.

    Raises:
        ValueError: a journal does not balance, which would mean a bug here;
            nothing is stored in that case.
    """
    groups: dict[tuple[dt.date, str, str], list[Posting]] = defaultdict(list)
    for posting in postings:
        groups[(posting.posting_date, posting.department, posting.currency)].append(
            posting
        )
    journals = []
    for (posting_date, department, currency), members in sorted(groups.items()):
        journal = JournalDraft(
            posting_date=posting_date,
            department=department,
            cost_center=config.departments[department].cost_center,
            currency=currency,
        )
        for posting in sorted(members, key=lambda p: (p.kind, p.record_id)):
            common = (posting.kind, posting.record_id, posting.key, posting.source_message_id)
            journal.lines.append(LineDraft(posting.debit_account, posting.amount, ZERO, *common))
            journal.lines.append(LineDraft(posting.credit_account, ZERO, posting.amount, *common))
        if not journal.balanced:
            raise ValueError(
                f"journal {posting_date} {department} does not balance: "
                f"debit {journal.total_debit} credit {journal.total_credit}"
            )
        journals.append(journal)
    return journals
