"""Ledger files for ERPs that import files: CSV journal lines and beancount.

Both are written from the stored journals, so they always agree with the
database. Every line carries the charge or supply record and the message it
traces back to.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path

from sqlalchemy import Connection, select

from carebridge.config.model import Configuration
from carebridge.store.schema import journal_lines, journals

log = logging.getLogger(__name__)

JOURNAL_CSV_COLUMNS = (
    "journal_key",
    "posting_date",
    "department",
    "cost_center",
    "line_no",
    "account",
    "account_name",
    "debit",
    "credit",
    "currency",
    "source_kind",
    "source_record_id",
    "source_key",
    "source_message_id",
)


def _journal_rows(conn: Connection) -> Iterable[dict]:
    query = (
        select(
            journals.c.journal_key,
            journals.c.posting_date,
            journals.c.department,
            journals.c.cost_center,
            journals.c.currency,
            journal_lines.c.line_no,
            journal_lines.c.account,
            journal_lines.c.debit,
            journal_lines.c.credit,
            journal_lines.c.source_kind,
            journal_lines.c.source_record_id,
            journal_lines.c.source_key,
            journal_lines.c.source_message_id,
        )
        .join(journal_lines, journal_lines.c.journal_id == journals.c.id)
        .order_by(journals.c.posting_date, journals.c.id, journal_lines.c.line_no)
    )
    return conn.execute(query).mappings()


def write_journal_csv(conn: Connection, config: Configuration, path: Path) -> int:
    """Write every journal line to ``path`` as CSV; return the number of lines."""
    count = 0
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(JOURNAL_CSV_COLUMNS)
        for row in _journal_rows(conn):
            account = config.accounts[row["account"]]
            writer.writerow(
                [
                    row["journal_key"],
                    row["posting_date"].isoformat(),
                    row["department"],
                    row["cost_center"],
                    row["line_no"],
                    row["account"],
                    account.name,
                    f"{row['debit']:.2f}",
                    f"{row['credit']:.2f}",
                    row["currency"],
                    row["source_kind"],
                    row["source_record_id"],
                    row["source_key"],
                    row["source_message_id"],
                ]
            )
            count += 1
    return count


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_beancount(conn: Connection, config: Configuration, path: Path) -> int:
    """Write the journals as a beancount ledger; return the number of transactions.

    Accounts are opened on the earliest posting date. A debit is a positive
    posting and a credit a negative one, so each transaction sums to zero.
    """
    rows = list(_journal_rows(conn))
    by_journal: dict[str, list[dict]] = {}
    for row in rows:
        by_journal.setdefault(row["journal_key"], []).append(row)
    currencies = sorted({row["currency"] for row in rows}) or [config.rules.currency]
    first_date = min((row["posting_date"] for row in rows), default=None)

    with path.open("w", encoding="utf-8") as out:
        out.write(";; Written by carebridge from its stored journals.\n")
        out.write(f"option {_quote('title')} {_quote('carebridge journals')}\n")
        for currency in currencies:
            out.write(f"option {_quote('operating_currency')} {_quote(currency)}\n")
        out.write("\n")
        if first_date is not None:
            used = sorted({row["account"] for row in rows})
            for number in used:
                account = config.accounts[number]
                out.write(
                    f"{first_date.isoformat()} open {account.ledger_name} "
                    f"{','.join(currencies)}\n"
                )
            out.write("\n")
        for key, lines in by_journal.items():
            head = lines[0]
            narration = f"Journal {key} department {head['department']}"
            out.write(
                f"{head['posting_date'].isoformat()} * {_quote('carebridge')} "
                f"{_quote(narration)}\n"
            )
            out.write(f"  journal_key: {_quote(key)}\n")
            out.write(f"  cost_center: {_quote(head['cost_center'])}\n")
            for line in lines:
                amount: Decimal = line["debit"] - line["credit"]
                ledger_name = config.accounts[line["account"]].ledger_name
                out.write(f"  {ledger_name}  {amount:.2f} {line['currency']}\n")
                out.write(f"    source_kind: {_quote(line['source_kind'])}\n")
                out.write(f"    source_record: {_quote(str(line['source_record_id']))}\n")
                out.write(f"    source_message: {_quote(str(line['source_message_id']))}\n")
            out.write("\n")
    return len(by_journal)


def check_beancount(path: Path) -> list[str]:
    """Return the errors beancount finds in the ledger at ``path`` (empty if none)."""
    from beancount import loader

    _entries, errors, _options = loader.load_file(str(path))
    return [f"{error.source.get('filename')}:{error.source.get('lineno')}: {error.message}"
            if error.source else str(error.message) for error in errors]
