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


class Team(StrEnum):
    """Teams that work exceptions."""

    INTEGRATION = "integration"
    REVENUE_CYCLE = "revenue_cycle"
    SUPPLY_CHAIN = "supply_chain"


TEAM_BY_REASON: dict[Reason, Team] = {
    Reason.MALFORMED_INPUT: Team.INTEGRATION,
    Reason.CONTROL_ID_REUSED: Team.INTEGRATION,
    Reason.UNKNOWN_CODE: Team.REVENUE_CYCLE,
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
