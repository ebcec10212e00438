"""Build 837P (005010X222A1) and 837I (005010X223A2) claims, one per interchange.

The loops written are those a claim from one billing provider to one payer
needs: submitter (1000A), receiver (1000B), billing provider (2000A/2010AA),
subscriber who is the patient (2000B/2010BA), payer (2010BB), the claim
(2300) and its service lines (2400). A corrected claim carries frequency
code 7 in CLM05-3 and the original claim's reference in REF*F8.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from carebridge.claims.x12 import (
    Envelope,
    SegmentWriter,
    X12DataError,
    wrap_interchange,
    x12_amount,
    x12_date,
    x12_quantity,
)
from carebridge.config.schema import BillingFile, InstitutionalClassEntry

PROFESSIONAL = "837P"
INSTITUTIONAL = "837I"
VERSIONS = {PROFESSIONAL: "005010X222A1", INSTITUTIONAL: "005010X223A2"}
ORIGINAL = "1"
REPLACEMENT = "7"
MAX_DIAGNOSES = 12
"""Diagnoses one HI segment carries; more are left off the claim."""
MAX_POINTERS = 4
"""Diagnosis pointers one 837P service line (SV107) carries."""

_GENDERS = {"m": "M", "male": "M", "f": "F", "female": "F"}


@dataclass(frozen=True, slots=True)
class ClaimLineDraft:
    """One service line: charge lines of one code and date, summed."""

    line_no: int
    procedure_code: str | None
    revenue_code: str
    units: Decimal
    amount: Decimal
    service_date: dt.date
    charge_line_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PatientFacts:
    """The patient, billed as the subscriber (SBR02 = 18, self)."""

    patient_id: str
    last_name: str
    first_name: str | None
    birth_date: dt.date
    gender: str | None
    member_id: str


@dataclass(frozen=True, slots=True)
class ClaimDraft:
    """The content of one 837 claim, before it is written."""

    claim_reference: str
    patient_control_number: str
    kind: str
    frequency_code: str
    original_reference: str | None
    start: dt.datetime | None
    end: dt.datetime
    patient: PatientFacts
    diagnoses: tuple[str, ...]
    lines: tuple[ClaimLineDraft, ...]
    total: Decimal
    place_of_service: str | None = None
    institutional: InstitutionalClassEntry | None = None


def gender_code(gender: str | None) -> str:
    """Return the DMG03 code (F, M or U) for a canonical gender."""
    return _GENDERS.get((gender or "").strip().lower(), "U")


def build_837(
    draft: ClaimDraft, billing: BillingFile, control_number: int, created_at: dt.datetime
) -> str:
    """Return the X12 interchange of one claim.

    Raises:
        X12DataError: a value contains an X12 delimiter or the draft lacks
            what its kind needs (no lines, no diagnosis, no 837I class).
    """
    if not draft.lines:
        raise X12DataError("a claim needs at least one service line")
    if not draft.diagnoses:
        raise X12DataError("a claim needs a principal diagnosis")
    version = VERSIONS[draft.kind]
    writer = SegmentWriter()
    writer.add("ST", "837", "0001", version)
    writer.add(
        "BHT", "0019", "00", draft.claim_reference, x12_date(created_at.date()),
        created_at.strftime("%H%M"), "CH",
    )
    _header_loops(writer, billing)
    _subscriber_loops(writer, draft, billing)
    if draft.kind == PROFESSIONAL:
        _professional_claim(writer, draft)
    else:
        _institutional_claim(writer, draft, billing)
    envelope = Envelope(
        sender_id=billing.submitter.id,
        receiver_id=billing.receiver.id,
        control_number=control_number,
        usage_indicator=billing.usage_indicator,
        version=version,
        created_at=created_at,
    )
    return wrap_interchange(envelope, writer)


def _header_loops(writer: SegmentWriter, billing: BillingFile) -> None:
    submitter, receiver = billing.submitter, billing.receiver
    writer.add("NM1", "41", "2", submitter.name, None, None, None, None, "46", submitter.id)
    writer.add("PER", "IC", submitter.contact_name, "TE", submitter.contact_phone)
    writer.add("NM1", "40", "2", receiver.name, None, None, None, None, "46", receiver.id)
    provider = billing.billing_provider
    writer.add("HL", "1", None, "20", "1")
    if provider.taxonomy:
        writer.add("PRV", "BI", "PXC", provider.taxonomy)
    writer.add("NM1", "85", "2", provider.name, None, None, None, None, "XX", provider.npi)
    address = provider.address
    writer.add("N3", address.line1, address.line2)
    writer.add("N4", address.city, address.state, address.zip)
    writer.add("REF", "EI", provider.tax_id)


def _subscriber_loops(writer: SegmentWriter, draft: ClaimDraft, billing: BillingFile) -> None:
    patient = draft.patient
    writer.add("HL", "2", "1", "22", "0")
    writer.add(
        "SBR", "P", "18", None, None, None, None, None, None,
        billing.payer.claim_filing_indicator,
    )
    writer.add(
        "NM1", "IL", "1", patient.last_name, patient.first_name, None, None, None,
        "MI", patient.member_id,
    )
    writer.add("DMG", "D8", x12_date(patient.birth_date), gender_code(patient.gender))
    payer = billing.payer
    writer.add("NM1", "PR", "2", payer.name, None, None, None, None, "PI", payer.payer_id)


def _diagnosis_codes(draft: ClaimDraft) -> list[str]:
    return list(draft.diagnoses[:MAX_DIAGNOSES])


def _professional_claim(writer: SegmentWriter, draft: ClaimDraft) -> None:
    place = draft.place_of_service or "11"
    writer.add(
        "CLM", draft.patient_control_number, x12_amount(draft.total), None, None,
        (place, "B", draft.frequency_code), "Y", "A", "Y", "Y",
    )
    if draft.original_reference:
        writer.add("REF", "F8", draft.original_reference)
    codes = _diagnosis_codes(draft)
    writer.add(
        "HI", ("ABK", codes[0]), *[("ABF", code) for code in codes[1:]]
    )
    pointers = tuple(str(n) for n in range(1, min(len(codes), MAX_POINTERS) + 1))
    for line in draft.lines:
        if not line.procedure_code:
            raise X12DataError(
                f"service line {line.line_no} has no HCPCS/CPT code, which an 837P needs"
            )
        writer.add("LX", str(line.line_no))
        writer.add(
            "SV1", ("HC", line.procedure_code), x12_amount(line.amount), "UN",
            x12_quantity(line.units), None, None, pointers,
        )
        writer.add("DTP", "472", "D8", x12_date(line.service_date))


def _institutional_claim(
    writer: SegmentWriter, draft: ClaimDraft, billing: BillingFile
) -> None:
    facility = draft.institutional
    if facility is None:
        raise X12DataError("an 837I claim needs the institutional settings of its class")
    writer.add(
        "CLM", draft.patient_control_number, x12_amount(draft.total), None, None,
        (facility.facility_type_code, "A", draft.frequency_code), None, "A", "Y", "Y",
    )
    start = draft.start or draft.end
    writer.add(
        "DTP", "434", "RD8", f"{x12_date(start.date())}-{x12_date(draft.end.date())}"
    )
    if facility.inpatient:
        writer.add("DTP", "435", "DT", start.strftime("%Y%m%d%H%M"))
        writer.add("DTP", "096", "TM", draft.end.strftime("%H%M"))
    writer.add(
        "CL1", facility.admission_type_code, facility.admission_source_code,
        facility.patient_status_code,
    )
    if draft.original_reference:
        writer.add("REF", "F8", draft.original_reference)
    codes = _diagnosis_codes(draft)
    writer.add("HI", ("ABK", codes[0]))
    if facility.inpatient:
        writer.add("HI", ("ABJ", codes[0]))
    else:
        writer.add("HI", ("APR", codes[0]))
    if len(codes) > 1:
        writer.add("HI", *[("ABF", code) for code in codes[1:]])
    attending = billing.attending_provider
    writer.add(
        "NM1", "71", "1", attending.last_name, attending.first_name, None, None, None,
        "XX", attending.npi,
    )
    for line in draft.lines:
        writer.add("LX", str(line.line_no))
        procedure = ("HC", line.procedure_code) if line.procedure_code else None
        writer.add(
            "SV2", line.revenue_code, procedure, x12_amount(line.amount), "UN",
            x12_quantity(line.units),
        )
        writer.add("DTP", "472", "D8", x12_date(line.service_date))
