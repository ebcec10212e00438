"""Reconciliation finds nothing unexplained on the demo data, and exactly what was lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sqlalchemy import Engine, delete, func, select

from carebridge.config.model import Configuration
from carebridge.engine.job import JobOptions, run_job
from carebridge.reconcile import ErpJournal, reconcile
from carebridge.store.schema import charge_lines, journals, services

from .conftest import DEMO


def run_demo(engine: Engine, config: Configuration, tmp_path: Path) -> None:
    data = DEMO / "data"
    run_job(engine, config, JobOptions(
        paths=[data / "hl7v2", data / "synthea" / "csv"], out_dir=tmp_path / "out"))


class LedgerCopy:
    """An ERP ledger read from carebridge's own journals, minus the dropped keys."""

    name = "copy"

    def __init__(self, engine: Engine, drop: set[str]) -> None:
        with engine.connect() as conn:
            self.rows = [
                ErpJournal(row.journal_key, row.total_debit, row.total_credit)
                for row in conn.execute(select(journals)) if row.journal_key not in drop
            ]

    def journals(self) -> list[ErpJournal]:
        return self.rows


def test_demo_run_has_no_unexplained_difference(
    engine: Engine, config: Configuration, tmp_path: Path, db_url: str
) -> None:
    run_demo(engine, config, tmp_path)
    report = reconcile(engine)
    assert report.unexplained == 0
    with engine.connect() as conn:
        documented = conn.execute(
            select(func.count()).select_from(services).where(services.c.origin == "clinical")
        ).scalar_one()
    assert report.checked["services"] == documented > 1000
    assert len(report.differences) > 0  # work items explain the uncharged services

    result = subprocess.run(
        [sys.executable, "-m", "carebridge", "reconcile", "--db", db_url, "--json"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["unexplained"] == 0
    assert isinstance(body["differences"], list)
    assert len(body["differences"]) == len(report.differences)


def test_one_lost_charge_is_the_one_difference(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    run_demo(engine, config, tmp_path)
    with engine.begin() as conn:
        lost = conn.execute(select(charge_lines).order_by(charge_lines.c.id.desc())).first()
        conn.execute(delete(charge_lines).where(charge_lines.c.id == lost.id))
        service_id = conn.execute(select(services.c.id).where(
            services.c.service_key == lost.service_key, services.c.outcome == "charged")
        ).scalar_one()
    unexplained = [d for d in reconcile(engine).differences if not d.explained]
    assert len(unexplained) == 1
    assert unexplained[0].kind == "service_without_charge"
    assert unexplained[0].record == f"service {service_id}"
    assert unexplained[0].message_id == lost.source_message_id


def test_journal_missing_from_the_erp_is_reported_with_its_message(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    run_demo(engine, config, tmp_path)
    with engine.connect() as conn:
        journal = conn.execute(select(journals).order_by(journals.c.id)).first()
        source = conn.execute(select(charge_lines.c.source_message_id).where(
            charge_lines.c.journal_id == journal.id).order_by(
            charge_lines.c.source_message_id)).first()
    assert reconcile(engine, erp=LedgerCopy(engine, set())).unexplained == 0
    report = reconcile(engine, erp=LedgerCopy(engine, {journal.journal_key}))
    unexplained = [d for d in report.differences if not d.explained]
    assert [d.kind for d in unexplained] == ["erp_missing"]
    assert unexplained[0].record == f"journal {journal.id} ({journal.journal_key})"
    if source is not None:
        assert unexplained[0].message_id == source[0]
