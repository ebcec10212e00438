"""Charge capture: pricing, the order of checks, and each reason code."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal

import pytest

from carebridge.config.rules import CodingEdit, PricingRule, RuleBook, RuleSet
from carebridge.model import ChargeLine, Service, ServiceKind, TransactionType
from carebridge.model.codes import CPT, SNOMED
from carebridge.workflows.charge_capture import ChargeCapture, to_cents
from carebridge.workflows.reasons import Reason, Rejection

from .workflow_config import make_config

AS_OF = dt.date(2024, 6, 1)


def service(**changes: object) -> Service:
    base = Service(
        service_key="svc-1",
        kind=ServiceKind.PROCEDURE,
        code_system=SNOMED,
        code="9564003",
        quantity=Decimal("1"),
        service_date=dt.date(2024, 5, 1),
        patient_id="P1",
        encounter_id="E1",
        source_message_id=7,
    )
    return dataclasses.replace(base, **changes)


def price(svc: Service, encounter_found: bool = True) -> ChargeLine | Rejection:
    return ChargeCapture(make_config(), AS_OF).price(svc, encounter_found)


def test_chargemaster_price_times_units() -> None:
    line = price(service(quantity=Decimal("3")))
    assert isinstance(line, ChargeLine)
    assert line.amount == Decimal("136.50")
    assert line.unit_price == Decimal("45.50")
    assert line.charge_code == "30001"
    assert line.source_message_id == 7


def test_revenue_code_from_hcpcs_range() -> None:
    line = price(service())
    assert isinstance(line, ChargeLine)
    assert line.revenue_code == "0300"
    assert line.department == "LAB"
    assert line.gl_account == "4100"


def test_revenue_code_prefix_maps_department() -> None:
    line = price(service(code_system=CPT, code="99213"))
    assert isinstance(line, ChargeLine)
    assert line.revenue_code == "0510"
    assert line.department == "CLINIC"


def test_source_amount_kept_as_sent() -> None:
    svc = service(
        code_system=CPT,
        code="99213",
        amount=Decimal("80.00"),
        unit_price=Decimal("80.00"),
    )
    line = price(svc)
    assert isinstance(line, ChargeLine)
    assert line.amount == Decimal("80.00")
    assert str(line.amount) == "80.00"


def test_source_amount_inconsistent_with_units() -> None:
    svc = service(
        code_system=CPT,
        code="99213",
        quantity=Decimal("2"),
        amount=Decimal("39.00"),
        unit_price=Decimal("19.00"),
    )
    result = price(svc)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.AMOUNT_MISMATCH
    assert "39.00" in result.detail


def test_credit_is_negative() -> None:
    line = price(service(transaction_type=TransactionType.CREDIT))
    assert isinstance(line, ChargeLine)
    assert line.amount == Decimal("-45.50")


@pytest.mark.parametrize(
    ("changes", "encounter_found", "reason"),
    [
        ({}, False, Reason.ENCOUNTER_NOT_FOUND),
        ({"encounter_id": None}, True, Reason.ENCOUNTER_NOT_FOUND),
        ({"quantity": Decimal("0")}, True, Reason.UNITS_NOT_POSITIVE),
        ({"quantity": Decimal("-1")}, True, Reason.UNITS_NOT_POSITIVE),
        ({"quantity": Decimal("1000")}, True, Reason.UNITS_TOO_HIGH),
        ({"service_date": None}, True, Reason.DATE_MISSING),
        ({"service_date": dt.date(2009, 12, 31)}, True, Reason.DATE_OUT_OF_RANGE),
        ({"service_date": dt.date(2026, 1, 1)}, True, Reason.DATE_OUT_OF_RANGE),
        ({"code": "0000"}, True, Reason.UNKNOWN_CODE),
        ({"code": "123"}, True, Reason.PRICE_MISSING),
        ({"code_system": CPT, "code": "99499"}, True, Reason.PRICE_MISSING),
        ({"currency": "EUR"}, True, Reason.CURRENCY_MISMATCH),
    ],
)
def test_rejection_reasons(
    changes: dict, encounter_found: bool, reason: Reason
) -> None:
    result = price(service(**changes), encounter_found)
    assert isinstance(result, Rejection)
    assert result.reason is reason
    assert result.detail


def test_unknown_code_names_value() -> None:
    result = price(service(code="424242"))
    assert isinstance(result, Rejection)
    assert "424242" in result.detail
    assert "SNOMED" in result.detail


def test_rounding_is_half_up() -> None:
    assert to_cents(Decimal("0.125")) == Decimal("0.13")
    assert to_cents(Decimal("0.135")) == Decimal("0.14")
    assert to_cents(Decimal("-0.125")) == Decimal("-0.13")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"amount": Decimal("0.00")}, Reason.AMOUNT_INVALID),
        ({"unit_price": Decimal("-50")}, Reason.AMOUNT_INVALID),
        ({"unit_price": Decimal("0.001")}, Reason.AMOUNT_INVALID),
        ({"amount": Decimal("12.345")}, Reason.AMOUNT_MISMATCH),
        ({"amount": Decimal("999999999.00")}, Reason.AMOUNT_TOO_HIGH),
        ({"quantity": Decimal("1.5")}, Reason.UNITS_NOT_WHOLE),
    ],
)
def test_sent_price_checks(changes: dict, reason: Reason) -> None:
    result = price(service(code_system=CPT, code="99213", **changes))
    assert isinstance(result, Rejection)
    assert result.reason is reason


def test_unit_price_derived_to_cent() -> None:
    svc = service(code_system=CPT, code="99213", quantity=Decimal("3"), amount=Decimal("100.00"))
    line = price(svc)
    assert isinstance(line, ChargeLine)
    assert line.amount == Decimal("100.00")
    assert line.unit_price == Decimal("33.33")


def test_credit_with_positive_amount() -> None:
    svc = service(
        code_system=CPT, code="99213", amount=Decimal("80.00"),
        transaction_type=TransactionType.CREDIT,
    )
    line = price(svc)
    assert isinstance(line, ChargeLine)
    assert line.amount == Decimal("-80.00")


def rules_from(day: dt.date, **fields: object) -> RuleBook:
    return RuleBook((RuleSet(version="test.1", effective_from=day, **fields),))


def test_coding_edit_replaces_code() -> None:
    edits = {(CPT, "99201"): CodingEdit(CPT, "99201", "replace", "99213", "deleted code")}
    config = make_config(rule_book=rules_from(dt.date(2024, 1, 1), coding_edits=edits))
    line = ChargeCapture(config, AS_OF).price(service(code_system=CPT, code="99201"), True)
    assert isinstance(line, ChargeLine)
    assert line.charge_code == "51001"
    assert line.hcpcs == "99213"


def test_coding_edit_reject_names_code() -> None:
    edits = {(CPT, "99213"): CodingEdit(CPT, "99213", "reject", None, "bundled into 99215")}
    config = make_config(rule_book=rules_from(dt.date(2024, 1, 1), coding_edits=edits))
    result = ChargeCapture(config, AS_OF).price(service(code_system=CPT, code="99213"), True)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.CODE_NOT_BILLABLE
    assert "'99213'" in result.detail
    assert "bundled into 99215" in result.detail


def test_coding_edit_effective_date() -> None:
    edits = {(CPT, "99213"): CodingEdit(CPT, "99213", "reject", None, "test")}
    config = make_config(rule_book=rules_from(dt.date(2024, 6, 1), coding_edits=edits))
    earlier = ChargeCapture(config, AS_OF).price(service(code_system=CPT, code="99213"), True)
    assert isinstance(earlier, ChargeLine)  # served 2024-05-01, before the rules


def test_pricing_multiplier_rounds_unit_first() -> None:
    pricing = (PricingRule(Decimal("1.015"), revenue_code_prefix="030"),)
    config = make_config(rule_book=rules_from(dt.date(2024, 1, 1), pricing=pricing))
    line = ChargeCapture(config, AS_OF).price(service(quantity=Decimal("3")), True)
    assert isinstance(line, ChargeLine)
    # 45.50 x 1.015 = 46.1825 -> 46.18 a unit, x 3 = 138.54.
    assert line.unit_price == Decimal("46.18")
    assert line.amount == Decimal("138.54")


def test_pricing_keeps_sent_prices() -> None:
    pricing = (PricingRule(Decimal("2"), charge_code="30001"),)
    config = make_config(rule_book=rules_from(dt.date(2024, 1, 1), pricing=pricing))
    line = ChargeCapture(config, AS_OF).price(service(amount=Decimal("50.00")), True)
    assert isinstance(line, ChargeLine)
    assert line.amount == Decimal("50.00")
