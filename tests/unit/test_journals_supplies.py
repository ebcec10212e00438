"""Supply issues and journal building."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from carebridge.model import SupplyUse
from carebridge.model.codes import CDM, SNOMED
from carebridge.workflows.journals import Posting, build_journals
from carebridge.workflows.reasons import Reason, Rejection
from carebridge.workflows.supplies import Issued, issue_supply

from .workflow_config import make_config


def use(code: str = "337388004", quantity: str = "50", **changes: object) -> SupplyUse:
    values: dict[str, object] = {
        "usage_key": f"use-{code}",
        "code_system": SNOMED,
        "code": code,
        "quantity": Decimal(quantity),
        "service_date": dt.date(2024, 5, 1),
        "patient_id": "P1",
        "encounter_id": "E1",
        "source_message_id": 11,
    }
    values.update(changes)
    return SupplyUse(**values)  # type: ignore[arg-type]


def test_chargeable_supply_issue_and_charge() -> None:
    result = issue_supply(use(), "ambulatory", make_config())
    assert isinstance(result, Issued)
    assert result.issue.total_cost == Decimal("15.00")
    assert result.issue.expense_account == "6200"
    assert result.issue.inventory_account == "1400"
    assert result.charge_service is not None
    assert result.charge_service.code_system == CDM
    assert result.charge_service.code == "27001"
    assert result.charge_service.service_key == "supply-charge:use-337388004"


def test_non_chargeable_supply_has_no_charge() -> None:
    result = issue_supply(use("1137596000", "2"), "ambulatory", make_config())
    assert isinstance(result, Issued)
    assert result.charge_service is None
    assert result.issue.total_cost == Decimal("0.20")


@pytest.mark.parametrize(
    ("supply", "encounter_class", "reason"),
    [
        (use("42"), "ambulatory", Reason.UNKNOWN_ITEM),
        (use(), None, Reason.ENCOUNTER_NOT_FOUND),
        (use(quantity="0"), "ambulatory", Reason.UNITS_NOT_POSITIVE),
        (use("5000", "1"), "ambulatory", Reason.LOT_OR_SERIAL_MISSING),
        (use(), "hospice", Reason.DEPARTMENT_UNMAPPED),
    ],
)
def test_supply_rejections(supply: SupplyUse, encounter_class: str | None, reason: Reason) -> None:
    result = issue_supply(supply, encounter_class, make_config())
    assert isinstance(result, Rejection)
    assert result.reason is reason


def test_implant_with_serial_is_issued() -> None:
    result = issue_supply(use("5000", "1", serial_number="SN-1"), "ambulatory", make_config())
    assert isinstance(result, Issued)


def posting(kind: str, record_id: int, amount: str, department: str = "LAB",
            day: int = 1, debit: str = "1200", credit: str = "4100") -> Posting:
    return Posting(kind, record_id, f"k{record_id}", Decimal(amount), dt.date(2024, 5, day),
                   department, debit, credit, "USD", 100 + record_id)


def test_journals_group_by_date_and_department() -> None:
    postings = [
        posting("charge", 1, "45.50"),
        posting("charge", 2, "10.00", day=2),
        posting("supply", 3, "15.00", department="CLINIC", debit="6200", credit="1400"),
        posting("charge", 4, "0.30"),
    ]
    journals = build_journals(postings, make_config())
    keys = [(j.posting_date.day, j.department) for j in journals]
    assert keys == [(1, "CLINIC"), (1, "LAB"), (2, "LAB")]
    lab = journals[1]
    assert lab.total_debit == Decimal("45.80")
    assert lab.total_credit == Decimal("45.80")
    assert all(j.balanced for j in journals)
    assert lab.cost_center == "CC300"
    assert {line.source_message_id for line in lab.lines} == {101, 104}


def test_every_line_traces_to_message() -> None:
    journals = build_journals([posting("charge", 9, "1.00")], make_config())
    lines = journals[0].lines
    assert [(line.account, line.debit, line.credit) for line in lines] == [
        ("1200", Decimal("1.00"), Decimal("0.00")),
        ("4100", Decimal("0.00"), Decimal("1.00")),
    ]
    assert all(line.source_message_id == 109 for line in lines)
    assert all(line.source_key == "k9" for line in lines)
