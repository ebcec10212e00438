"""load_configuration on the bundled demo config and on broken copies of it."""

from __future__ import annotations

import csv
import shutil
import time
from decimal import Decimal
from pathlib import Path

import pytest

from carebridge.config import load_configuration
from carebridge.config.model import AccountType
from carebridge.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src/carebridge/demo/config"
SYNTHEA = ROOT / "src/carebridge/demo/data/synthea/csv"


@pytest.fixture(scope="module")
def demo():
    return load_configuration(DEMO)


@pytest.fixture
def config_copy(tmp_path):
    """A copy of the demo config whose chargemaster path still resolves."""
    target = tmp_path / "demo" / "config"
    shutil.copytree(DEMO, target)
    (tmp_path / "demo" / "data").symlink_to(DEMO.parent / "data")
    return target


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def _line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(needle)


def _fails(config_dir: Path, file: str, line: int, field: str) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        load_configuration(config_dir)
    error = caught.value
    assert (Path(error.path).name, error.line, error.field) == (
        Path(file).name,
        line,
        field,
    ), str(error)
    assert f"{Path(file).name}:{line}" in str(error)
    assert repr(field) in str(error)
    return error


def test_demo_config_loads_fast(demo):
    started = time.perf_counter()
    load_configuration(DEMO)
    assert time.perf_counter() - started < 2.0
    assert demo.version == "2025.1"
    assert demo.rules.currency == "USD"
    assert demo.rules.max_units == Decimal(100)
    assert demo.rules.latest_service_date is None
    assert demo.receivable_account == "1200" and demo.inventory_account == "1300"
    assert len(demo.chargemaster) == 5454
    assert demo.chargemaster_problems == ()
    assert demo.chargemaster_version.version_id == "oshpd-106361458-cdm-2018"
    assert demo.chargemaster_version.checksum.startswith("sha256:")
    assert len(demo.departments) == 14
    assert demo.accounts["4100"].type is AccountType.REVENUE
    assert demo.encounter_class_departments["E"] == "ED"
    assert demo.encounter_class_departments["wellness"] == "CLINIC"


def test_every_crosswalk_target_is_a_priced_item_with_a_department(demo):
    assert len(demo.crosswalk) == 82
    for (system, code), charge_code in demo.crosswalk.items():
        item = demo.chargemaster[charge_code]
        assert item.department in demo.departments, (system, code, item)
        department = demo.departments[item.department]
        assert department.revenue_account in demo.accounts


def test_items_get_revenue_code_and_department_from_ranges(demo):
    cbc = demo.chargemaster["3711319"]
    assert (cbc.hcpcs, cbc.revenue_code, cbc.department) == ("85025", "0300", "LAB")
    er = demo.chargemaster["8000430"]
    assert (er.revenue_code, er.department) == ("0450", "ED")
    vaccine = demo.chargemaster["1283202"]
    assert (vaccine.revenue_code, vaccine.department) == ("0636", "PHARM")
    assert (
        demo.chargemaster["10001"].revenue_code is None
    )  # no CPT code, no revenue code


def _coverage(file: str, system: str, crosswalk) -> int:
    with (SYNTHEA / file).open(newline="") as handle:
        return sum((system, row["CODE"]) in crosswalk for row in csv.DictReader(handle))


def test_synthea_coverage(demo):
    assert _coverage("procedures.csv", "SNOMED", demo.crosswalk) == 144  # of 889
    assert _coverage("encounters.csv", "SNOMED", demo.crosswalk) == 251  # of 388
    assert _coverage("immunizations.csv", "CVX", demo.crosswalk) == 14  # of 129
    # Assessments with no chargeable service stay unmapped: a person decides.
    assert ("SNOMED", "710824005") not in demo.crosswalk


def test_supply_items_cover_synthea_and_fhir_codes(demo):
    with (SYNTHEA / "supplies.csv").open(newline="") as handle:
        codes = {row["CODE"] for row in csv.DictReader(handle)}
    assert codes | {"337388004", "1137596000"} <= {
        code for _, code in demo.supply_items
    }
    assert demo.supply_items[("SNOMED", "337388004")].unit_cost == Decimal("0.32")


def test_wrong_type_in_yaml_names_line_and_field(config_copy):
    path = config_copy / "carebridge.yaml"
    _edit(path, "max_units: 100", "max_units: lots")
    _fails(
        config_copy, "carebridge.yaml", _line_of(path, "max_units"), "rules.max_units"
    )


def test_missing_yaml_field_points_at_its_mapping(config_copy):
    path = config_copy / "carebridge.yaml"
    _edit(path, "  version_id: oshpd-106361458-cdm-2018\n", "")
    _fails(
        config_copy,
        "carebridge.yaml",
        _line_of(path, "  path: ../data"),
        "chargemaster.version_id",
    )


def test_duplicate_yaml_key(config_copy):
    path = config_copy / "carebridge.yaml"
    _edit(path, "currency: USD\n", "currency: USD\ncurrency: EUR\n")
    _fails(config_copy, "carebridge.yaml", _line_of(path, "currency: EUR"), "currency")


def test_unknown_account_in_departments(config_copy):
    path = config_copy / "departments.yaml"
    _edit(path, 'revenue_account: "4300"', 'revenue_account: "4399"')
    _fails(
        config_copy,
        "departments.yaml",
        _line_of(path, '"4399"'),
        "departments.2.revenue_account",
    )


def test_unknown_receivable_account(config_copy):
    path = config_copy / "carebridge.yaml"
    _edit(path, 'receivable: "1200"', 'receivable: "1299"')
    _fails(
        config_copy,
        "carebridge.yaml",
        _line_of(path, "receivable:"),
        "accounts.receivable",
    )


def test_bad_ledger_root(config_copy):
    path = config_copy / "accounts.csv"
    _edit(path, "revenue,Income:Revenue:Pharmacy", "revenue,Expenses:Revenue:Pharmacy")
    _fails(
        config_copy,
        "accounts.csv",
        _line_of(path, "Expenses:Revenue:Pharmacy"),
        "ledger_name",
    )


def test_wrong_account_type_in_csv(config_copy):
    path = config_copy / "accounts.csv"
    _edit(path, "1300,Supplies Inventory,asset", "1300,Supplies Inventory,stock")
    _fails(config_copy, "accounts.csv", _line_of(path, "1300,"), "type")


def test_duplicate_account_number(config_copy):
    path = config_copy / "accounts.csv"
    _edit(path, "4860,", "4850,")
    _fails(config_copy, "accounts.csv", _line_of(path, "PostAcute") - 0, "number")


def test_missing_csv_column(config_copy):
    path = config_copy / "supply_items.csv"
    _edit(path, "unit_cost,", "cost,")
    _fails(config_copy, "supply_items.csv", 1, "unit_cost")


def test_crosswalk_target_not_in_chargemaster(config_copy):
    path = config_copy / "crosswalks" / "cvx_immunizations.csv"
    _edit(path, "CVX,33,1283202", "CVX,33,9999999")
    _fails(
        config_copy, "cvx_immunizations.csv", _line_of(path, "9999999"), "charge_code"
    )


def test_crosswalk_unknown_code_system(config_copy):
    path = config_copy / "crosswalks" / "cvx_immunizations.csv"
    _edit(path, "CVX,33,", "ICD9,33,")
    _fails(
        config_copy, "cvx_immunizations.csv", _line_of(path, "ICD9"), "source_system"
    )


def test_undefined_department(config_copy):
    path = config_copy / "encounter_class_departments.csv"
    _edit(path, "emergency,synthea,ED", "emergency,synthea,EMERG")
    _fails(
        config_copy,
        "encounter_class_departments.csv",
        _line_of(path, "EMERG"),
        "department",
    )


def test_overlapping_revenue_code_ranges(config_copy):
    path = config_copy / "revenue_codes.csv"
    _edit(path, "CPT,99281,99288,0450", "CPT,99211,99288,0450")
    _fails(
        config_copy, "revenue_codes.csv", _line_of(path, "99211,99288"), "range_start"
    )


def test_revenue_code_without_department(config_copy):
    path = config_copy / "revenue_codes.csv"
    _edit(path, "CPT,90785,90899,0900", "CPT,90785,90899,0990")
    _fails(config_copy, "revenue_codes.csv", _line_of(path, "0990"), "revenue_code")


def test_chargeable_supply_needs_charge_code(config_copy):
    path = config_copy / "supply_items.csv"
    _edit(path, "0.06,false,false,", "0.06,false,true,")
    _fails(config_copy, "supply_items.csv", _line_of(path, "1137596000"), "charge_code")


def test_invalid_yaml_syntax(config_copy):
    path = config_copy / "departments.yaml"
    _edit(path, "departments:\n", "departments: [\n")
    with pytest.raises(
        ConfigurationError, match=r"departments\.yaml:\d+: not valid YAML"
    ):
        load_configuration(config_copy)
