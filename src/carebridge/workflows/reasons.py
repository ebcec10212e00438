"""Work-item reason codes and the team that owns each.

A reason code is stable: reports, routing and metrics key on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Reason code of a message, service or supply usage that could not be posted."""

    MALFORMED_INPUT = "malformed_input"
    CONTROL_ID_REUSED = "control_id_reused"
    UNKNOWN_CODE = "unknown_code"
    CODE_NOT_BILLABLE = "code_not_billable"
    ENCOUNTER_NOT_FOUND = "encounter_not_found"
    UNITS_NOT_POSITIVE = "units_not_positive"
    UNITS_TOO_HIGH = "units_too_high"
    DATE_MISSING = "date_missing"
    DATE_OUT_OF_RANGE = "date_out_of_range"
    PRICE_MISSING = "price_missing"
    REVENUE_CODE_MISSING = "revenue_code_missing"
    DEPARTMENT_UNMAPPED = "department_unmapped"
    AMOUNT_MISMATCH = "amount_mismatch"
    AMOUNT_INVALID = "amount_invalid"
    AMOUNT_TOO_HIGH = "amount_too_high"
    UNITS_NOT_WHOLE = "units_not_whole"
    SERVICE_KEY_CONFLICT = "service_key_conflict"
    ENCOUNTER_PATIENT_CONFLICT = "encounter_patient_conflict"
    CURRENCY_MISMATCH = "currency_mismatch"
    UNKNOWN_ITEM = "unknown_item"
    LOT_OR_SERIAL_MISSING = "lot_or_serial_missing"
    NO_STOCK = "no_stock"
    QUANTITY_TOO_HIGH = "quantity_too_high"
    AUTHORIZATION_PENDING = "authorization_pending"
    AUTHORIZATION_EXPIRED = "authorization_expired"
    AUTHORIZATION_EXPIRING = "authorization_expiring"
    APPROVAL_REQUIRED = "approval_required"
    OVER_BUDGET = "over_budget"
    UNKNOWN_SUPPLIER = "unknown_supplier"
    RECEIPT_EXCEEDS_ORDER = "receipt_exceeds_order"
    # Billing readiness of an encounter's claim (subject ``claim:{encounter id}``).
    DIAGNOSIS_MISSING = "diagnosis_missing"
    AUTHORIZATION_MISSING = "authorization_missing"
    OPEN_WORK_ITEMS = "open_work_items"
    PATIENT_INCOMPLETE = "patient_incomplete"
    CLAIM_CREDIT_BALANCE = "claim_credit_balance"
    CLAIM_INVALID = "claim_invalid"
    # Flags of the AI-assisted checks (carebridge.checks): a person decides.
    DUPLICATE_PATIENT = "duplicate_patient"
    MISSING_CHARGE = "missing_charge"
    UNITS_ANOMALY = "units_anomaly"
    PRICE_ANOMALY = "price_anomaly"
    BILLED_NOT_DOCUMENTED = "billed_not_documented"


class Team(StrEnum):
    """Teams that work exceptions."""

    INTEGRATION = "integration"
    REVENUE_CYCLE = "revenue_cycle"
    SUPPLY_CHAIN = "supply_chain"
    FINANCE = "finance"


TEAM_BY_REASON: dict[Reason, Team] = {
    Reason.MALFORMED_INPUT: Team.INTEGRATION,
    Reason.CONTROL_ID_REUSED: Team.INTEGRATION,
    Reason.UNKNOWN_CODE: Team.REVENUE_CYCLE,
    Reason.CODE_NOT_BILLABLE: Team.REVENUE_CYCLE,
    Reason.ENCOUNTER_NOT_FOUND: Team.REVENUE_CYCLE,
    Reason.UNITS_NOT_POSITIVE: Team.REVENUE_CYCLE,
    Reason.UNITS_TOO_HIGH: Team.REVENUE_CYCLE,
    Reason.DATE_MISSING: Team.REVENUE_CYCLE,
    Reason.DATE_OUT_OF_RANGE: Team.REVENUE_CYCLE,
    Reason.PRICE_MISSING: Team.REVENUE_CYCLE,
    Reason.REVENUE_CODE_MISSING: Team.REVENUE_CYCLE,
    Reason.DEPARTMENT_UNMAPPED: Team.REVENUE_CYCLE,
    Reason.AMOUNT_MISMATCH: Team.REVENUE_CYCLE,
    Reason.AMOUNT_INVALID: Team.REVENUE_CYCLE,
    Reason.AMOUNT_TOO_HIGH: Team.REVENUE_CYCLE,
    Reason.UNITS_NOT_WHOLE: Team.REVENUE_CYCLE,
    Reason.SERVICE_KEY_CONFLICT: Team.INTEGRATION,
    Reason.ENCOUNTER_PATIENT_CONFLICT: Team.INTEGRATION,
    Reason.CURRENCY_MISMATCH: Team.REVENUE_CYCLE,
    Reason.UNKNOWN_ITEM: Team.SUPPLY_CHAIN,
    Reason.LOT_OR_SERIAL_MISSING: Team.SUPPLY_CHAIN,
    Reason.NO_STOCK: Team.SUPPLY_CHAIN,
    Reason.QUANTITY_TOO_HIGH: Team.SUPPLY_CHAIN,
    Reason.AUTHORIZATION_PENDING: Team.REVENUE_CYCLE,
    Reason.AUTHORIZATION_EXPIRED: Team.REVENUE_CYCLE,
    Reason.AUTHORIZATION_EXPIRING: Team.REVENUE_CYCLE,
    Reason.APPROVAL_REQUIRED: Team.FINANCE,
    Reason.OVER_BUDGET: Team.FINANCE,
    Reason.UNKNOWN_SUPPLIER: Team.SUPPLY_CHAIN,
    Reason.RECEIPT_EXCEEDS_ORDER: Team.SUPPLY_CHAIN,
    Reason.DIAGNOSIS_MISSING: Team.REVENUE_CYCLE,
    Reason.AUTHORIZATION_MISSING: Team.REVENUE_CYCLE,
    Reason.OPEN_WORK_ITEMS: Team.REVENUE_CYCLE,
    Reason.PATIENT_INCOMPLETE: Team.REVENUE_CYCLE,
    Reason.CLAIM_CREDIT_BALANCE: Team.REVENUE_CYCLE,
    Reason.CLAIM_INVALID: Team.REVENUE_CYCLE,
    Reason.DUPLICATE_PATIENT: Team.INTEGRATION,
    Reason.MISSING_CHARGE: Team.REVENUE_CYCLE,
    Reason.UNITS_ANOMALY: Team.REVENUE_CYCLE,
    Reason.PRICE_ANOMALY: Team.REVENUE_CYCLE,
    Reason.BILLED_NOT_DOCUMENTED: Team.REVENUE_CYCLE,
}


@dataclass(frozen=True, slots=True)
class Rejection:
    """The outcome of a check that failed: a reason and what a person needs."""

    reason: Reason
    detail: str

    @property
    def team(self) -> Team:
        """The team that owns this reason."""
        return TEAM_BY_REASON[self.reason]
