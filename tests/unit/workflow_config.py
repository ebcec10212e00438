"""A small, hand-built configuration for workflow unit tests."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from carebridge.config.model import (
    Account,
    AccountType,
    ChargeItem,
    ChargemasterVersion,
    ChargeRules,
    Configuration,
    Department,
    SupplyItem,
)
from carebridge.model.codes import CPT, SNOMED


def make_config(**overrides: object) -> Configuration:
    """Return a configuration with one lab, one clinic and one supply item."""
    accounts = {
        "1200": Account("1200", "Patient receivables", AccountType.ASSET, "Assets:Receivable:Patients"),
        "1400": Account("1400", "Inventory", AccountType.ASSET, "Assets:Inventory:Supplies"),
        "4100": Account("4100", "Lab revenue", AccountType.REVENUE, "Income:Revenue:Laboratory"),
        "4200": Account("4200", "Clinic revenue", AccountType.REVENUE, "Income:Revenue:Clinic"),
        "6100": Account("6100", "Lab supplies", AccountType.EXPENSE, "Expenses:Supplies:Laboratory"),
        "6200": Account("6200", "Clinic supplies", AccountType.EXPENSE, "Expenses:Supplies:Clinic"),
    }
    departments = {
        "LAB": Department("LAB", "Laboratory", "CC300", "4100", "6100"),
        "CLINIC": Department("CLINIC", "Clinic", "CC510", "4200", "6200"),
    }
    chargemaster = {
        "30001": ChargeItem("30001", "CBC AUTOMATED", Decimal("45.50"), None, "85025", None, "cdm.csv:3"),
        "51001": ChargeItem("51001", "OFFICE VISIT", Decimal("135.50"), "0510", "99213", None, "cdm.csv:4"),
        "27001": ChargeItem("27001", "GLUCOSE STRIP", Decimal("1.25"), "0270", "A4253", "CLINIC", "cdm.csv:5"),
        "99999": ChargeItem("99999", "NO PRICE", Decimal("0"), "0510", "99499", None, "cdm.csv:6"),
    }
    values: dict[str, object] = {
        "accounts": accounts,
        "departments": departments,
        "receivable_account": "1200",
        "inventory_account": "1400",
        "chargemaster": chargemaster,
        "chargemaster_version": ChargemasterVersion("test-cdm-1", dt.date(2019, 1, 1), "0" * 64),
        "crosswalk": {
            (SNOMED, "9564003"): "30001",
            (CPT, "85025"): "30001",
            (CPT, "99213"): "51001",
            (CPT, "99499"): "99999",
            (SNOMED, "123"): "00000",
        },
        "revenue_code_ranges": (("80047", "89398", "0300"),),
        "revenue_code_departments": {"0300": "LAB", "051": "CLINIC", "027": "CLINIC"},
        "encounter_class_departments": {"ambulatory": "CLINIC", "O": "CLINIC"},
        "supply_items": {
            (SNOMED, "337388004"): SupplyItem("STRIP", "Glucose strip", Decimal("0.30"), True, "27001", False),
            (SNOMED, "1137596000"): SupplyItem("LANCET", "Lancet", Decimal("0.10"), False, None, False),
            (SNOMED, "5000"): SupplyItem("KNEE", "Knee implant", Decimal("2500.00"), False, None, True),
        },
        "rules": ChargeRules(dt.date(2010, 1, 1), dt.date(2025, 12, 31), Decimal("999"), "USD"),
    }
    values.update(overrides)
    return Configuration(**values)  # type: ignore[arg-type]
