"""Helpers for the Tryton tests: build a database once, copy it, read its tables.

Building a database with every module takes about 25 s, so the tests build
one template per session and give each test a copy made with SQLite's
backup API. Results are read from Tryton's own tables in its SQLite file
(read-only), not through carebridge.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
import sys
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
import yaml

from carebridge.config.model import Configuration
from carebridge.erp.server import (
    TrytonServer,
    TrytonSite,
    copy_sqlite_database,
    create_database,
    free_port,
)
from carebridge.erp.setup import setup_company

DEMO = Path(str(resources.files("carebridge").joinpath("demo")))
DATABASE = "erp"
PASSWORD = "admin"
PASSWORD_ENV = "CAREBRIDGE_TEST_TRYTON_PASSWORD"
BIN_DIR = Path(sys.executable).parent
CENT = Decimal("0.01")
FIRST_YEAR = 1990
"""The oldest posting date in the bundled data is in 1992."""
CLAIM_KEYS = "carebridge:%:claim:%"
"""The keys of the moves that clear claim invoices, which are not journals."""


def build_template(folder: Path, config: Configuration) -> Path:
    """Create a set-up Tryton database in ``folder``; return its SQLite file."""
    site = TrytonSite(folder, port=free_port())
    create_database(site, DATABASE, admin_password=PASSWORD, bin_dir=BIN_DIR)
    with TrytonServer(site, DATABASE, bin_dir=BIN_DIR):
        client = site.client(DATABASE, password=PASSWORD)
        setup_company(client, config, years=range(FIRST_YEAR, dt.date.today().year + 2))
    return site.sqlite_path(DATABASE)


def site_from_template(template: Path, folder: Path) -> TrytonSite:
    """Copy the template database into ``folder`` and return a site on a free port."""
    site = TrytonSite(folder, port=free_port())
    copy_sqlite_database(template, site.sqlite_path(DATABASE))
    site.write_config()
    return site


def server(site: TrytonSite, database: str = DATABASE) -> TrytonServer:
    return TrytonServer(site, database, bin_dir=BIN_DIR)


def write_config_dir(
    target: Path, site: TrytonSite, **destination_overrides: object
) -> Path:
    """Copy the demo configuration to ``target`` with a ``tryton`` destination."""
    shutil.copytree(DEMO / "config", target)
    main = target / "carebridge.yaml"
    document = yaml.safe_load(main.read_text(encoding="utf-8"))
    # The chargemaster path is relative to the bundled folder.
    document["chargemaster"]["path"] = str(
        (DEMO / "config" / document["chargemaster"]["path"]).resolve()
    )
    destination = {
        "name": "erp",
        "type": "tryton",
        "kinds": ["journal", "supply_issue", "purchase_order"],
        "settings": {
            "port": site.port,
            "database": DATABASE,
            "password_env": PASSWORD_ENV,
        },
        "batch_size": 100,
        "backoff_base_seconds": 0.05,
        "backoff_cap_seconds": 0.5,
        "circuit_cooldown_seconds": 0.5,
    }
    settings_overrides = destination_overrides.pop("settings", {})
    destination["settings"].update(settings_overrides)  # type: ignore[union-attr]
    destination.update(destination_overrides)
    document["destinations"] = [destination]
    main.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return target


@dataclass(frozen=True)
class TrytonBooks:
    """What Tryton contains, read from its tables."""

    moves: dict[str, tuple[str, Decimal, Decimal]]
    """external_ref -> (state, total debit, total credit), over journal moves."""
    account_totals: dict[str, tuple[Decimal, Decimal]]
    """account code -> (debit, credit), over carebridge's journal moves."""
    cost_center_totals: dict[str, tuple[Decimal, Decimal]]
    """analytic account code -> (debit, credit)."""
    stock_moves: dict[str, tuple[str, str, Decimal]]
    """external_ref -> (state, product code, quantity)."""


def _number(value: object) -> Decimal:
    # Tryton's SQLite backend stores Numeric values as text, or as bytes.
    if isinstance(value, bytes):
        value = value.decode("ascii")
    return Decimal(str(value))


def _money(value: object) -> Decimal:
    return _number(value).quantize(CENT)


def _connect(database: Path | str) -> Any:
    """Open a Tryton database read-only: a SQLite file, or a PostgreSQL URL."""
    if isinstance(database, Path):
        return sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    connection = psycopg.connect(database, autocommit=True)
    connection.read_only = True
    return connection


def read_books(database: Path | str) -> TrytonBooks:
    """Read carebridge's moves, analytic lines and stock moves from a Tryton database."""
    connection = _connect(database)
    try:
        moves: dict[str, tuple[str, Decimal, Decimal]] = {}
        rows = connection.execute(
            "SELECT m.external_ref, m.state, l.debit, l.credit FROM account_move m "
            "JOIN account_move_line l ON l.move = m.id WHERE m.external_ref IS NOT NULL "
            f"AND m.external_ref NOT LIKE '{CLAIM_KEYS}'"
        )
        sums: dict[str, list] = {}
        for ref, state, debit, credit in rows:
            entry = sums.setdefault(ref, [state, Decimal(0), Decimal(0)])
            entry[1] += _money(debit)
            entry[2] += _money(credit)
        moves = {
            ref: (state, debit, credit) for ref, (state, debit, credit) in sums.items()
        }

        accounts: dict[str, list[Decimal]] = defaultdict(
            lambda: [Decimal(0), Decimal(0)]
        )
        rows = connection.execute(
            "SELECT a.code, l.debit, l.credit FROM account_move_line l "
            "JOIN account_move m ON l.move = m.id JOIN account_account a ON l.account = a.id "
            f"WHERE m.external_ref IS NOT NULL AND m.external_ref NOT LIKE '{CLAIM_KEYS}'"
        )
        for code, debit, credit in rows:
            accounts[code][0] += _money(debit)
            accounts[code][1] += _money(credit)

        centers: dict[str, list[Decimal]] = defaultdict(
            lambda: [Decimal(0), Decimal(0)]
        )
        rows = connection.execute(
            "SELECT a.code, al.debit, al.credit FROM analytic_account_line al "
            "JOIN analytic_account_account a ON al.account = a.id"
        )
        for code, debit, credit in rows:
            centers[code][0] += _money(debit)
            centers[code][1] += _money(credit)

        stock: dict[str, tuple[str, str, Decimal]] = {}
        rows = connection.execute(
            "SELECT s.external_ref, s.state, t.code, s.quantity FROM stock_move s "
            "JOIN product_product p ON s.product = p.id "
            "JOIN product_template t ON p.template = t.id WHERE s.external_ref IS NOT NULL"
        )
        for ref, state, code, quantity in rows:
            stock[ref] = (state, code, _number(quantity))
    finally:
        connection.close()
    return TrytonBooks(
        moves=moves,
        account_totals={k: (v[0], v[1]) for k, v in accounts.items()},
        cost_center_totals={k: (v[0], v[1]) for k, v in centers.items()},
        stock_moves=stock,
    )


@dataclass(frozen=True)
class TrytonPurchase:
    """A purchase.purchase that carries an external key, read from Tryton's tables."""

    state: str
    reference: str
    supplier: str
    """The party's code."""
    total: Decimal | None
    """The total Tryton stores when it confirms the purchase, or None before that."""
    lines: tuple[tuple[str, Decimal, Decimal], ...]
    """(product code, quantity, unit price) per line, in line order."""


def read_purchases(database: Path | str) -> dict[str, TrytonPurchase]:
    """Read carebridge's purchases from a Tryton database, by external_ref (read-only)."""
    connection = _connect(database)
    try:
        lines: dict[int, list[tuple[str, Decimal, Decimal]]] = defaultdict(list)
        rows = connection.execute(
            "SELECT l.purchase, t.code, l.quantity, l.unit_price FROM purchase_line l "
            "JOIN product_product p ON l.product = p.id "
            "JOIN product_template t ON p.template = t.id "
            "ORDER BY l.purchase, l.sequence, l.id"
        )
        for purchase, code, quantity, unit_price in rows:
            lines[purchase].append((code, _number(quantity), _number(unit_price)))
        rows = connection.execute(
            "SELECT p.id, p.external_ref, p.state, p.reference, pp.code, "
            "p.total_amount_cache FROM purchase_purchase p "
            "JOIN party_party pp ON p.party = pp.id WHERE p.external_ref IS NOT NULL"
        )
        purchases = {
            ref: TrytonPurchase(
                state=state,
                reference=reference,
                supplier=supplier,
                total=_money(total) if total is not None else None,
                lines=tuple(lines[purchase]),
            )
            for purchase, ref, state, reference, supplier, total in rows
        }
    finally:
        connection.close()
    return purchases


@dataclass(frozen=True)
class TrytonInvoice:
    """An account.invoice that carries an external key, read from Tryton's tables."""

    state: str
    reference: str
    payer: str
    """The party's code."""
    total: Decimal | None
    """The total Tryton stores when it posts the invoice, or None before that."""
    lines: tuple[tuple[int, Decimal], ...]
    """(sequence, quantity times unit price) per line, in line order."""


def read_invoices(database: Path | str) -> dict[str, TrytonInvoice]:
    """Read carebridge's invoices and credit notes from a Tryton database, by external_ref."""
    connection = _connect(database)
    try:
        lines: dict[int, list[tuple[int, Decimal]]] = defaultdict(list)
        rows = connection.execute(
            "SELECT invoice, sequence, quantity, unit_price FROM account_invoice_line "
            "ORDER BY invoice, sequence, id"
        )
        for invoice, sequence, quantity, unit_price in rows:
            amount = (_number(quantity) * _number(unit_price)).quantize(CENT)
            lines[invoice].append((sequence, amount))
        rows = connection.execute(
            "SELECT i.id, i.external_ref, i.state, i.reference, p.code, "
            "i.total_amount_cache FROM account_invoice i "
            "JOIN party_party p ON i.party = p.id WHERE i.external_ref IS NOT NULL"
        )
        invoices = {
            ref: TrytonInvoice(
                state=state,
                reference=reference,
                payer=payer,
                total=_money(total) if total is not None else None,
                lines=tuple(lines[invoice]),
            )
            for invoice, ref, state, reference, payer, total in rows
        }
    finally:
        connection.close()
    return invoices


def read_account_totals(database: Path | str) -> dict[str, tuple[Decimal, Decimal]]:
    """Return (debit, credit) per account code over every posted move in Tryton."""
    connection = _connect(database)
    try:
        totals: dict[str, list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
        rows = connection.execute(
            "SELECT a.code, l.debit, l.credit FROM account_move_line l "
            "JOIN account_move m ON l.move = m.id "
            "JOIN account_account a ON l.account = a.id WHERE m.state = 'posted'"
        )
        for code, debit, credit in rows:
            totals[code][0] += _money(debit)
            totals[code][1] += _money(credit)
    finally:
        connection.close()
    return {code: (debit, credit) for code, (debit, credit) in totals.items()}


def count_rows(database: Path | str, table: str) -> int:
    """Count the rows of ``table`` that carry an external key (read-only)."""
    connection = _connect(database)
    try:
        return connection.execute(
            f"SELECT count(*) FROM {table} WHERE external_ref IS NOT NULL"
        ).fetchone()[0]
    finally:
        connection.close()


def delete_move(database: Path, external_ref: str) -> None:
    """Delete a posted move, its lines and their analytic lines from Tryton's SQLite file.

    trytond 8.2 rejects deleting a posted move over RPC, and its cancel
    wizard keeps the move and adds a reversal. SQL makes a posting disappear
    as a lost or hand-deleted one would.
    """
    connection = sqlite3.connect(database, timeout=10)
    try:
        with connection:
            (move,) = connection.execute(
                "SELECT id FROM account_move WHERE external_ref = ?", (external_ref,)
            ).fetchone()
            connection.execute(
                "DELETE FROM analytic_account_line WHERE move_line IN "
                "(SELECT id FROM account_move_line WHERE move = ?)",
                (move,),
            )
            connection.execute("DELETE FROM account_move_line WHERE move = ?", (move,))
            connection.execute("DELETE FROM account_move WHERE id = ?", (move,))
    finally:
        connection.close()
