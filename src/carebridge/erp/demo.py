"""Post a finished run into a Tryton database of its own, for ``carebridge demo --erp``.

The demo creates a SQLite Tryton database in ``OUT/tryton``, or reuses it
when the carebridge database is kept between runs. It starts trytond on a
free loopback port and delivers every journal, supply issue, purchase
order and released claim through the outbox with a ``tryton`` destination. Then it reads the results back over
JSON-RPC and stops the server. Creating the database takes about 25 s on
top of the run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import secrets
import shutil
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from carebridge.claims.invoice import CLAIM, claim_payload
from carebridge.config.model import Configuration, DestinationConfig
from carebridge.destinations.tryton import CREDIT
from carebridge.engine.deliveries import (
    delivery_summary,
    enqueue,
    enqueue_journals,
    enqueue_supply_issues,
    idempotency_key,
    run_deliveries,
)
from carebridge.erp.rpc import TrytonClient
from carebridge.erp.server import (
    TrytonServer,
    TrytonSite,
    create_database,
    free_port,
)
from carebridge.erp.setup import setup_company
from carebridge.store.schema import (
    claims,
    journal_lines,
    journals,
    purchase_orders,
    supply_issues,
)
from carebridge.workflows.procurement import PURCHASE_ORDER, order_payload

log = logging.getLogger(__name__)

DATABASE = "erp"
DESTINATION = "tryton-demo"
CENT = Decimal("0.01")


def post_run_to_tryton(
    engine: Engine, config: Configuration, folder: Path, *, fresh: bool
) -> dict[str, Any]:
    """Deliver the database's journals, supply issues, purchase orders and claims to a demo Tryton.

    Args:
        engine: The carebridge database of the run.
        config: The run's configuration; a ``tryton`` destination named
            ``tryton-demo`` is added to it.
        folder: Where the Tryton database, its configuration and log live.
        fresh: Build a new Tryton database even if one exists. The demo
            passes True when its carebridge database is new too, because
            journal keys restart with a new carebridge database.

    Returns:
        The ``erp`` object of the summary: counts read from Tryton and
        whether its totals per account equal carebridge's ledger.
    """
    started = time.perf_counter()
    # trytond-admin and trytond run from folders of their own, so a relative
    # folder (the demo's default ``carebridge-demo``) would point elsewhere.
    folder = folder.resolve()
    site = TrytonSite(folder, port=free_port())
    password_file = folder / "admin-password"
    created = fresh or not site.sqlite_path(DATABASE).exists()
    if created:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        password_file.write_text(secrets.token_urlsafe(16) + "\n", encoding="utf-8")
        password_file.chmod(0o600)
        create_database(site, DATABASE, admin_password=_password(password_file))
    destination = DestinationConfig(
        name=DESTINATION,
        type="tryton",
        kinds=("journal", "supply_issue", PURCHASE_ORDER, CLAIM),
        settings={
            "port": site.port,
            "database": DATABASE,
            "password_file": str(password_file),
        },
        batch_size=100,
        backoff_base_seconds=0.1,
        backoff_cap_seconds=2.0,
        circuit_cooldown_seconds=1.0,
    )
    config = dataclasses.replace(
        config, destinations=(*config.destinations, destination)
    )
    with TrytonServer(site, DATABASE):
        client = site.client(DATABASE, password=_password(password_file))
        if created:
            setup_company(client, config, years=_years(engine))
        _enqueue_all(engine, config)
        delivered = _drain(engine, config)
        erp = _read_back(client, engine)
    erp.update(
        {
            "database": str(site.sqlite_path(DATABASE)),
            "deliveries": delivered,
            "elapsed_seconds": round(time.perf_counter() - started, 3),
        }
    )
    return erp


def _password(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


def _years(engine: Engine) -> range:
    with engine.connect() as conn:
        first, last = conn.execute(
            select(func.min(journals.c.posting_date), func.max(journals.c.posting_date))
        ).one()
    today = dt.date.today()
    first = first or today
    last = max(last or today, today)
    return range(first.year, last.year + 1)


def _enqueue_all(engine: Engine, config: Configuration) -> None:
    # The run posted before the destination existed; enqueue() returns the
    # existing delivery for a key already promised, so this is repeatable.
    with engine.begin() as conn:
        journal_ids = conn.execute(select(journals.c.id)).scalars().all()
        issue_ids = conn.execute(select(supply_issues.c.id)).scalars().all()
        enqueue_journals(conn, config, journal_ids)
        enqueue_supply_issues(conn, config, issue_ids)
        # place_order enqueues an order for the destinations configured when
        # it was placed, which did not include this one.
        orders = conn.execute(
            select(purchase_orders.c.id, purchase_orders.c.po_number).order_by(
                purchase_orders.c.id
            )
        ).all()
        for order_id, po_number in orders:
            key = idempotency_key(DESTINATION, PURCHASE_ORDER, po_number)
            payload = order_payload(conn, config, order_id)
            enqueue(conn, DESTINATION, PURCHASE_ORDER, order_id, key, payload)
        # Likewise for claims: every claim ever released, by id, so a
        # replaced claim's invoice is created before its credit note.
        if config.billing is not None:
            released = conn.execute(
                select(claims.c.id, claims.c.claim_reference)
                .where(claims.c.state.in_(("released", "replaced")))
                .order_by(claims.c.id)
            ).all()
            for claim_id, reference in released:
                key = idempotency_key(DESTINATION, CLAIM, reference)
                payload = claim_payload(conn, config, claim_id)
                enqueue(conn, DESTINATION, CLAIM, claim_id, key, payload)


def _drain(
    engine: Engine, config: Configuration, *, timeout: float = 600.0
) -> dict[str, int]:
    only_tryton = dataclasses.replace(
        config,
        destinations=tuple(d for d in config.destinations if d.name == DESTINATION),
    )
    deadline = time.monotonic() + timeout
    while True:
        run_deliveries(engine, only_tryton, owner="carebridge-demo")
        with engine.connect() as conn:
            counts = delivery_summary(conn).get(DESTINATION, {})
        if not counts.get("pending") and not counts.get("in_flight"):
            return counts
        if time.monotonic() > deadline:
            log.warning(
                "demo deliveries to Tryton did not finish",
                extra={"action": "tryton_demo_timeout", **counts},
            )
            return counts
        time.sleep(0.1)


def _read_back(client: TrytonClient, engine: Engine) -> dict[str, Any]:
    """Count what reached Tryton and compare its totals per account with the ledger.

    Only journal moves are compared. A claim invoice and the move that
    clears it move the claim total from carebridge's receivable account to
    the payer's billed receivable, which carebridge's ledger does not book.
    """
    keyed = [("external_ref", "!=", None)]
    journal_prefix = idempotency_key(DESTINATION, "journal", "")
    journal_moves = [("external_ref", "like", journal_prefix + "%")]

    moves = client.model("account.move", "search_count", journal_moves)
    stock_moves = client.model(
        "stock.move", "search_count", [*keyed, ("state", "=", "done")]
    )
    purchase_orders = client.model("purchase.purchase", "search_count", keyed)
    credit_notes = [("external_ref", "like", "%" + CREDIT)]
    invoices = client.model(
        "account.invoice",
        "search_count",
        [*keyed, ("state", "in", ["posted", "paid"]),
         ("external_ref", "not like", "%" + CREDIT)],
    )
    credits = client.model(
        "account.invoice",
        "search_count",
        [*credit_notes, ("state", "in", ["posted", "paid"])],
    )

    tryton_totals: dict[str, list[Decimal]] = defaultdict(
        lambda: [Decimal(0), Decimal(0)]
    )
    lines = client.search_read(
        "account.move.line",
        [("move.external_ref", "like", journal_prefix + "%"),
         ("move.state", "=", "posted")],
        ["debit", "credit", "account.code"],
    )
    for line in lines:
        code = line["account."]["code"]
        tryton_totals[code][0] += line["debit"]
        tryton_totals[code][1] += line["credit"]

    ledger: dict[str, list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
    with engine.connect() as conn:
        for account, debit, credit in conn.execute(
            select(
                journal_lines.c.account, journal_lines.c.debit, journal_lines.c.credit
            )
        ):
            ledger[account][0] += debit
            ledger[account][1] += credit

    matches = _cents(tryton_totals) == _cents(ledger)
    return {
        "moves": moves,
        "stock_moves": stock_moves,
        "purchase_orders": purchase_orders,
        "invoices": invoices,
        "credit_notes": credits,
        "matches_ledger": matches,
    }


def _cents(totals: dict[str, list[Decimal]]) -> dict[str, tuple[Decimal, Decimal]]:
    return {
        account: (debit.quantize(CENT), credit.quantize(CENT))
        for account, (debit, credit) in totals.items()
    }
