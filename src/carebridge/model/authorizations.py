"""Canonical authorization and scheduling records.

An :class:`Authorization` is a payer's or a referral's permission to deliver
a service to a patient: FHIR ServiceRequest, FHIR Claim with ``use =
preauthorization`` (decided by its ClaimResponse) and HL7 v2 REF^I12 map to
it. A :class:`ScheduledService` is one service booked for a patient (HL7 v2
SIU^S12), which is checked against the authorizations before the visit.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum


class AuthorizationStatus(StrEnum):
    """Where an authorization stands with the payer or the referral's receiver."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Authorization:
    """One authorization for one service code.

    ``auth_key`` is the business key: a later message with the same key
    updates the record (a decision, a new expiry). ``units`` is the number of
    services authorized, ``None`` when the source set no limit. ``valid_to``
    is the last day the authorization covers; ``None`` means it does not
    expire. ``reference`` is the payer's authorization number, if sent.
    ``request_key`` links a decision (a ClaimResponse) to the authorizations
    its request created; a decision sets ``code`` only when it names one.
    """

    auth_key: str
    source: str
    status: AuthorizationStatus
    patient_id: str | None
    code_system: str | None
    code: str | None
    source_message_id: int
    units: Decimal | None = None
    valid_from: dt.date | None = None
    valid_to: dt.date | None = None
    reference: str | None = None
    request_key: str | None = None


@dataclass(frozen=True, slots=True)
class ScheduledService:
    """A service booked for a patient on a date (HL7 SIU^S12 SCH with AIS)."""

    appointment_key: str
    patient_id: str
    code_system: str
    code: str
    scheduled_on: dt.date
    source_message_id: int
    status: str | None = None
