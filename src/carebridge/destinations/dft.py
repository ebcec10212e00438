"""Build DFT^P03 messages from charge lines and enqueue them for delivery.

One charge line becomes one DFT^P03 (HL7 v2.5 chapter 6, "post detail
financial transaction") with the segments MSH, EVN, PID, PV1 and one FT1.
The message is built when the charge line is enqueued and stored as the
delivery's payload, so every resend carries the same bytes. The MLLP
destination replaces MSH-10 with the control id derived from the
delivery's idempotency key (see :func:`carebridge.destinations.mllp.control_id_for`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, select

from carebridge.config.model import Configuration, DestinationConfig
from carebridge.destinations.mllp import MllpSettings
from carebridge.engine.deliveries import enqueue, idempotency_key, utcnow
from carebridge.ingest.hl7v2.ack import hl7_timestamp
from carebridge.ingest.hl7v2.escapes import escape
from carebridge.store.schema import charge_lines, encounters, patients

KIND = "charge_line"

# HL7 table 0004 (patient class) for the encounter classes carebridge maps.
_PATIENT_CLASS = {
    "inpatient": "I",
    "emergency": "E",
    "ambulatory": "O",
    "outpatient": "O",
    "wellness": "O",
    "urgentcare": "O",
}


def _text(value: Any) -> str:
    return "" if value is None else escape(str(value))


def _number(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _money(value: Decimal) -> str:
    # Two places when exact, as the journal payloads write amounts.
    cents = value.quantize(Decimal("0.01"))
    return str(cents) if cents == value else _number(value)


def dft_for_charge(
    conn: Connection,
    charge_line_id: int,
    *,
    settings: MllpSettings | None = None,
    now: dt.datetime | None = None,
) -> bytes:
    """Return the DFT^P03 message of one charge line, UTF-8 with CR terminators.

    Args:
        conn: A connection to the carebridge database.
        charge_line_id: The charge line's id.
        settings: Supplies MSH-3 to MSH-6; the defaults of
            :class:`MllpSettings` without it.
        now: MSH-7 and EVN-2; the current time otherwise.

    Raises:
        LookupError: No charge line has that id.
    """
    line = conn.execute(
        select(charge_lines).where(charge_lines.c.id == charge_line_id)
    ).mappings().first()
    if line is None:
        raise LookupError(f"no charge line with id {charge_line_id}")
    patient = None
    if line["patient_id"]:
        patient = conn.execute(
            select(patients).where(patients.c.patient_id == line["patient_id"])
        ).mappings().first()
    encounter = None
    if line["encounter_id"]:
        encounter = conn.execute(
            select(encounters).where(encounters.c.encounter_id == line["encounter_id"])
        ).mappings().first()
    header = settings or MllpSettings(host="unused", port=1)
    stamp = hl7_timestamp(now or utcnow())
    service_date = line["service_date"].strftime("%Y%m%d")
    currency = _text(line["currency"])
    msh = "|".join((
        "MSH", "^~\\&",
        _text(header.sending_application), _text(header.sending_facility),
        _text(header.receiving_application), _text(header.receiving_facility),
        stamp, "", "DFT^P03^DFT_P03",
        # The MLLP destination replaces this MSH-10 with the delivery's own id.
        f"CL{charge_line_id}", "P", "2.5", "", "", "", "", "", "UNICODE UTF-8",
    ))
    segments = [msh, f"EVN|P03|{stamp}", _pid(line, patient)]
    segments.append(_pv1(line, encounter))
    hcpcs = f"{_text(line['hcpcs'])}^^HCPCS" if line["hcpcs"] else ""
    ft1 = [
        "FT1", "1", str(charge_line_id), "", service_date, stamp, "CG",
        f"{_text(line['charge_code'])}^^CDM", "", "",
        _number(line["units"]),
        f"{_money(line['amount'])}&{currency}",
        f"{_money(line['unit_price'])}&{currency}",
        _text(line["department"]),
        "", "", "", "", "", "", "", "", "", "", "", hcpcs,
    ]
    segments.append("|".join(ft1).rstrip("|"))
    return ("\r".join(segments) + "\r").encode("utf-8")


def _pid(line: Any, patient: Any) -> str:
    identifier = _text(line["patient_id"])
    if patient is None:
        return f"PID|1||{identifier}^^^^MR"
    birth = patient["birth_date"].strftime("%Y%m%d") if patient["birth_date"] else ""
    name = f"{_text(patient['family_name'])}^{_text(patient['given_name'])}"
    gender = _text(patient["gender"])[:1].upper()
    return f"PID|1||{identifier}^^^^MR||{name}||{birth}|{gender}".rstrip("|^")


def _pv1(line: Any, encounter: Any) -> str:
    patient_class = "U"
    if encounter is not None and encounter["encounter_class"]:
        patient_class = _PATIENT_CLASS.get(encounter["encounter_class"].lower(), "U")
    fields = ["PV1", "1", patient_class, _text(line["department"])]
    fields += [""] * 15 + [_text(line["encounter_id"])]
    return "|".join(fields).rstrip("|")


def charge_line_payload(conn: Connection, charge_line_id: int) -> dict[str, Any]:
    """Return a charge line as a JSON-ready mapping, amounts as text."""
    line = conn.execute(
        select(charge_lines).where(charge_lines.c.id == charge_line_id)
    ).mappings().one()
    body = {
        key: (_number(value) if isinstance(value, Decimal) else value)
        for key, value in line.items()
    }
    body["service_date"] = line["service_date"].isoformat()
    return {"kind": KIND, "charge_line": body}


def enqueue_charge_lines(
    conn: Connection,
    config: Configuration,
    charge_line_ids: Iterable[int],
    *,
    now: dt.datetime | None = None,
) -> list[int]:
    """Enqueue charge lines for every destination whose ``kinds`` has ``charge_line``.

    An ``mllp`` destination gets the DFT^P03 of :func:`dft_for_charge`; any
    other type gets :func:`charge_line_payload` as JSON. Call inside the
    transaction that creates the charge lines.

    Returns:
        The delivery ids, in charge line then destination order.
    """
    targets = [d for d in config.destinations if KIND in d.kinds]
    created: list[int] = []
    if not targets:
        return created
    moment = now or utcnow()
    for charge_line_id in sorted(set(charge_line_ids)):
        service_key = conn.execute(
            select(charge_lines.c.service_key).where(charge_lines.c.id == charge_line_id)
        ).scalar_one()
        for target in targets:
            key = idempotency_key(target.name, KIND, service_key)
            payload = _payload(conn, target, charge_line_id, moment)
            created.append(
                enqueue(conn, target.name, KIND, charge_line_id, key, payload, now=moment)
            )
    return created


def _payload(
    conn: Connection, target: DestinationConfig, charge_line_id: int, now: dt.datetime
) -> str | dict[str, Any]:
    if target.type != "mllp":
        return charge_line_payload(conn, charge_line_id)
    settings = MllpSettings.model_validate(target.settings)
    return dft_for_charge(conn, charge_line_id, settings=settings, now=now).decode("utf-8")
