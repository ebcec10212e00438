"""Business rules as the workflows see them: one :class:`RuleSet` per version.

Rule files (``rules/*.yaml`` in the configuration folder, see
:mod:`carebridge.config.rules_loader`) each hold one complete version of the
rules with its ``effective_from`` date. :meth:`RuleBook.in_force` picks the
version for an event by the event's own date (service, schedule or request
date), so a rule change applies from its effective date and never
rewrites what was decided under the version before it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal

ANY_CATEGORY = "*"
"""Category of an approval chain that applies when no other chain names the category."""


@dataclass(frozen=True, slots=True)
class CodingEdit:
    """A code that is replaced by another (``replace``) or not billed (``reject``)."""

    code_system: str
    code: str
    action: str
    replacement: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class PricingRule:
    """A multiplier on the chargemaster price of a charge code or revenue-code prefix."""

    multiplier: Decimal
    charge_code: str | None = None
    revenue_code_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class ApprovalStep:
    """One approval in a chain; it applies when the amount is at least ``from_amount``."""

    name: str
    team: str
    from_amount: Decimal


@dataclass(frozen=True, slots=True)
class ParLevel:
    """The stock a location keeps of an item.

    Stock on hand plus stock on order below ``par`` raises a procurement
    request for enough to reach ``order_up_to``.
    """

    location: str
    item_code: str
    par: Decimal
    order_up_to: Decimal
    supplier: str | None = None
    category: str | None = None


@dataclass(frozen=True, slots=True)
class StockCount:
    """A physical count of an item at a location (``stock_counts.csv``): stock on hand that day."""

    location: str
    item_code: str
    quantity: Decimal
    counted_on: dt.date
    line: int


@dataclass(frozen=True, slots=True)
class Validation:
    """Limits each workflow checks before it acts."""

    max_issue_quantity: Decimal = Decimal("10000")
    max_request_amount: Decimal = Decimal("1000000")
    max_request_quantity: Decimal = Decimal("100000")
    max_authorized_units: Decimal = Decimal("1000")


@dataclass(frozen=True, slots=True)
class RuleSet:
    """One version of the rules, in force from ``effective_from``.

    ``digest`` is the SHA-256 of the file's bytes, so that the audit log
    distinguishes two files that claim the same version but differ.
    """

    version: str
    effective_from: dt.date | None
    digest: str = ""
    path: str = ""
    validation: Validation = field(default_factory=Validation)
    coding_edits: dict[tuple[str, str], CodingEdit] = field(default_factory=dict)
    pricing: tuple[PricingRule, ...] = ()
    routing: dict[str, str] = field(default_factory=dict)
    approval_chains: dict[str, tuple[ApprovalStep, ...]] = field(default_factory=dict)
    par_auto_approve_below: Decimal = Decimal("0")
    budgets: dict[str, Decimal] = field(default_factory=dict)
    suppliers: dict[str, str] = field(default_factory=dict)
    item_categories: dict[str, str] = field(default_factory=dict)
    authorization_required: frozenset[tuple[str, str]] = frozenset()
    expiry_warning_days: int = 14
    par_levels: dict[tuple[str, str], ParLevel] = field(default_factory=dict)

    def chain_for(self, category: str) -> tuple[ApprovalStep, ...] | None:
        """Return the approval chain of ``category``, else the ``*`` chain, else ``None``."""
        return self.approval_chains.get(category) or self.approval_chains.get(ANY_CATEGORY)

    def needs_authorization(self, code_system: str | None, code: str | None) -> bool:
        """Return whether a service with this code must be authorized before billing."""
        return (code_system or "", code or "") in self.authorization_required

    def price_multiplier(self, charge_code: str, revenue_code: str | None) -> Decimal:
        """Return the multiplier of the first pricing rule that matches, else 1.

        Rules are tried in file order, so a rule for one charge code written
        before a revenue-code rule overrides it.
        """
        for rule in self.pricing:
            if rule.charge_code is not None and rule.charge_code == charge_code:
                return rule.multiplier
            prefix = rule.revenue_code_prefix
            if prefix is not None and revenue_code and revenue_code.startswith(prefix):
                return rule.multiplier
        return Decimal(1)

    def coding_edit(self, code_system: str, code: str) -> CodingEdit | None:
        """Return the coding edit for a code, if the rules have one."""
        return self.coding_edits.get((code_system, code))


EMPTY_RULES = RuleSet(version="none", effective_from=None)
"""The rules in force before the first version: nothing needs an
authorization, no par levels, and every request needs the approval of the
``finance`` team."""

DEFAULT_CHAIN = (ApprovalStep("finance", "finance", Decimal(0)),)
"""The approval chain of a request whose rules name no chain for its category."""


@dataclass(frozen=True, slots=True)
class RuleBook:
    """Every rule version of a configuration, ordered by ``effective_from``."""

    versions: tuple[RuleSet, ...] = ()

    def in_force(self, on: dt.date | None) -> RuleSet:
        """Return the version in force on ``on``: the latest that starts on or before it.

        ``None`` (an event without a date) gets the newest version. A date
        before every version gets :data:`EMPTY_RULES`.
        """
        if not self.versions:
            return EMPTY_RULES
        if on is None:
            return self.versions[-1]
        chosen = EMPTY_RULES
        for rules in self.versions:
            assert rules.effective_from is not None
            if rules.effective_from <= on:
                chosen = rules
        return chosen
