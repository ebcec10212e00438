"""Tryton as the ERP: the bundled data posted into a real trytond over JSON-RPC.

Each test runs trytond 8.2 on SQLite on a free loopback port, with a copy
of a database built once per session. Results are read back from Tryton's
own tables and compared with carebridge's journals, supply issues and
purchase orders.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import DBAPIError

from carebridge.claims.invoice import claim_payload
from carebridge.config import load_configuration
from carebridge.config.model import AccountType, Configuration
from carebridge.destinations import tryton
from carebridge.engine.deliveries import (
    delivery_summary,
    enqueue,
    idempotency_key,
    replay,
    run_deliveries,
)
from carebridge.engine.job import JobOptions, run_job
from carebridge.erp.ledger import TrytonLedger
from carebridge.erp.server import TrytonSite, create_database, free_port
from carebridge.erp.setup import setup_company
from carebridge.reconcile import reconcile
from carebridge.store.db import open_engine, sqlite_url
from carebridge.store.schema import (
    approvals,
    claims,
    journal_lines,
    journals,
    messages,
    purchase_orders,
    supply_issues,
)
from carebridge.store.schema import deliveries as deliveries_table
from carebridge.workflows.procurement import (
    RequestDraft,
    create_request,
    order_payload,
    record_decision,
)

from .test_claims_demo import (
    ENCOUNTER,
    _claims_of,
    _first_delivery,
    _is_late,
    _rows,
    _write,
)
from .tryton_support import (
    BIN_DIR,
    CENT,
    DEMO,
    FIRST_YEAR,
    PASSWORD,
    PASSWORD_ENV,
    build_template,
    count_rows,
    delete_move,
    read_account_totals,
    read_books,
    read_invoices,
    read_purchases,
    server,
    site_from_template,
    write_config_dir,
)

pytestmark = pytest.mark.tryton

DESTINATION = "erp"


@pytest.fixture(scope="session")
def tryton_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A set-up Tryton SQLite database, built once per session (about 30 s)."""
    config = load_configuration(DEMO / "config")
    return build_template(tmp_path_factory.mktemp("tryton-template"), config)


@pytest.fixture()
def tryton_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)


@pytest.fixture()
def site(tryton_template: Path, tmp_path: Path, tryton_password: None):
    """A copy of the template database on a port of its own; not started."""
    return site_from_template(tryton_template, tmp_path / "tryton")


@pytest.fixture()
def running(site) -> Iterator:
    """The copy served by a running trytond."""
    with server(site) as process:
        yield process


def _engine(tmp_path: Path) -> Engine:
    return open_engine(sqlite_url(tmp_path / "carebridge.db"))


def _run_demo(engine: Engine, config: Configuration) -> dict:
    return run_job(engine, config, JobOptions(paths=[DEMO / "data"], out_dir=None))


def _drain(engine: Engine, config: Configuration, *, timeout: float = 240.0) -> None:
    """Run delivery passes until nothing is pending or in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run_deliveries(engine, config, owner="test")
        summary = _summary(engine)
        if summary["pending"] == 0 and summary["in_flight"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(
        f"deliveries did not drain within {timeout} s: {_summary(engine)}"
    )


def _summary(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return delivery_summary(conn).get(
            DESTINATION, {"pending": 0, "in_flight": 0, "delivered": 0, "dead": 0}
        )


def _expected(engine: Engine, config: Configuration) -> dict:
    """carebridge's side: per-journal totals, account and cost-center totals, issues."""
    income_types = {AccountType.REVENUE, AccountType.EXPENSE}
    with engine.connect() as conn:
        moves = {
            idempotency_key(DESTINATION, "journal", row.journal_key): (
                row.total_debit.quantize(CENT),
                row.total_credit.quantize(CENT),
            )
            for row in conn.execute(select(journals))
        }
        accounts: dict[str, list[Decimal]] = defaultdict(
            lambda: [Decimal(0), Decimal(0)]
        )
        centers: dict[str, list[Decimal]] = defaultdict(
            lambda: [Decimal(0), Decimal(0)]
        )
        for line in conn.execute(select(journal_lines)):
            accounts[line.account][0] += line.debit
            accounts[line.account][1] += line.credit
            if config.accounts[line.account].type in income_types:
                centers[line.cost_center][0] += line.debit
                centers[line.cost_center][1] += line.credit
        issues = {
            idempotency_key(DESTINATION, "supply_issue", str(row.id)): (
                row.item_code,
                row.quantity,
            )
            for row in conn.execute(select(supply_issues))
        }
        purchases = _expected_purchases(conn)
    return {
        "moves": moves,
        "accounts": {
            k: (v[0].quantize(CENT), v[1].quantize(CENT)) for k, v in accounts.items()
        },
        "centers": {
            k: (v[0].quantize(CENT), v[1].quantize(CENT)) for k, v in centers.items()
        },
        "issues": issues,
        "purchases": purchases,
    }


def _expected_purchases(conn) -> dict[str, tuple]:
    """carebridge's purchase orders by key: PO number, supplier, lines, total."""
    return {
        idempotency_key(DESTINATION, "purchase_order", row.po_number): (
            row.po_number,
            row.supplier,
            ((row.item_code, row.quantity, row.unit_cost),),
            row.amount.quantize(CENT),
        )
        for row in conn.execute(select(purchase_orders))
    }


def _assert_purchases_match(expected: dict[str, tuple], database: Path | str) -> None:
    """Each purchase order is one confirmed purchase in Tryton with the same amounts."""
    purchases = read_purchases(database)
    assert set(purchases) == set(expected)
    for key, (po_number, supplier, lines, total) in expected.items():
        found = purchases[key]
        assert found.state in {"processing", "confirmed"}, (key, found.state)
        assert found.reference == po_number, key
        assert found.supplier == supplier, key
        assert found.lines == lines, key
        assert found.total == total, key


def _assert_books_match(engine: Engine, config: Configuration, database: Path) -> None:
    expected = _expected(engine, config)
    books = read_books(database)
    assert set(books.moves) == set(expected["moves"])
    assert {state for state, _debit, _credit in books.moves.values()} == {"posted"}
    for key, (debit, credit) in expected["moves"].items():
        assert books.moves[key][1:] == (debit, credit), key
    assert books.account_totals == expected["accounts"]
    assert books.cost_center_totals == expected["centers"]
    assert set(books.stock_moves) == set(expected["issues"])
    assert {state for state, _code, _quantity in books.stock_moves.values()} == {"done"}
    for key, (item_code, quantity) in expected["issues"].items():
        assert books.stock_moves[key][1:] == (item_code, quantity), key
    _assert_purchases_match(expected["purchases"], database)


def test_outage_then_drain_matches_ledger(
    site, tmp_path: Path, tryton_password
) -> None:
    config = load_configuration(write_config_dir(tmp_path / "config", site))
    engine = _engine(tmp_path)
    summary = _run_demo(engine, config)
    assert summary["journals"]["count"] > 300

    # Tryton is not running: deliveries wait, none goes dead.
    for _ in range(5):
        run_deliveries(engine, config, owner="test")
        time.sleep(0.2)
    waiting = _summary(engine)
    assert waiting["delivered"] == 0
    assert waiting["dead"] == 0
    assert waiting["pending"] + waiting["in_flight"] > 300

    with server(site):
        _drain(engine, config)
        assert _summary(engine)["dead"] == 0
        _assert_books_match(engine, config, site.sqlite_path("erp"))

        # The same events again: every message is a duplicate, nothing new
        # is posted or delivered, and Tryton's counts do not move.
        moves_before = count_rows(site.sqlite_path("erp"), "account_move")
        stock_before = count_rows(site.sqlite_path("erp"), "stock_move")
        again = _run_demo(engine, config)
        assert again["duplicates"] == again["messages_read"]
        result = run_deliveries(engine, config, owner="test")
        assert result.claimed == 0
        assert count_rows(site.sqlite_path("erp"), "account_move") == moves_before
        assert count_rows(site.sqlite_path("erp"), "stock_move") == stock_before


def test_reconcile_finds_move_deleted_in_tryton(
    running, site, tmp_path: Path
) -> None:
    config_dir = write_config_dir(tmp_path / "config", site)
    config = load_configuration(config_dir)
    db_path = tmp_path / "carebridge.db"
    engine = open_engine(sqlite_url(db_path))
    _run_demo(engine, config)
    _drain(engine, config)
    ledger = TrytonLedger(site.client("erp", password=PASSWORD), DESTINATION)

    clean = reconcile(engine, erp=ledger, destinations=[DESTINATION])
    with engine.connect() as conn:
        journal, cancelled = conn.execute(
            select(journals).order_by(journals.c.id).limit(2)
        ).all()
        journal_count = len(conn.execute(select(journals.c.id)).all())
        first_message = min(
            conn.execute(
                select(journal_lines.c.source_message_id).where(
                    journal_lines.c.journal_id == journal.id
                )
            ).scalars()
        )
    assert clean.checked["erp_journals"] == journal_count
    assert clean.unexplained == 0

    # A posting lost in Tryton: the one unexplained difference names the
    # journal and the first message behind it.
    key = idempotency_key(DESTINATION, "journal", journal.journal_key)
    delete_move(site.sqlite_path("erp"), key)
    command = [
        str(Path(sys.executable).parent / "carebridge"),
        "reconcile",
        "--db",
        sqlite_url(db_path),
        "--config",
        str(config_dir),
        "--erp",
        DESTINATION,
        "--destination",
        DESTINATION,
        "--json",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["unexplained"] == 1
    (missing,) = [d for d in report["differences"] if not d["explained"]]
    assert missing["kind"] == "erp_missing"
    assert missing["record"] == f"journal {journal.id} ({journal.journal_key})"
    assert missing["message_id"] == first_message
    assert report["checked"]["erp_journals"] == journal_count - 1

    # A posting cancelled in Tryton stays posted beside its reversal, and
    # counts as missing too.
    client = site.client("erp", password=PASSWORD)
    cancelled_key = idempotency_key(DESTINATION, "journal", cancelled.journal_key)
    (move,) = client.search_read(
        "account.move", [("external_ref", "=", cancelled_key)], ["id"]
    )
    _cancel_move(client, move["id"])
    after_cancel = reconcile(engine, erp=ledger, destinations=[DESTINATION])
    unexplained = sorted(
        (d.kind, d.record) for d in after_cancel.differences if not d.explained
    )
    assert unexplained == [
        ("erp_missing", f"journal {journal.id} ({journal.journal_key})"),
        ("erp_missing", f"journal {cancelled.id} ({cancelled.journal_key})"),
    ]


def _cancel_move(client, move_id: int) -> None:
    """Cancel a posted move with Tryton's account.move.cancel wizard, without reversal."""
    wizard = "wizard.account.move.cancel"
    context = {
        "active_model": "account.move",
        "active_id": move_id,
        "active_ids": [move_id],
    }
    session, _start, _end = client.call(f"{wizard}.create")
    try:
        client.call(
            f"{wizard}.execute",
            session,
            {"default": {"description": None, "reversal": False}},
            "cancel",
            context=context,
        )
    finally:
        client.call(f"{wizard}.delete", session)


def _periods_of_year(client, year: int) -> list[int]:
    rows = client.search_read(
        "account.period",
        [("fiscalyear.name", "=", str(year)), ("type", "=", "standard")],
        ["id"],
    )
    return [row["id"] for row in rows]


def test_replayed_dead_letters_post_once(running, site, tmp_path: Path) -> None:
    config = load_configuration(write_config_dir(tmp_path / "config", site))
    engine = _engine(tmp_path)
    client = site.client("erp", password=PASSWORD)
    database = site.sqlite_path("erp")

    # The controller has closed the most recent year, so its journals are
    # rejected and go to the dead letters.
    _run_demo(engine, config)
    with engine.connect() as conn:
        dates = conn.execute(select(journals.c.posting_date)).scalars().all()
    closed_year = max(dates).year
    closed_journals = sum(1 for date in dates if date.year == closed_year)
    periods = _periods_of_year(client, closed_year)
    client.model("account.period", "close", periods)
    _drain(engine, config)
    with engine.connect() as conn:
        dead = (
            conn.execute(
                select(deliveries_table.c.last_error).where(
                    deliveries_table.c.state == "dead"
                )
            )
            .scalars()
            .all()
        )
    assert len(dead) == closed_journals
    assert all(
        f"no open period in Tryton contains {closed_year}-" in error for error in dead
    )

    # A response lost after Tryton committed leaves carebridge with a dead
    # delivery for a record that Tryton already has.
    with engine.begin() as conn:
        lost = (
            conn.execute(
                select(deliveries_table.c.id)
                .where(deliveries_table.c.state == "delivered")
                .order_by(deliveries_table.c.id)
                .limit(50)
            )
            .scalars()
            .all()
        )
        conn.execute(
            deliveries_table.update()
            .where(deliveries_table.c.id.in_(lost))
            .values(state="dead", last_error="response lost")
        )

    client.model("account.period", "reopen", periods)
    with engine.begin() as conn:
        replayed = replay(conn, destination=DESTINATION)
    assert len(replayed) == closed_journals + len(lost)
    _drain(engine, config)
    summary = _summary(engine)
    assert summary["pending"] == 0
    assert summary["in_flight"] == 0
    with engine.connect() as conn:
        journal_count = len(conn.execute(select(journals.c.id)).all())
        issue_count = len(conn.execute(select(supply_issues.c.id)).all())
    assert count_rows(database, "account_move") == journal_count
    assert count_rows(database, "stock_move") == issue_count
    _assert_books_match(engine, config, database)


def _worker(config_dir: Path, db_path: Path) -> subprocess.Popen[bytes]:
    command = [
        str(Path(sys.executable).parent / "carebridge"),
        "worker",
        "--db",
        sqlite_url(db_path),
        "--config",
        str(config_dir),
        "--until-idle",
    ]
    env = {**os.environ, PASSWORD_ENV: PASSWORD}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def test_killed_delivery_worker_posts_once(running, site, tmp_path: Path) -> None:
    config_dir = write_config_dir(tmp_path / "config", site, lease_seconds=3)
    config = load_configuration(config_dir)
    db_path = tmp_path / "carebridge.db"
    engine = open_engine(sqlite_url(db_path))
    _run_demo(engine, config)
    database = site.sqlite_path("erp")

    # Kill the worker once Tryton has moves whose deliveries carebridge has
    # not recorded yet, so Tryton committed and the worker dies before it
    # writes the results.
    worker = _worker(config_dir, db_path)
    killed_in_window = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and worker.poll() is None:
        in_tryton = count_rows(database, "account_move")
        if in_tryton > _summary(engine)["delivered"]:
            os.kill(worker.pid, signal.SIGKILL)
            killed_in_window = True
            break
        time.sleep(0.005)
    worker.wait(30)
    assert killed_in_window, "the worker finished before it could be killed mid-batch"
    assert _summary(engine)["in_flight"] > 0

    # After the lease expires a new worker claims the batch again.
    time.sleep(3.5)
    second = _worker(config_dir, db_path)
    assert second.wait(240) == 0, second.stderr.read().decode()[-2000:]
    summary = _summary(engine)
    assert summary["dead"] == 0
    assert summary["pending"] == 0
    assert summary["in_flight"] == 0
    _assert_books_match(engine, config, database)
    # The demo's purchase order is among the first deliveries claimed, so it
    # is in the batch that was cut off. It is still one purchase in Tryton.
    with engine.connect() as conn:
        orders = conn.execute(select(func.count()).select_from(purchase_orders))
        order_count = orders.scalar_one()
    assert order_count > 0
    assert count_rows(database, "purchase_purchase") == order_count


def test_bad_records_go_dead_alone(running, site, tmp_path: Path) -> None:
    config = load_configuration(write_config_dir(tmp_path / "config", site))
    engine = _engine(tmp_path)
    issue = {
        "item_code": "SUP-100231",
        "quantity": "3",
        "unit_cost": "0.32",
        "total_cost": "0.96",
        "currency": "USD",
        "service_date": "2024-03-01",
        "department": "CLINIC",
    }
    payloads = {
        "good-1": {"kind": "supply_issue", "issue": {**issue, "id": 1}},
        "short-stock": {
            "kind": "supply_issue",
            "issue": {**issue, "id": 2, "quantity": "1000000000"},
        },
        "unknown-item": {
            "kind": "supply_issue",
            "issue": {**issue, "id": 3, "item_code": "NOPE-1"},
        },
        "good-2": {
            "kind": "supply_issue",
            "issue": {**issue, "id": 4, "quantity": "7"},
        },
    }
    with engine.begin() as conn:
        for number, (name, payload) in enumerate(payloads.items(), start=1):
            key = idempotency_key(DESTINATION, "supply_issue", name)
            enqueue(conn, DESTINATION, "supply_issue", number, key, payload)

    _drain(engine, config)
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                deliveries_table.c.idempotency_key,
                deliveries_table.c.state,
                deliveries_table.c.last_error,
            )
        ).all()
    states = {
        row.idempotency_key.rsplit(":", 1)[1]: (row.state, row.last_error)
        for row in rows
    }
    assert states["good-1"][0] == "delivered"
    assert states["good-2"][0] == "delivered"
    assert states["short-stock"][0] == "dead"
    assert "Not enough stock" in states["short-stock"][1]
    assert states["unknown-item"][0] == "dead"
    assert "NOPE-1" in states["unknown-item"][1]

    books = read_books(site.sqlite_path("erp"))
    done = sorted(
        q for state, _code, q in books.stock_moves.values() if state == "done"
    )
    assert done == [Decimal(3), Decimal(7)]
    # The short move stays a draft under its key: a replay once stock has
    # arrived issues it instead of creating a second one.
    short = books.stock_moves[
        idempotency_key(DESTINATION, "supply_issue", "short-stock")
    ]
    assert short[0] == "draft"


def _approve_orders(
    engine: Engine, config: Configuration, orders: list[tuple[str, str, Decimal]]
) -> None:
    """Raise a department request per (supplier, item, quantity) and approve every step.

    Each approved request becomes a purchase order, enqueued to the
    destination by the procurement workflow itself.
    """
    with engine.begin() as conn:
        message_id = conn.execute(select(func.min(messages.c.id))).scalar_one()
        for number, (supplier, item_code, quantity) in enumerate(orders, start=1):
            draft = RequestDraft(
                request_key=f"tryton-test-{number}",
                origin="department",
                department="CLINIC",
                location="CLINIC",
                category="medical_surgical",
                item_code=item_code,
                quantity=quantity,
                requested_on=dt.date.today(),
                requested_by="test",
                message_id=message_id,
                supplier=supplier,
            )
            request_id = create_request(conn, config, draft)
            while True:
                step = conn.execute(
                    select(approvals.c.id).where(
                        approvals.c.request_id == request_id,
                        approvals.c.status == "open",
                    )
                ).scalar()
                if step is None:
                    break
                record_decision(conn, config, step, approved=True, actor="test")


def _deliveries_of_kind(
    engine: Engine, kind: str,
) -> dict[str, tuple[str, str | None, str | None]]:
    """Return the key suffix (PO number, claim reference) -> (state, last_error,
    response) of the newest delivery of each ``kind`` record."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                deliveries_table.c.idempotency_key,
                deliveries_table.c.state,
                deliveries_table.c.last_error,
                deliveries_table.c.response,
            )
            .where(deliveries_table.c.kind == kind)
            .order_by(deliveries_table.c.id)
        ).all()
    return {
        row.idempotency_key.rsplit(":", 1)[1]: (row.state, row.last_error, row.response)
        for row in rows
    }


def _purchase_deliveries(
    engine: Engine,
) -> dict[str, tuple[str, str | None, str | None]]:
    """Return PO number -> (state, last_error, response) of its newest delivery."""
    return _deliveries_of_kind(engine, "purchase_order")


def test_purchase_orders_reach_tryton_once(
    running, site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_configuration(
        write_config_dir(tmp_path / "config", site, kinds=["purchase_order"])
    )
    engine = _engine(tmp_path)
    database = site.sqlite_path("erp")
    # The demo run places one par-level order.
    _run_demo(engine, config)
    _approve_orders(
        engine,
        config,
        [
            ("MEDLINE", "SUP-100232", Decimal(1000)),
            ("OWENS", "SUP-100410", Decimal(40)),
            ("OWENS", "SUP-100231", Decimal(750)),
        ],
    )
    with engine.connect() as conn:
        expected = _expected_purchases(conn)
        first_order = conn.execute(select(func.min(purchase_orders.c.id))).scalar_one()
        payload = order_payload(conn, config, first_order)
    assert len(expected) == 4

    # Two orders that Tryton must reject, in the same batch as the good ones.
    unknown = json.loads(json.dumps(payload))
    unknown["purchase_order"].update(po_number="PO-UNKNOWN", supplier="ACME-SURGICAL")
    fractional = json.loads(json.dumps(payload))
    fractional["purchase_order"]["po_number"] = "PO-FRACTION"
    fractional["purchase_order"]["lines"][0]["quantity"] = "2.5"
    with engine.begin() as conn:
        for bad in (unknown, fractional):
            number = bad["purchase_order"]["po_number"]
            key = idempotency_key(DESTINATION, "purchase_order", number)
            enqueue(conn, DESTINATION, "purchase_order", first_order, key, bad)

    # Tryton goes away after quoting the batch and before confirming it: the
    # purchases stay quotations under their keys and the deliveries wait.
    def quote_then_fail(client, records: dict[int, str]) -> None:
        drafts = [record for record, state in records.items() if state == "draft"]
        client.model("purchase.purchase", "quote", drafts)
        raise tryton.TrytonUnavailable("connection reset after quote")

    interrupted = dataclasses.replace(tryton.PURCHASES, finish=quote_then_fail)
    with monkeypatch.context() as patch:
        patch.setattr(tryton, "PURCHASES", interrupted)
        run_deliveries(engine, config, owner="test")
    quoted = read_purchases(database)
    assert set(quoted) == set(expected)
    assert {purchase.state for purchase in quoted.values()} == {"quotation"}
    assert _summary(engine)["delivered"] == 0

    # The next attempts confirm the quotations instead of creating new ones.
    _drain(engine, config)
    _assert_purchases_match(expected, database)
    states = _purchase_deliveries(engine)
    assert states["PO-UNKNOWN"][0] == "dead"
    assert "supplier ACME-SURGICAL is not a party in Tryton" in states["PO-UNKNOWN"][1]
    assert states["PO-FRACTION"][0] == "dead"
    assert "Tryton rejected the record" in states["PO-FRACTION"][1]
    for number, _supplier, _lines, _total in expected.values():
        assert states[number][0] == "delivered", states[number]

    # Read back over JSON-RPC: party, lines, quantities and totals to the cent.
    client = site.client("erp", password=PASSWORD)
    rows = client.search_read(
        "purchase.purchase",
        [("external_ref", "!=", None)],
        ["external_ref", "state", "reference", "party.code", "total_amount", "lines"],
    )
    lines = {
        line["id"]: line
        for line in client.search_read(
            "purchase.line",
            [("purchase.external_ref", "!=", None)],
            ["product.code", "quantity", "unit_price", "amount"],
        )
    }
    read_back = {
        row["external_ref"]: (
            row["reference"],
            row["party."]["code"],
            tuple(
                (
                    lines[line]["product."]["code"],
                    Decimal(str(lines[line]["quantity"])),
                    lines[line]["unit_price"],
                )
                for line in row["lines"]
            ),
            row["total_amount"],
        )
        for row in rows
    }
    assert read_back == expected
    assert {row["state"] for row in rows} <= {"processing", "confirmed"}

    # Replaying every delivery sends each order again; Tryton keeps one
    # purchase per order and the two bad ones go dead again.
    with engine.begin() as conn:
        conn.execute(deliveries_table.update().values(state="dead"))
        replayed = replay(conn, destination=DESTINATION)
    assert len(replayed) == len(expected) + 2
    _drain(engine, config)
    states = _purchase_deliveries(engine)
    for number, _supplier, _lines, _total in expected.values():
        assert states[number][0] == "delivered"
        assert "(found by external_ref)" in states[number][2]
    assert states["PO-UNKNOWN"][0] == "dead"
    assert states["PO-FRACTION"][0] == "dead"
    assert count_rows(database, "purchase_purchase") == len(expected)
    _assert_purchases_match(expected, database)


def _claim_deliveries(engine: Engine) -> dict[str, tuple[str, str | None, str | None]]:
    """Return claim reference -> (state, last_error, response) of its newest delivery."""
    return _deliveries_of_kind(engine, "claim")


def _expected_invoices(engine: Engine) -> dict[str, tuple]:
    """Each claim ever released, by invoice key: reference, payer, total, lines."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(claims).where(claims.c.state.in_(("released", "replaced")))
        ).all()
        lines: dict[int, list] = defaultdict(list)
        for claim_id, line_no, amount in conn.execute(
            text("SELECT claim_id, line_no, amount FROM claim_lines ORDER BY claim_id, line_no")
        ):
            lines[claim_id].append((line_no, Decimal(str(amount)).quantize(CENT)))
    return {
        idempotency_key(DESTINATION, "claim", row.claim_reference): (
            row.claim_reference,
            "DEMOPAYER1",
            row.total.quantize(CENT),
            tuple(lines[row.id]),
        )
        for row in rows
    }


def _assert_invoices_posted(engine: Engine, invoices: dict) -> None:
    for key, (reference, payer, total, lines) in _expected_invoices(engine).items():
        found = invoices[key]
        assert found.state == "posted", key
        assert found.reference == reference, key
        assert found.payer == payer, key
        assert found.total == total, key
        assert found.lines == lines, key


def test_released_claims_become_invoices_once(running, site, tmp_path: Path) -> None:
    config = load_configuration(
        write_config_dir(tmp_path / "config", site, kinds=["claim"])
    )
    engine = _engine(tmp_path)
    database = site.sqlite_path("erp")
    run_job(engine, config, JobOptions(paths=[_first_delivery(tmp_path)], out_dir=None))
    with engine.begin() as conn:
        first_claim = conn.execute(
            select(claims.c.id).where(claims.c.state == "released").order_by(claims.c.id)
        ).scalars().first()
        unknown = claim_payload(conn, config, first_claim)
        unknown["claim"].update(claim_reference="CB-UNKNOWN", payer_id="NOPE-PAYER")
        key = idempotency_key(DESTINATION, "claim", "CB-UNKNOWN")
        enqueue(conn, DESTINATION, "claim", first_claim, key, unknown)
    _drain(engine, config)

    expected = _expected_invoices(engine)
    assert expected
    states = _claim_deliveries(engine)
    state, error, _response = states.pop("CB-UNKNOWN")
    assert state == "dead"
    assert "payer NOPE-PAYER is not a party in Tryton" in error
    assert {state for state, _error, _response in states.values()} == {"delivered"}
    invoices = read_invoices(database)
    assert set(invoices) == set(expected)
    _assert_invoices_posted(engine, invoices)

    # Each invoice moves its claim from carebridge's receivable (1200) to the
    # payer's billed receivable (1.2.1). The clearing account nets to zero
    # and no revenue is booked.
    billed = sum(total for _ref, _payer, total, _lines in expected.values())
    totals = read_account_totals(database)
    assert set(totals) == {"1.2.1", "1200", "CB-CLAIMS"}
    assert totals["1.2.1"] == (billed, Decimal(0))
    assert totals["1200"] == (Decimal(0), billed)
    assert totals["CB-CLAIMS"] == (billed, billed)

    # A replay of every delivery creates no second invoice or move.
    moves = count_rows(database, "account_move")
    with engine.begin() as conn:
        conn.execute(deliveries_table.update().values(state="dead"))
        replay(conn, destination=DESTINATION)
    _drain(engine, config)
    states = _claim_deliveries(engine)
    assert states.pop("CB-UNKNOWN")[0] == "dead"
    for state, _error, response in states.values():
        assert state == "delivered"
        assert "(found by external_ref)" in response
    assert count_rows(database, "account_invoice") == len(expected)
    assert count_rows(database, "account_move") == moves

    # A late charge replaces a released claim: the old invoice is credited,
    # never edited, and the replacement gets an invoice of its own.
    late = _write(tmp_path / "late", "procedures.csv", _rows("procedures.csv", _is_late))
    run_job(engine, config, JobOptions(paths=[late], out_dir=None))
    _drain(engine, config)
    replaced, corrected = _claims_of(engine, ENCOUNTER)
    assert replaced.state == "replaced"
    assert corrected.state == "released"
    invoices = read_invoices(database)
    credit = invoices[idempotency_key(DESTINATION, "claim", replaced.claim_reference) + ":credit"]
    assert credit.state == "posted"
    assert credit.total == -replaced.total.quantize(CENT)
    assert sum(amount for _line, amount in credit.lines) == credit.total
    assert len(invoices) == len(_expected_invoices(engine)) + 1
    _assert_invoices_posted(engine, invoices)
    assert _claim_deliveries(engine)[corrected.claim_reference][0] == "delivered"
    billed += corrected.total.quantize(CENT) - replaced.total.quantize(CENT)
    debit, credit_total = read_account_totals(database)["1.2.1"]
    assert debit - credit_total == billed
    debit, credit_total = read_account_totals(database)["1200"]
    assert credit_total - debit == billed


def test_demo_erp_reports_tryton_totals(tmp_path: Path) -> None:
    # A relative --out, as the README's `make demo` uses (carebridge-demo).
    command = [
        str(Path(sys.executable).parent / "carebridge"),
        "demo",
        "--erp",
        "--json",
        "--out",
        "demo",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    erp = summary["erp"]
    assert erp["moves"] == summary["journals"]["count"]
    assert erp["stock_moves"] == summary["supply_postings"]["count"]
    database = open_engine(sqlite_url(tmp_path / "demo" / "carebridge.db"))
    with database.connect() as conn:
        orders = conn.execute(select(func.count()).select_from(purchase_orders))
        order_count = orders.scalar_one()
    assert order_count > 0
    assert erp["purchase_orders"] == order_count
    with database.connect() as conn:
        released = conn.execute(
            select(func.count()).select_from(claims).where(claims.c.state == "released")
        ).scalar_one()
    assert released > 80
    assert erp["invoices"] == released
    assert erp["credit_notes"] == 0
    assert erp["matches_ledger"] is True
    assert erp["deliveries"]["dead"] == 0
    assert Path(erp["database"]).is_file()
    books = read_books(Path(erp["database"]))
    assert len(books.moves) == summary["journals"]["count"]


@pytest.fixture()
def tryton_pg_database(pg_admin: Engine) -> Iterator[tuple[str, str]]:
    """An empty PostgreSQL database for trytond: (name, trytond URI), dropped afterwards."""
    name = f"tryton_{uuid.uuid4().hex[:12]}"
    try:
        with pg_admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except DBAPIError as exc:
        pytest.skip(f"trytond needs a database of its own, and CREATE DATABASE failed: {exc.orig}")
    url = pg_admin.url
    credentials = url.username + (f":{url.password}" if url.password else "")
    try:
        yield name, f"postgresql://{credentials}@{url.host}:{url.port}/"
    finally:
        with pg_admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.mark.postgresql
def test_postgresql_tryton_matches_ledger(
    tryton_pg_database: tuple[str, str], tmp_path: Path, tryton_password: None
) -> None:
    # trytond's PostgreSQL backend (the trytond[postgresql] extra) needs it.
    pytest.importorskip("psycopg_pool", reason="trytond on PostgreSQL needs psycopg-pool")
    name, uri = tryton_pg_database
    site = TrytonSite(tmp_path / "tryton", port=free_port(), database_uri=uri)
    create_database(site, name, admin_password=PASSWORD, bin_dir=BIN_DIR)
    config = load_configuration(
        write_config_dir(tmp_path / "config", site, settings={"database": name})
    )
    engine = _engine(tmp_path)
    _run_demo(engine, config)
    dsn = uri + name

    with server(site, name):
        client = site.client(name, password=PASSWORD)
        years = range(FIRST_YEAR, time.gmtime().tm_year + 2)
        setup_company(client, load_configuration(DEMO / "config"), years=years)
        _drain(engine, config)
        assert _summary(engine)["dead"] == 0
        _assert_books_match(engine, config, dsn)
        moves = count_rows(dsn, "account_move")

        # A replay of everything already delivered posts nothing new.
        with engine.begin() as conn:
            conn.execute(deliveries_table.update().values(state="dead"))
            replay(conn, destination=DESTINATION)
        _drain(engine, config)
        assert count_rows(dsn, "account_move") == moves
        _assert_books_match(engine, config, dsn)
