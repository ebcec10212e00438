"""Rule files: the demo versions, choice by date, and broken files named by file, line and field."""

from __future__ import annotations

import datetime as dt
import shutil
from decimal import Decimal
from pathlib import Path

import pytest

from carebridge.config import load_configuration
from carebridge.config.rules import EMPTY_RULES
from carebridge.config.rules_loader import load_rules, load_stock_counts
from carebridge.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src/carebridge/demo/config"
RULES = DEMO / "rules"
ITEMS = {"SUP-100231", "SUP-100232", "SUP-100410"}
DEPARTMENTS = {"CLINIC", "SUPPLY", "LAB"}


@pytest.fixture(scope="module")
def book():
    return load_rules(RULES, item_codes=ITEMS, departments=DEPARTMENTS)


@pytest.fixture
def rules_copy(tmp_path: Path) -> Path:
    """A rules folder containing only a copy of version 2019.1."""
    folder = tmp_path / "rules"
    folder.mkdir()
    shutil.copy(RULES / "2019.1.yaml", folder / "2019.1.yaml")
    return folder


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def _line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(needle)


def _fails(folder: Path, file: str, line: int, field: str) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        load_rules(folder, item_codes=ITEMS, departments=DEPARTMENTS)
    error = caught.value
    assert Path(error.path).name == file, str(error)
    assert error.line == line, str(error)
    assert error.field == field, str(error)
    assert f"{file}:{line}" in str(error)
    return error


def test_demo_has_two_versions_in_date_order(book):
    assert [rules.version for rules in book.versions] == ["2019.1", "2025.1"]
    assert book.versions[0].effective_from == dt.date(1990, 1, 1)
    assert all(rules.digest.startswith("sha256:") for rules in book.versions)
    assert book.versions[0].digest != book.versions[1].digest


def test_version_chosen_by_event_date(book):
    assert book.in_force(dt.date(2024, 12, 31)).version == "2019.1"
    assert book.in_force(dt.date(2025, 1, 1)).version == "2025.1"
    assert book.in_force(None).version == "2025.1"
    assert book.in_force(dt.date(1989, 12, 31)) is EMPTY_RULES


def test_controller_threshold_changes_in_2025(book):
    before = book.in_force(dt.date(2024, 6, 1)).chain_for("medical_surgical")
    after = book.in_force(dt.date(2025, 6, 1)).chain_for("medical_surgical")
    assert [(step.name, step.team) for step in before] == [
        ("materials-manager", "supply_chain"), ("controller", "finance")]
    assert before[1].from_amount == Decimal("5000")
    assert after[1].from_amount == Decimal("2500")


def test_rule_lookups(book):
    rules = book.in_force(dt.date(2021, 9, 24))
    assert rules.needs_authorization("SNOMED", "76164006")
    assert not rules.needs_authorization("SNOMED", "0000000")
    assert rules.chain_for("no_such_category") == rules.approval_chains["*"]
    assert rules.par_levels[("CLINIC", "SUP-100231")].order_up_to == Decimal("2000")
    assert rules.coding_edit("CPT", "99201").replacement == "99202"
    assert rules.price_multiplier("any", "0270") == Decimal("1.00")
    assert rules.price_multiplier("any", "0450") == Decimal(1)
    assert rules.routing["no_stock"] == "supply_chain"
    assert rules.par_auto_approve_below == Decimal("500")


def test_empty_rules_before_first_version():
    assert EMPTY_RULES.chain_for("medical_surgical") is None
    assert not EMPTY_RULES.needs_authorization("SNOMED", "76164006")


def test_configuration_carries_rules_and_counts():
    config = load_configuration(DEMO)
    assert len(config.rule_book.versions) == 2
    assert "rules/2019.1.yaml" in config.sources
    counts = {(c.location, c.item_code): c.quantity for c in config.stock_counts}
    assert counts[("CLINIC", "SUP-100231")] == Decimal("2000")


def test_negative_threshold_names_line_and_field(rules_copy):
    path = rules_copy / "2019.1.yaml"
    _edit(path, "from_amount: 5000.00", "from_amount: -5")
    error = _fails(rules_copy, "2019.1.yaml", _line_of(path, "from_amount: -5"),
                   "approvals.chains.0.steps.1.from_amount")
    assert "greater than or equal to 0" in str(error)


def test_steps_out_of_order(rules_copy):
    path = rules_copy / "2019.1.yaml"
    _edit(path, "from_amount: 5000.00", "from_amount: 0")
    _edit(path, "team: supply_chain, from_amount: 0", "team: supply_chain, from_amount: 100")
    _fails(rules_copy, "2019.1.yaml", _line_of(path, "- {name: materials-manager"),
           "approvals.chains.0.steps")


def test_unknown_item_in_par_level(rules_copy):
    path = rules_copy / "2019.1.yaml"
    _edit(path, "item_code: SUP-100410", "item_code: SUP-999")
    error = _fails(rules_copy, "2019.1.yaml", _line_of(path, "SUP-999"),
                   "supplies.par_levels.2.item_code")
    assert "SUP-999 is not in supply_items.csv" in str(error)


def test_unknown_supplier_in_par_level(rules_copy):
    path = rules_copy / "2019.1.yaml"
    _edit(path, "par: 100, order_up_to: 300, supplier: MEDLINE",
          "par: 100, order_up_to: 300, supplier: ACME")
    _fails(rules_copy, "2019.1.yaml", _line_of(path, "supplier: ACME"),
           "supplies.par_levels.2.supplier")


def test_order_up_to_not_above_par(rules_copy):
    path = rules_copy / "2019.1.yaml"
    _edit(path, "par: 100, order_up_to: 300", "par: 100, order_up_to: 50")
    _fails(rules_copy, "2019.1.yaml", _line_of(path, "order_up_to: 50"),
           "supplies.par_levels.2.order_up_to")


def test_unknown_reason_in_routing(rules_copy):
    path = rules_copy / "2019.1.yaml"
    _edit(path, "  no_stock: supply_chain", "  out_of_paper: supply_chain")
    _fails(rules_copy, "2019.1.yaml", _line_of(path, "out_of_paper"), "routing.out_of_paper")


def test_unknown_code_system_in_required(rules_copy):
    path = rules_copy / "2019.1.yaml"
    _edit(path, "{system: CPT, code: \"70450\"", "{system: XYZ, code: \"70450\"")
    _fails(rules_copy, "2019.1.yaml", _line_of(path, "system: XYZ"),
           "authorizations.required.2.system")


def test_missing_effective_from(rules_copy):
    path = rules_copy / "2019.1.yaml"
    _edit(path, "effective_from: 1990-01-01\n", "")
    # A missing key is reported at the start of the mapping that should hold it.
    error = _fails(rules_copy, "2019.1.yaml", _line_of(path, "version:"), "effective_from")
    assert "Field required" in str(error)


def test_two_files_with_one_version(rules_copy):
    copy = rules_copy / "2020.1.yaml"
    shutil.copy(rules_copy / "2019.1.yaml", copy)
    _edit(copy, "effective_from: 1990-01-01", "effective_from: 2020-01-01")
    error = _fails(rules_copy, "2020.1.yaml", _line_of(copy, "version:"), "version")
    assert "also in 2019.1.yaml" in str(error)


def test_two_files_with_one_date(rules_copy):
    copy = rules_copy / "2020.1.yaml"
    shutil.copy(rules_copy / "2019.1.yaml", copy)
    _edit(copy, 'version: "2019.1"', 'version: "2020.1"')
    _fails(rules_copy, "2020.1.yaml", _line_of(copy, "effective_from:"), "effective_from")


def test_stock_count_for_unknown_location(tmp_path):
    path = tmp_path / "stock_counts.csv"
    path.write_text("location,item_code,quantity,counted_on\n"
                    "CLINIC,SUP-100231,10,2024-01-01\n"
                    "WARD9,SUP-100231,10,2024-01-01\n")
    with pytest.raises(ConfigurationError) as caught:
        load_stock_counts(path, item_codes=ITEMS, departments=DEPARTMENTS)
    assert (caught.value.line, caught.value.field) == (3, "location")


def test_negative_stock_count(tmp_path):
    path = tmp_path / "stock_counts.csv"
    path.write_text("location,item_code,quantity,counted_on\nCLINIC,SUP-100231,-1,2024-01-01\n")
    with pytest.raises(ConfigurationError) as caught:
        load_stock_counts(path, item_codes=ITEMS, departments=DEPARTMENTS)
    assert (caught.value.line, caught.value.field) == (2, "quantity")
