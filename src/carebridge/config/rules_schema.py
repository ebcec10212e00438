"""Pydantic models of a rule file (``rules/*.yaml``): one model per section.

Each model checks its own values. References to other files (an item in the
item master, a department, a supplier named by a par level) are checked in
:mod:`carebridge.config.rules_loader`.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from carebridge.config.schema import _Strict
from carebridge.model.codes import code_system_from

TEAM = r"^[a-z][a-z0-9_]*$"
CATEGORY = r"^(\*|[a-z][a-z0-9_-]*)$"


def _system(value: str) -> str:
    system = code_system_from(value)
    if system is None:
        raise ValueError(f"unknown code system {value!r}")
    return system


class CodingEditEntry(_Strict):
    """One entry of ``coding_edits``: replace a code by another, or reject it."""

    system: str
    code: str = Field(min_length=1)
    action: Literal["replace", "reject"]
    replacement: str | None = Field(default=None, min_length=1, validate_default=True)
    reason: str | None = None

    @field_validator("system")
    @classmethod
    def _known_system(cls, value: str) -> str:
        return _system(value)

    @field_validator("replacement")
    @classmethod
    def _replacement_for_replace(cls, value: str | None, info: ValidationInfo) -> str | None:
        action = info.data.get("action")
        if action == "replace" and value is None:
            raise ValueError("a replace edit needs a replacement code")
        if action == "reject" and value is not None:
            raise ValueError("a reject edit takes no replacement code")
        return value


class PricingEntry(_Strict):
    """One entry of ``pricing``: a multiplier for a charge code or revenue-code prefix."""

    charge_code: str | None = Field(default=None, min_length=1)
    revenue_code_prefix: str | None = Field(default=None, pattern=r"^\d{1,4}$")
    multiplier: Decimal = Field(gt=0, le=100)

    @model_validator(mode="after")
    def _one_match(self) -> PricingEntry:
        if (self.charge_code is None) == (self.revenue_code_prefix is None):
            raise ValueError("give exactly one of charge_code or revenue_code_prefix")
        return self


class SuppliesValidation(_Strict):
    """``validation.supplies``."""

    max_issue_quantity: Decimal = Field(default=Decimal("10000"), gt=0)


class ProcurementValidation(_Strict):
    """``validation.procurement``."""

    max_request_amount: Decimal = Field(default=Decimal("1000000"), gt=0)
    max_request_quantity: Decimal = Field(default=Decimal("100000"), gt=0)


class AuthorizationValidation(_Strict):
    """``validation.authorizations``."""

    max_units: Decimal = Field(default=Decimal("1000"), gt=0)


class ValidationSection(_Strict):
    """``validation``: limits per workflow."""

    supplies: SuppliesValidation = Field(default_factory=SuppliesValidation)
    procurement: ProcurementValidation = Field(default_factory=ProcurementValidation)
    authorizations: AuthorizationValidation = Field(default_factory=AuthorizationValidation)


class ApprovalStepEntry(_Strict):
    """One step of an approval chain."""

    name: str = Field(min_length=1, max_length=60)
    team: str = Field(pattern=TEAM, max_length=40)
    from_amount: Decimal = Field(default=Decimal(0), ge=0)


class ApprovalChainEntry(_Strict):
    """One approval chain: the steps a request of ``category`` passes, in order."""

    category: str = Field(pattern=CATEGORY, max_length=60)
    steps: list[ApprovalStepEntry] = Field(min_length=1)

    @field_validator("steps")
    @classmethod
    def _ascending(cls, steps: list[ApprovalStepEntry]) -> list[ApprovalStepEntry]:
        names = [step.name for step in steps]
        if len(set(names)) != len(names):
            raise ValueError("a step name is used twice in one chain")
        amounts = [step.from_amount for step in steps]
        if amounts != sorted(amounts):
            raise ValueError("steps must be in ascending order of from_amount")
        return steps


class ApprovalsSection(_Strict):
    """``approvals``: chains by category, and the limit under which par-level orders need none."""

    par_auto_approve_below: Decimal = Field(default=Decimal(0), ge=0)
    chains: list[ApprovalChainEntry] = Field(default_factory=list)


class RequiredCode(_Strict):
    """A service code that needs an authorization before it is billed."""

    system: str
    code: str = Field(min_length=1)
    note: str | None = None

    @field_validator("system")
    @classmethod
    def _known_system(cls, value: str) -> str:
        return _system(value)


class AuthorizationsSection(_Strict):
    """``authorizations``: which services need one, and when expiry is warned of."""

    required: list[RequiredCode] = Field(default_factory=list)
    expiry_warning_days: int = Field(default=14, ge=0, le=365)


class ParLevelEntry(_Strict):
    """One entry of ``supplies.par_levels``."""

    location: str = Field(min_length=1)
    item_code: str = Field(min_length=1)
    par: Decimal = Field(ge=0)
    order_up_to: Decimal = Field(gt=0)
    supplier: str | None = Field(default=None, min_length=1)
    category: str | None = Field(default=None, pattern=CATEGORY)

    @field_validator("order_up_to")
    @classmethod
    def _above_par(cls, value: Decimal, info: ValidationInfo) -> Decimal:
        par = info.data.get("par")
        if par is not None and value <= par:
            raise ValueError(f"must be greater than par ({par})")
        return value


class SuppliesSection(_Strict):
    """``supplies``: par levels and item categories."""

    par_levels: list[ParLevelEntry] = Field(default_factory=list)
    item_categories: dict[str, str] = Field(default_factory=dict)


class SupplierEntry(_Strict):
    """One supplier that purchase orders may go to."""

    code: str = Field(min_length=1, max_length=60)
    name: str = Field(min_length=1)


class ProcurementSection(_Strict):
    """``procurement``: suppliers and annual budgets per department."""

    suppliers: list[SupplierEntry] = Field(default_factory=list)
    budgets: dict[str, Decimal] = Field(default_factory=dict)

    @field_validator("budgets")
    @classmethod
    def _positive(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        for department, amount in value.items():
            if amount < 0:
                raise ValueError(f"budget of {department} is negative")
        return value


class RulesFile(_Strict):
    """One rule file: a complete version of the rules."""

    version: str = Field(min_length=1, max_length=60)
    effective_from: dt.date
    validation: ValidationSection = Field(default_factory=ValidationSection)
    coding_edits: list[CodingEditEntry] = Field(default_factory=list)
    pricing: list[PricingEntry] = Field(default_factory=list)
    routing: dict[str, str] = Field(default_factory=dict)
    approvals: ApprovalsSection = Field(default_factory=ApprovalsSection)
    authorizations: AuthorizationsSection = Field(default_factory=AuthorizationsSection)
    supplies: SuppliesSection = Field(default_factory=SuppliesSection)
    procurement: ProcurementSection = Field(default_factory=ProcurementSection)


class StockCountRow(_Strict):
    """A row of stock_counts.csv: a physical count that sets stock on hand."""

    location: str = Field(min_length=1)
    item_code: str = Field(min_length=1)
    quantity: Decimal = Field(ge=0)
    counted_on: dt.date
    note: str | None = None
