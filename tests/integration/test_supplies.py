"""Supply consumption on real Synthea rows: issues at cost, charges when billable."""

from __future__ import annotations

import datetime as dt
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from sqlalchemy import Engine, select

from carebridge.config import load_configuration
from carebridge.config.model import Configuration
from carebridge.engine.job import JobOptions, run_job
from carebridge.store.schema import (
    charge_lines,
    journal_lines,
    services,
    supply_issues,
    supply_usages,
    work_items,
)

from .conftest import DEMO

SALINE_CHARGE_CODE = "1285141"  # SODIUM CHLORIDE 0.9% 10ML INJ SYG, HCPCS A4216, $29.00


@pytest.fixture()
def chargeable_config(tmp_path: Path) -> Configuration:
    """The demo configuration with Synthea's 'Solution' supply made chargeable."""
    folder = tmp_path / "config"
    shutil.copytree(DEMO / "config", folder)
    settings_path = folder / "carebridge.yaml"
    settings = yaml.safe_load(settings_path.read_text())
    house = (DEMO / "config" / settings["chargemaster"]["path"]).resolve()
    text = settings_path.read_text().replace(settings["chargemaster"]["path"], str(house))
    settings_path.write_text(text)
    items = folder / "supply_items.csv"
    lines = items.read_text().splitlines()
    patched = []
    for line in lines:
        if line.startswith("SNOMED,8537005,"):
            cells = line.split(",")
            cells[6], cells[7] = "true", SALINE_CHARGE_CODE
            line = ",".join(cells)
        patched.append(line)
    items.write_text("\n".join(patched) + "\n")
    return load_configuration(folder)


def synthea_subset(tmp_path: Path) -> Path:
    folder = tmp_path / "synthea"
    folder.mkdir()
    for name in ("patients.csv", "encounters.csv", "supplies.csv"):
        shutil.copy(DEMO / "data" / "synthea" / "csv" / name, folder / name)
    return folder


def test_supplies_issue_at_cost(engine: Engine, config: Configuration, tmp_path: Path) -> None:
    summary = run_job(
        engine, config,
        JobOptions(paths=[synthea_subset(tmp_path)], out_dir=None, as_of=dt.date(2024, 6, 1)),
    )
    with engine.connect() as conn:
        issues = conn.execute(select(supply_issues)).all()
        outcomes = conn.execute(select(supply_usages.c.outcome)).scalars().all()
    assert len(outcomes) == 47
    assert len(issues) == outcomes.count("issued")
    for issue in issues:
        assert issue.total_cost == (issue.unit_cost * issue.quantity).quantize(Decimal("0.01"))
        assert issue.inventory_account == config.inventory_account
        assert issue.expense_account == config.departments[issue.department].supply_expense_account
    assert summary["supply_postings"]["count"] == len(issues)
    assert summary["journals"]["balanced"] is True


def test_chargeable_supply_becomes_charge(
    engine: Engine, chargeable_config: Configuration, tmp_path: Path
) -> None:
    summary = run_job(
        engine, chargeable_config,
        JobOptions(paths=[synthea_subset(tmp_path)], out_dir=None, as_of=dt.date(2024, 6, 1)),
    )
    with engine.connect() as conn:
        charges = conn.execute(
            select(charge_lines).where(charge_lines.c.service_key.like("supply-charge:%"))
        ).all()
        saline_issues = conn.execute(
            select(supply_issues).where(supply_issues.c.item_code == "SUP-100410")
        ).all()
        kinds = conn.execute(select(journal_lines.c.source_kind)).scalars().all()
    # Both uses leave stock; the 2005 one is older than the earliest service
    # date the rules charge automatically, so its charge waits for a person.
    assert len(saline_issues) == 2
    assert len(charges) == 1
    assert charges[0].charge_code == SALINE_CHARGE_CODE
    assert charges[0].amount == Decimal("29.00") * charges[0].units
    assert summary["charges"]["from_supplies"] == 1
    with engine.connect() as conn:
        held = conn.execute(
            select(work_items.c.reason)
            .join(services, services.c.work_item_id == work_items.c.id)
            .where(services.c.origin == "supply")
        ).scalars().all()
    assert held == ["date_out_of_range"]
    assert summary["services"] == summary["services_accounted"]["charged"] + summary[
        "services_accounted"]["work_items"] + summary["services_accounted"]["duplicates"]
    assert set(kinds) == {"charge", "supply"}
