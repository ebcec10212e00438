"""Map a parsed HL7 v2 message to canonical records.

ADT, BAR and DFT messages give patients (PID) and encounters (PV1, with the
guarantor from GT1); DFT messages also give one service per charge or credit
FT1. Every other message type maps to an empty batch that counts it as
ignored. Segments are found by ID wherever they stand in the message, so a
sender's non-standard order (GT1 before FT1 in a DFT^P03) loses nothing.

Only ids (message id, control id) are logged: never names, birth dates,
identifiers or free text.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from decimal import Decimal

from carebridge.errors import ParseError
from carebridge.ingest.hl7v2.parser import Hl7Message, Hl7Segment, Value
from carebridge.model.authorizations import (
    Authorization,
    AuthorizationStatus,
    ScheduledService,
)
from carebridge.model.codes import CPT, HCPCS, code_system_from
from carebridge.model.records import (
    NULL,
    CanonicalBatch,
    Diagnosis,
    Encounter,
    Guarantor,
    Null,
    Patient,
    Service,
    ServiceKind,
    TransactionType,
)

logger = logging.getLogger(__name__)

_ADT_TRIGGERS = (
    "A01 A02 A03 A04 A05 A06 A07 A08 A11 A12 A13 A28 A31 A40"
).split()
FINANCE_MESSAGE_TYPES: frozenset[tuple[str, str]] = frozenset(
    [("ADT", t) for t in _ADT_TRIGGERS]
    + [("BAR", t) for t in ("P01", "P02", "P12")]
    + [("DFT", t) for t in ("P03", "P11")]
)
"""The (MSH-9.1, MSH-9.2) pairs that :func:`map_message` maps."""

GT1_OUT_OF_ORDER = "GT1 out of standard order"

# HL7 table 0017 transaction types.
_TRANSACTION_TYPES = {"CG": TransactionType.CHARGE, "CD": TransactionType.CREDIT}
_NOT_SERVICES = {"PY", "AJ", "CO"}  # payment, adjustment, co-payment
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_DTM = re.compile(
    r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?$"
)
_CPT_SHAPE = re.compile(r"^\d{5}$")
_HCPCS_SHAPE = re.compile(r"^[A-Z]\d{4}$")


@dataclass(slots=True)
class _Group:
    """Segments that belong to one patient: a PID and what follows it."""

    pid: Hl7Segment | None
    patient_id: str | None = None
    account: str | None = None
    segments: tuple[Hl7Segment, ...] = ()


def map_message(msg: Hl7Message, message_id: int) -> CanonicalBatch:
    """Map one parsed message to canonical records.

    Args:
        msg: The parsed message.
        message_id: Id of the stored raw message, copied into every record.

    Returns:
        The records, the mapping warnings and ignored content. The parser's
        warnings stay in ``msg.warnings``; the caller adds them to the audit.

    Raises:
        ParseError: A field that finance depends on cannot be read (FT1-10
            quantity, FT1-11/12 amounts, FT1-4 date, PID-3 identifier...);
            ``location`` names it in ERR-2 form, e.g. ``FT1^1^10``.
    """
    batch = CanonicalBatch()
    code, trigger = msg.message_code, msg.trigger or ""
    if (code, trigger) not in FINANCE_MESSAGE_TYPES:
        batch.ignore(f"{code}^{trigger} message" if trigger else f"{code} message")
        logger.debug("message %s (control id %s) ignored", message_id, msg.control_id)
        return batch
    groups = _patient_groups(msg)
    for group in groups:
        _map_group(msg, group, message_id, batch)
    if code == "DFT":
        if not msg.segments("FT1"):
            raise ParseError(
                f"DFT^{trigger} carries no FT1 segment, so there is nothing to "
                "charge; check that the sender ends every segment with CR",
                location="FT1^1",
            )
        _check_gt1_order(msg, trigger, batch)
    logger.info(
        "mapped message %s (control id %s): %d patient(s), %d encounter(s), "
        "%d service(s)",
        message_id,
        msg.control_id,
        len(batch.patients),
        len(batch.encounters),
        len(batch.services),
    )
    return batch


def _patient_groups(msg: Hl7Message) -> list[_Group]:
    """Cut the message at each PID. Segments before the first PID join the first group."""
    pids = msg.segments("PID")
    if not pids:
        raise ParseError("required segment PID is missing", location="PID^1")
    groups: list[_Group] = []
    for index, pid in enumerate(pids):
        start = 0 if index == 0 else pid.position
        stop = pids[index + 1].position if index + 1 < len(pids) else None
        members = tuple(
            s for s in msg.all_segments()[start:stop] if s.seg_id != "MSH"
        )
        groups.append(_Group(pid, segments=members))
    return groups


def _map_group(
    msg: Hl7Message, group: _Group, message_id: int, batch: CanonicalBatch
) -> None:
    """Map the patient, encounters and services of one patient group."""
    assert group.pid is not None
    patient = _patient(group.pid, message_id, batch)

    batch.patients.append(patient)
    group.patient_id = patient.patient_id
    group.account = _text(group.pid.value(18))
    visits = [s for s in group.segments if s.seg_id == "PV1"]
    encounter_ids: dict[int, str | None] = {}
    for pv1 in visits:
        encounter = _encounter(pv1, group, message_id, batch)
        encounter_ids[pv1.position] = encounter.encounter_id if encounter else None
        if encounter:
            batch.encounters.append(encounter)
    if not visits and group.account:
        batch.warnings.append("no PV1; encounter taken from PID-18 account number")
        batch.encounters.append(
            Encounter(
                encounter_id=group.account,
                patient_id=patient.patient_id,
                source_message_id=message_id,
                guarantor=_guarantor(None, group),
            )
        )

    for dg1 in (s for s in group.segments if s.seg_id == "DG1"):
        visit = _owner(dg1, visits)
        encounter_id = encounter_ids.get(visit.position) if visit else group.account
        diagnosis = _diagnosis(dg1, encounter_id, message_id)
        if diagnosis:
            batch.diagnoses.append(diagnosis)

    if msg.message_code != "DFT":
        return

    seen_keys: set[str] = set()
    for ft1 in (s for s in group.segments if s.seg_id == "FT1"):
        visit = _owner(ft1, visits)
        encounter_id = encounter_ids.get(visit.position) if visit else group.account
        service = _service(msg, ft1, group, encounter_id, message_id, batch)
        if service is None:
            continue
        if service.service_key in seen_keys:
            raise ParseError(
                "two FT1 segments share the same business key", location=ft1.location(2)
            )
        seen_keys.add(service.service_key)
        batch.services.append(service)


def _owner(segment: Hl7Segment, visits: list[Hl7Segment]) -> Hl7Segment | None:
    """Return the PV1 a segment belongs to: the last one before it, else the first."""
    before = [v for v in visits if v.position < segment.position]
    if before:
        return before[-1]
    return visits[0] if visits else None


def _patient(pid: Hl7Segment, message_id: int, batch: CanonicalBatch) -> Patient:
    """Build the patient from PID-3 (MR preferred), PID-5, PID-7, PID-8, PID-13/14."""
    patient_id, mrn = _patient_identifier(pid, batch)
    return Patient(
        patient_id=patient_id,
        source_message_id=message_id,
        mrn=mrn,
        family_name=_nullable(pid.value(5, 1)),
        given_name=_nullable(pid.value(5, 2)),
        birth_date=_birth_date(pid, batch),
        gender=_nullable(pid.value(8)),
        home_phone=_phone(pid, 13),
        business_phone=_phone(pid, 14),
    )


def _patient_identifier(pid: Hl7Segment, batch: CanonicalBatch) -> tuple[str, str | None]:
    """Return (patient id, MRN) from PID-3, falling back to PID-2 (v2.3 external id)."""
    first: str | None = None
    for rep in range(pid.repetitions(3)):
        ident = _text(pid.value(3, 1, repetition=rep))
        if ident is None:
            continue
        if _text(pid.value(3, 5, repetition=rep)) == "MR":
            return ident, ident
        first = first or ident
    if first:
        return first, None
    external = _text(pid.value(2))
    if external:
        batch.warnings.append("PID-3 empty; patient id taken from PID-2")
        return external, None
    raise ParseError("patient identifier PID-3 is missing", location=pid.location(3))


def _birth_date(pid: Hl7Segment, batch: CanonicalBatch) -> dt.date | None | Null:
    raw = pid.value(7)
    if raw is NULL:
        return NULL
    text = _text(raw)
    if text is None:
        return None
    try:
        return _to_date(text)
    except ValueError:
        batch.warnings.append(f"{pid.location(7)}: not a full date; birth date not set")
        return None


def _phone(pid: Hl7Segment, field: int) -> str | None | Null:
    """Return the first repetition of an XTN phone field.

    XTN-1 is used, else XTN-12 (unformatted number), else XTN-6 + XTN-7.
    """
    first = _nullable(pid.value(field, 1))
    if first is not None:
        return first
    unformatted = _text(pid.value(field, 12))
    if unformatted:
        return unformatted
    area, local = _text(pid.value(field, 6)), _text(pid.value(field, 7))
    return (area or "") + local if local else None


def _encounter(
    pv1: Hl7Segment, group: _Group, message_id: int, batch: CanonicalBatch
) -> Encounter | None:
    """Build an encounter from PV1-19 (else PID-18), PV1-2, PV1-3.1, PV1-44/45."""
    encounter_id = _text(pv1.value(19)) or group.account
    if encounter_id is None:
        batch.warnings.append(
            f"{pv1.location(19)}: no visit number and no PID-18 account; "
            "no encounter mapped"
        )
        return None
    assert group.patient_id is not None
    return Encounter(
        encounter_id=encounter_id,
        patient_id=group.patient_id,
        source_message_id=message_id,
        encounter_class=_text(pv1.value(2)),
        start=_optional_datetime(pv1, 44, batch),
        end=_optional_datetime(pv1, 45, batch),
        department=_text(pv1.value(3, 1)),
        guarantor=_guarantor(pv1, group),
    )


def _guarantor(pv1: Hl7Segment | None, group: _Group) -> Guarantor | None:
    """Return the first GT1 owned by ``pv1`` (GT1 may stand anywhere in the message)."""
    visits = [s for s in group.segments if s.seg_id == "PV1"]
    for gt1 in (s for s in group.segments if s.seg_id == "GT1"):
        if _owner(gt1, visits) is pv1:
            return Guarantor(
                family_name=_text(gt1.value(3, 1)),
                given_name=_text(gt1.value(3, 2)),
                relationship=_text(gt1.value(11, 1)),
                phone=_text(gt1.value(6, 1)),
            )
    return None


def _check_gt1_order(msg: Hl7Message, trigger: str, batch: CanonicalBatch) -> None:
    """Warn when a DFT^P03 GT1 precedes an FT1.

    DFT_P03 places GT1 after the FT1 groups, while DFT_P11 allows it before them.
    """
    if trigger != "P03":
        return
    ft1s = msg.segments("FT1")
    if not ft1s:
        return
    last_ft1 = ft1s[-1].position
    if any(g.position < last_ft1 for g in msg.segments("GT1")):
        batch.warnings.append(GT1_OUT_OF_ORDER)


def _service(
    msg: Hl7Message,
    ft1: Hl7Segment,
    group: _Group,
    encounter_id: str | None,
    message_id: int,
    batch: CanonicalBatch,
) -> Service | None:
    """Build one service from an FT1, or None for payments and adjustments."""
    kind = (_text(ft1.value(6)) or "").upper()
    if kind in _NOT_SERVICES:
        batch.ignore("FT1 payment/adjustment")
        return None
    if kind not in _TRANSACTION_TYPES:
        raise ParseError(
            "FT1-6 transaction type must be CG, CD, PY, AJ or CO",
            location=ft1.location(6),
        )
    code, system = _charge_code(ft1, batch)
    amount, amount_currency = _money(ft1, 11)
    unit_price, unit_currency = _money(ft1, 12)
    if amount_currency and unit_currency and amount_currency != unit_currency:
        raise ParseError("FT1-11 and FT1-12 currencies differ", location=ft1.location(12))
    return Service(
        service_key=_service_key(msg, ft1),
        kind=ServiceKind.FINANCIAL_TRANSACTION,
        code_system=system,
        code=code,
        quantity=_quantity(ft1, batch),
        service_date=_service_date(ft1, batch),
        patient_id=group.patient_id,
        encounter_id=encounter_id,
        source_message_id=message_id,
        description=_text(ft1.value(7, 2)) or _text(ft1.value(8)),
        transaction_type=_TRANSACTION_TYPES[kind],
        amount=amount,
        unit_price=unit_price,
        currency=amount_currency or unit_currency or "USD",
        department=_text(ft1.value(13, 1)),
        diagnosis_codes=_diagnoses(ft1),
    )


def _charge_code(ft1: Hl7Segment, batch: CanonicalBatch) -> tuple[str, str]:
    """Return (code, system) from FT1-7, else FT1-25, inferring CPT/HCPCS last."""
    candidates = [(7, _text(ft1.value(7, 1))), (25, _text(ft1.value(25, 1)))]
    for field, code in candidates:
        sent = _text(ft1.value(field, 3))
        if code and sent:
            # An unrecognised system is kept as sent for the work item.
            return code, code_system_from(sent) or sent
    for field, code in candidates:
        inferred = _infer_system(code)
        if code and inferred:
            batch.warnings.append(
                f"{ft1.location(field)}: no coding system; {inferred} inferred from "
                "the code's shape"
            )
            return code, inferred
    raise ParseError(
        "FT1-7 transaction code has no coding system and none can be inferred",
        location=ft1.location(7),
    )


def _infer_system(code: str | None) -> str | None:
    if code is None:
        return None
    if _CPT_SHAPE.match(code):
        return CPT
    if _HCPCS_SHAPE.match(code):
        return HCPCS
    return None


def _quantity(ft1: Hl7Segment, batch: CanonicalBatch) -> Decimal:
    """Return the FT1-10 quantity: empty means one unit, non-numbers raise."""
    text = _text(ft1.value(10))
    if text is None:
        batch.warnings.append(f"{ft1.location(10)}: FT1-10 empty, quantity 1 assumed")
        return Decimal(1)
    return _decimal(text, ft1.location(10))


def _money(ft1: Hl7Segment, field: int) -> tuple[Decimal | None, str | None]:
    """Return (amount, currency) of a CP field, whose component 1 is MO."""
    text = _text(ft1.value(field, 1, 1))
    currency = _text(ft1.value(field, 1, 2))
    if text is None:
        return None, currency
    return _decimal(text, ft1.location(field, repetition=1, component=1, subcomponent=1)), currency


def _decimal(text: str, where: str) -> Decimal:
    """Parse an HL7 NM value exactly, without thousands separators or exponent."""
    cleaned = text.strip()
    if not _NUMBER.match(cleaned):
        raise ParseError(f"invalid decimal number {cleaned[:20]!r}", location=where)
    return Decimal(cleaned)


def _service_date(ft1: Hl7Segment, batch: CanonicalBatch) -> dt.date | None:
    """Return the date of FT1-4.1 (start of the DR range), else of FT1-5 (posting)."""
    for field in (4, 5):
        text = _text(ft1.value(field, 1))
        if text is None:
            continue
        try:
            return _to_date(text)
        except ValueError:
            raise ParseError(
                f"invalid date {text!r}; expected YYYYMMDD with an optional time",
                location=ft1.location(field),
            ) from None
    batch.warnings.append(f"{ft1.location(4)}: no transaction or posting date")
    return None


def _diagnoses(ft1: Hl7Segment) -> tuple[str, ...]:
    """Return the FT1-19 diagnosis codes, one per repetition (CWE-1)."""
    codes = (_text(ft1.value(19, 1, repetition=r)) for r in range(ft1.repetitions(19)))
    return tuple(c for c in codes if c)


def _diagnosis(
    dg1: Hl7Segment, encounter_id: str | None, message_id: int
) -> Diagnosis | None:
    """Return the DG1-3 diagnosis; its system is DG1-3.3, else DG1-2 (pre-2.5 senders)."""
    code = _text(dg1.value(3, 1))
    if not code or not encounter_id:
        return None
    sent = _text(dg1.value(3, 3)) or _text(dg1.value(2, 1)) or ""
    return Diagnosis(
        encounter_id=encounter_id,
        code_system=code_system_from(sent) or sent,
        code=code,
        source_message_id=message_id,
        description=_text(dg1.value(3, 2)) or _text(dg1.value(4, 1)),
    )


def _service_key(msg: Hl7Message, ft1: Hl7Segment) -> str:
    """Build the business key: MSH-4 + FT1-2, else the FT1's place in the message.

    The MSH-4 + FT1-2 key stays the same when a sender resends a transaction
    with a new MSH-10, so the charge is not posted twice.
    """
    facility = msg.sending_facility or ""
    transaction_id = _text(ft1.value(2))
    if transaction_id:
        return f"hl7:{facility}:{transaction_id}"
    set_id = _text(ft1.value(1)) or str(ft1.sequence)
    application = msg.sending_application or ""
    return f"hl7:{application}:{facility}:{msg.control_id}:FT1:{set_id}"


def _optional_datetime(
    segment: Hl7Segment, field: int, batch: CanonicalBatch
) -> dt.datetime | None:
    text = _text(segment.value(field, 1))
    if text is None:
        return None
    try:
        return _to_datetime(text)
    except ValueError:
        batch.warnings.append(f"{segment.location(field)}: not a valid date/time; not set")
        return None


def _to_date(text: str) -> dt.date:
    """Return the date part of an HL7 DT/DTM value; it must contain a full day."""
    match = _DTM.match(text.strip())
    if not match or match.group(3) is None:
        raise ValueError("not a full HL7 date")
    year, month, day = (int(match.group(i)) for i in (1, 2, 3))
    return dt.date(year, month, day)


def _to_datetime(text: str) -> dt.datetime:
    """Parse an HL7 DTM to the precision sent; an offset gives an aware value."""
    match = _DTM.match(text.strip())
    if not match or match.group(3) is None:
        raise ValueError("not a full HL7 date/time")
    parts = [int(g) if g else 0 for g in match.groups()[:6]]
    fraction = match.group(7) or ""
    micro = int(fraction.ljust(6, "0")) if fraction else 0
    tz = None
    if match.group(8):
        sign = -1 if match.group(8)[0] == "-" else 1
        hours, minutes = int(match.group(8)[1:3]), int(match.group(8)[3:5])
        tz = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
    return dt.datetime(*parts, micro, tzinfo=tz)  # type: ignore[misc]


def _text(value: Value) -> str | None:
    """Return a value as text, with explicit null treated as absent."""
    if isinstance(value, str):
        stripped = value.strip()
        return stripped or None
    return None


def _nullable(value: Value) -> str | None | Null:
    """Return a value as text, keeping explicit null (``""`` clears a stored value)."""
    if value is NULL:
        return NULL
    return _text(value)


# --- Referrals (REF^I12) and scheduling (SIU^S12) ---
#
# map_message ignores these types; the authorization workflow reads the
# stored message again and calls the two functions below.

# RF1-1 referral status, HL7 table 0283.
_REFERRAL_STATUS = {
    "A": AuthorizationStatus.APPROVED,  # accepted
    "P": AuthorizationStatus.PENDING,
    "R": AuthorizationStatus.DENIED,  # rejected
    "E": AuthorizationStatus.CANCELLED,  # expired
}


def map_referral(msg: Hl7Message, message_id: int) -> list[Authorization]:
    """Map a REF^I12 referral to one authorization per referred service.

    The status is RF1-1 (HL7 table 0283); the identifier is AUT-6, else
    RF1-6, else MSH-10; the period is AUT-4/AUT-5, else RF1-7/RF1-8; the
    units are AUT-9 (authorized number of treatments). The services are the
    PR1-3 procedure codes, else the OBR-4 universal service ids. Keys are
    ``hl7:REF:{MSH-4}:{identifier}:{code}``, so a later REF for the same
    referral updates the same records.

    Raises:
        ParseError: RF1-1 is missing or unknown, a date or number cannot be
            read, or no service code is sent.
    """
    rf1 = next(iter(msg.segments("RF1")), None)
    if rf1 is None:
        raise ParseError("REF^I12 carries no RF1 segment", location="RF1^1")
    status_code = (_text(rf1.value(1, 1)) or "").upper()
    status = _REFERRAL_STATUS.get(status_code)
    if status is None:
        raise ParseError(
            f"RF1-1 referral status {status_code!r} is not A, P, R or E (HL7 table 0283)",
            location=rf1.location(1),
        )
    aut = next(iter(msg.segments("AUT")), None)
    identifier = (
        (_text(aut.value(6, 1)) if aut else None) or _text(rf1.value(6, 1)) or msg.control_id
    )
    valid_from = _segment_date(aut, 4) if aut else None
    valid_to = _segment_date(aut, 5) if aut else None
    valid_from = valid_from or _segment_date(rf1, 7)
    valid_to = valid_to or _segment_date(rf1, 8)
    units = None
    if aut is not None and _text(aut.value(9)):
        units = _decimal(_text(aut.value(9)) or "", aut.location(9))
    pid = next(iter(msg.segments("PID")), None)
    if pid is None:
        raise ParseError("required segment PID is missing", location="PID^1")
    patient_id, _ = _patient_identifier(pid, CanonicalBatch())
    codes = _coded_services(msg.segments("PR1"), 3) or _coded_services(msg.segments("OBR"), 4)
    if not codes:
        raise ParseError(
            "REF^I12 names no service: send PR1-3 or OBR-4", location="PR1^1^3"
        )
    request_key = f"hl7:REF:{msg.sending_facility or ''}:{identifier}"
    return [
        Authorization(
            auth_key=f"{request_key}:{system}:{code}",
            source="hl7v2:REF^I12",
            status=status,
            patient_id=patient_id,
            code_system=system,
            code=code,
            source_message_id=message_id,
            units=units,
            valid_from=valid_from,
            valid_to=valid_to,
            reference=_text(aut.value(6, 1)) if aut else None,
            request_key=request_key,
        )
        for system, code in codes
    ]


def map_schedule(msg: Hl7Message, message_id: int) -> list[ScheduledService]:
    """Map an SIU^S12 new appointment to one scheduled service per AIS segment.

    The date is AIS-4 (start date/time), else SCH-11.4 (the timing's start).
    The appointment id is SCH-2 (filler), else SCH-1 (placer), else MSH-10;
    the key adds the AIS-3 service code, because one appointment books
    several services. An AIS without a service code is skipped.

    Raises:
        ParseError: SCH or PID is missing, or a date cannot be read.
    """
    sch = next(iter(msg.segments("SCH")), None)
    if sch is None:
        raise ParseError("SIU^S12 carries no SCH segment", location="SCH^1")
    pid = next(iter(msg.segments("PID")), None)
    if pid is None:
        raise ParseError("required segment PID is missing", location="PID^1")
    patient_id, _ = _patient_identifier(pid, CanonicalBatch())
    appointment = _text(sch.value(2, 1)) or _text(sch.value(1, 1)) or msg.control_id
    default_date = _segment_date(sch, 11, component=4)
    booked: list[ScheduledService] = []
    for ais in msg.segments("AIS"):
        code = _text(ais.value(3, 1))
        if code is None:
            continue
        sent_system = _text(ais.value(3, 3)) or ""
        scheduled_on = _segment_date(ais, 4) or default_date
        if scheduled_on is None:
            raise ParseError(
                "no appointment date: send AIS-4 or SCH-11.4", location=ais.location(4)
            )
        system = code_system_from(sent_system) or sent_system
        booked.append(
            ScheduledService(
                appointment_key=(
                    f"hl7:SIU:{msg.sending_facility or ''}:{appointment}:{system}:{code}"
                ),
                patient_id=patient_id,
                code_system=system,
                code=code,
                scheduled_on=scheduled_on,
                source_message_id=message_id,
                status=_text(ais.value(10, 1)) or _text(sch.value(25, 1)),
            )
        )
    return booked


def _coded_services(segments: list[Hl7Segment], field: int) -> list[tuple[str, str]]:
    """Return the distinct (system, code) pairs of a CE/CWE field, in segment order."""
    found: list[tuple[str, str]] = []
    for segment in segments:
        code = _text(segment.value(field, 1))
        if code is None:
            continue
        sent = _text(segment.value(field, 3)) or ""
        pair = (code_system_from(sent) or sent, code)
        if pair not in found:
            found.append(pair)
    return found


def _segment_date(
    segment: Hl7Segment, field: int, *, component: int = 1
) -> dt.date | None:
    text = _text(segment.value(field, component))
    if text is None:
        return None
    try:
        return _to_date(text)
    except ValueError:
        raise ParseError(
            f"invalid date {text!r}; expected YYYYMMDD with an optional time",
            location=segment.location(field, component=component),
        ) from None
