"""Canonical records that every source is mapped to and every workflow reads.

Each record carries ``source_message_id``: the id of the stored raw message it
came from, so that any posted amount can be traced back to its input. Money is
``Decimal`` throughout. Records are plain frozen dataclasses so that ingest,
workflows and destinations share them without importing each other.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum


class Null:
    """Marker for a value that the source explicitly cleared.

    HL7 v2 sends ``""`` to mean "present but null: delete the old value", which
    differs from an empty field ("not present: keep the old value").
    """

    _instance: Null | None = None

    def __new__(cls) -> Null:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NULL"

    def __bool__(self) -> bool:
        return False


NULL = Null()
"""The single explicit-null value."""


class ServiceKind(StrEnum):
    """The kind of clinical event a service was documented as."""

    PROCEDURE = "procedure"
    ENCOUNTER = "encounter"
    IMMUNIZATION = "immunization"
    MEDICATION = "medication"
    FINANCIAL_TRANSACTION = "financial_transaction"  # HL7 FT1
    CHARGE_ITEM = "charge_item"  # FHIR ChargeItem
    SUPPLY = "supply"  # the billable side of a chargeable supply


class TransactionType(StrEnum):
    """HL7 table 0017 transaction types that carebridge posts."""

    CHARGE = "CG"
    CREDIT = "CD"


@dataclass(frozen=True, slots=True)
class Patient:
    """A patient as the EHR records them; fields left ``None`` were not sent.

    A field set to ``NULL`` was explicitly cleared by the source.
    """

    patient_id: str
    source_message_id: int
    mrn: str | None = None
    family_name: str | None | Null = None
    given_name: str | None | Null = None
    birth_date: dt.date | None | Null = None
    gender: str | None | Null = None
    home_phone: str | None | Null = None
    business_phone: str | None | Null = None


@dataclass(frozen=True, slots=True)
class Guarantor:
    """The person financially responsible for an encounter (HL7 GT1)."""

    family_name: str | None
    given_name: str | None
    relationship: str | None
    phone: str | None


@dataclass(frozen=True, slots=True)
class Encounter:
    """A visit or stay; the unit that charges accumulate on."""

    encounter_id: str
    patient_id: str
    source_message_id: int
    encounter_class: str | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    code: str | None = None
    code_system: str | None = None
    department: str | None = None
    guarantor: Guarantor | None = None


@dataclass(frozen=True, slots=True)
class Service:
    """One documented clinical service that may imply a charge.

    ``service_key`` is the business key: two services with the same key are
    the same event, whichever path delivered them. ``amount`` and
    ``unit_price`` are set only when the source priced the service itself
    (HL7 FT1-11 and FT1-12, FHIR ChargeItem); otherwise the chargemaster
    prices it.
    """

    service_key: str
    kind: ServiceKind
    code_system: str
    code: str
    quantity: Decimal
    service_date: dt.date | None
    patient_id: str | None
    encounter_id: str | None
    source_message_id: int
    description: str | None = None
    transaction_type: TransactionType = TransactionType.CHARGE
    amount: Decimal | None = None
    unit_price: Decimal | None = None
    currency: str = "USD"
    department: str | None = None
    diagnosis_codes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """A condition documented for an encounter, in the code system it was sent in.

    Sources: Synthea encounter and procedure ``REASONCODE``, FHIR Condition
    (``Condition.encounter``) and ``Encounter.reasonCode``, HL7 DG1. The
    first diagnosis a source names for an encounter is its primary one.
    """

    encounter_id: str
    code_system: str
    code: str
    source_message_id: int
    description: str | None = None


@dataclass(frozen=True, slots=True)
class SupplyUse:
    """A supply item consumed for a patient (Synthea supplies, SupplyDelivery)."""

    usage_key: str
    code_system: str
    code: str
    quantity: Decimal
    service_date: dt.date | None
    patient_id: str | None
    encounter_id: str | None
    source_message_id: int
    description: str | None = None
    lot_number: str | None = None
    serial_number: str | None = None


@dataclass(frozen=True, slots=True)
class ChargeLine:
    """A priced charge ready for billing and the general ledger."""

    service_key: str
    charge_code: str
    revenue_code: str
    hcpcs: str | None
    units: Decimal
    unit_price: Decimal
    amount: Decimal
    currency: str
    service_date: dt.date
    department: str
    gl_account: str
    patient_id: str | None
    encounter_id: str | None
    source_message_id: int


@dataclass(frozen=True, slots=True)
class SupplyIssue:
    """An inventory issue at cost: credit inventory, debit supply expense."""

    usage_key: str
    item_code: str
    quantity: Decimal
    unit_cost: Decimal
    total_cost: Decimal
    currency: str
    service_date: dt.date
    department: str
    expense_account: str
    inventory_account: str
    encounter_id: str | None
    source_message_id: int


@dataclass(slots=True)
class CanonicalBatch:
    """Everything one raw message was mapped to.

    ``warnings`` are facts about the input that did not stop processing (a LF
    segment terminator, a segment out of standard order). ``ignored`` counts
    content that carries no finance meaning, by kind, so that nothing is
    dropped without a trace.
    """

    patients: list[Patient] = field(default_factory=list)
    encounters: list[Encounter] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    supplies: list[SupplyUse] = field(default_factory=list)
    diagnoses: list[Diagnosis] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)

    def ignore(self, kind: str, count: int = 1) -> None:
        """Count content of ``kind`` that has no finance meaning."""
        self.ignored[kind] = self.ignored.get(kind, 0) + count
