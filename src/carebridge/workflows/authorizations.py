"""Authorizations and referrals: records, the billing hold, scheduling checks, expiry warnings.

Authorization records come from FHIR ServiceRequest, preauthorization
Claim and ClaimResponse resources and HL7 v2 REF^I12 referrals; SIU^S12
books services. Message processing leaves these messages ``processed``
with the resources counted as ignored, and :func:`read_messages` reads the
processed messages again in id order (see ``workflow_cursors`` and
``workflow_marks``), so it can run in any worker without touching message
processing.

:func:`authorization_status` is the check billing runs before it releases
a service whose code the rules list under ``authorizations.required``.
A booked service that needs an authorization and has no approved one is a
work item when it is booked, before the visit. An approved authorization
that ends within ``expiry_warning_days`` is a work item too.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from sqlalchemy import Connection, Row, delete, func, insert, or_, select, update

from carebridge.config.model import Configuration
from carebridge.errors import InputError
from carebridge.ingest.fhir.json import parse_fhir_json
from carebridge.ingest.fhir.mapping import map_authorizations
from carebridge.ingest.hl7v2.mapping import map_referral, map_schedule
from carebridge.ingest.hl7v2.parser import parse_message
from carebridge.model.authorizations import (
    Authorization,
    AuthorizationStatus,
    ScheduledService,
)
from carebridge.store.bodies import raw_column, with_bodies
from carebridge.store.schema import (
    authorizations,
    charge_lines,
    messages,
    scheduled_services,
    workflow_cursors,
    workflow_marks,
)
from carebridge.workflows.reasons import Reason
from carebridge.workflows.work import close_item, open_item, team_for

log = logging.getLogger(__name__)

STEP = "authorizations"
"""The name of this step in ``workflow_cursors`` and ``workflow_marks``."""

CURSOR_GRACE = dt.timedelta(minutes=10)
"""Minimum age of a message before the cursor moves past it. On PostgreSQL an
intake transaction may commit a lower id after a higher one, and intake
transactions are expected to last far less than this."""

HL7_TYPES = (b"REF^I12", b"SIU^S12")
FHIR_TYPES = (b'"ServiceRequest"', b'"Claim"', b'"ClaimResponse"')

# Only HL7 v2 and FHIR JSON messages carry referrals, bookings and
# authorizations. CSV rows, the bulk of a load, are never read by this step.
_READABLE = messages.c.format.like("hl7v2%") | messages.c.format.like("fhir-json%")

AuthorizationState = Literal["approved", "exhausted", "pending", "missing", "expired"]

_REASON_BY_STATE = {
    "missing": Reason.AUTHORIZATION_MISSING,
    "pending": Reason.AUTHORIZATION_PENDING,
    "expired": Reason.AUTHORIZATION_EXPIRED,
}


def authorization_status(
    conn: Connection,
    patient_id: str,
    code: str,
    service_date: dt.date,
    *,
    code_system: str | None = None,
    count_units: bool = False,
) -> AuthorizationState:
    """Return whether a service on ``service_date`` is authorized for the patient.

    ``approved``: an approved authorization for the code covers the date.
    ``exhausted``: approved ones cover the date, but with ``count_units``
    the units charged for the code from their start through the date
    exceed the units they grant (see :func:`units_charged`).
    ``pending``: none is approved, but one is still waiting for a decision.
    ``expired``: an approved one existed but ended before the date.
    ``missing``: nothing else (none at all, denied, cancelled, or one that
    starts after the date).

    Args:
        conn: An open connection.
        patient_id: The patient id as the services carry it.
        code: The service code, in the code system the authorization names.
        service_date: The date of service.
        code_system: Restricts the match to one code system when given.
        count_units: Compare the units charged with the units granted.
            Billing asks for this; a booking (not yet charged) does not.
    """
    query = select(authorizations.c.status, authorizations.c.valid_from,
                   authorizations.c.valid_to, authorizations.c.units).where(
        authorizations.c.patient_id == patient_id, authorizations.c.code == code
    )
    if code_system is not None:
        query = query.where(authorizations.c.code_system == code_system)
    found: set[str] = set()
    covering = []
    for row in conn.execute(query):
        if row.valid_from is not None and row.valid_from > service_date:
            continue
        ended = row.valid_to is not None and row.valid_to < service_date
        if row.status == AuthorizationStatus.APPROVED:
            found.add("expired" if ended else "approved")
            if not ended:
                covering.append(row)
        elif row.status == AuthorizationStatus.PENDING and not ended:
            found.add("pending")
    if "approved" in found and count_units and all(r.units is not None for r in covering):
        granted = sum((Decimal(str(r.units)) for r in covering), Decimal(0))
        starts = [r.valid_from for r in covering]
        since = None if None in starts else min(starts)
        used = units_charged(conn, patient_id, code, code_system, since, service_date)
        if used > granted:
            return "exhausted"
    for state in ("approved", "pending", "expired"):
        if state in found:
            return state  # type: ignore[return-value]
    return "missing"


def units_charged(
    conn: Connection,
    patient_id: str,
    code: str,
    code_system: str | None,
    since: dt.date | None,
    through: dt.date,
) -> Decimal:
    """Return the units charged to the patient for ``code`` between two dates.

    CPT and HCPCS codes match a charge line's HCPCS code, CDM codes its
    charge code; with no code system either matches. Credits (negative
    units) give units back.
    """
    if code_system in ("CPT", "HCPCS"):
        matches = charge_lines.c.hcpcs == code
    elif code_system == "CDM":
        matches = charge_lines.c.charge_code == code
    else:
        matches = or_(charge_lines.c.hcpcs == code, charge_lines.c.charge_code == code)
    query = select(charge_lines.c.units).where(
        charge_lines.c.patient_id == patient_id, matches,
        charge_lines.c.service_date <= through,
    )
    if since is not None:
        query = query.where(charge_lines.c.service_date >= since)
    return sum((Decimal(str(units)) for units in conn.execute(query).scalars()), Decimal(0))


@dataclass(slots=True)
class AuthorizationResult:
    """Counts of one pass of the authorization step."""

    messages: int = 0
    authorizations: int = 0
    scheduled: int = 0
    work_items: int = 0
    warnings: int = 0


def read_messages(
    conn: Connection, config: Configuration, *, limit: int = 500
) -> AuthorizationResult:
    """Read processed messages not read yet and store the authorizations and bookings in them."""
    result = AuthorizationResult()
    cursor = _cursor(conn)
    read = select(workflow_marks.c.message_id).where(workflow_marks.c.step == STEP)
    rows = conn.execute(
        select(messages.c.id, messages.c.format, raw_column())
        .select_from(with_bodies())
        .where(messages.c.id > cursor, messages.c.state == "processed", _READABLE,
               messages.c.id.not_in(read))
        .order_by(messages.c.id)
        .limit(limit)
    ).all()
    for row in rows:
        _read_one(conn, config, row, result)
    if rows:
        conn.execute(insert(workflow_marks), [{"step": STEP, "message_id": row.id}
                                              for row in rows])
        result.messages = len(rows)
    _advance_cursor(conn, cursor)
    return result


def _read_one(conn: Connection, config: Configuration, row: Row,
              result: AuthorizationResult) -> None:
    raw = row.raw
    if raw is None:
        return
    fmt = row.format
    try:
        if fmt.startswith("hl7v2"):
            head = bytes(raw[:1024])
            if not any(kind in head for kind in HL7_TYPES):
                return
            charset = fmt.split("charset=", 1)[1] if "charset=" in fmt else "utf-8"
            message = parse_message(bytes(raw), default_charset=charset)
            kind = (message.message_code, message.trigger)
            if kind == ("REF", "I12"):
                for record in map_referral(message, row.id):
                    _store_authorization(conn, config, record, result)
            elif kind == ("SIU", "S12"):
                for booked in map_schedule(message, row.id):
                    _store_booking(conn, config, booked, result)
        elif fmt.startswith("fhir-json"):
            if not any(kind in bytes(raw) for kind in FHIR_TYPES):
                return
            for record in map_authorizations(parse_fhir_json(bytes(raw)), row.id):
                _store_authorization(conn, config, record, result)
    except InputError as exc:
        # The message was processed for finance, but its authorization or
        # booking content cannot be read: a person corrects and replays it.
        log.warning("authorization content rejected",
                    extra={"action": "authorization_failed", "message_id": row.id,
                           "error_type": type(exc).__name__})
        rules = config.rule_book.in_force(None)
        _, created = open_item(
            conn, subject_key=f"authorization:message:{row.id}",
            reason=Reason.MALFORMED_INPUT, team=team_for(Reason.MALFORMED_INPUT, rules),
            message_id=row.id, detail=f"authorization or booking not read: {exc}",
        )
        result.work_items += int(created)


def _cursor(conn: Connection) -> int:
    value = conn.execute(
        select(workflow_cursors.c.last_message_id).where(workflow_cursors.c.step == STEP)
    ).scalar()
    return value or 0


def _advance_cursor(conn: Connection, cursor: int) -> None:
    """Move the cursor over every message that is read or needs no reading.

    It stops before the first HL7 v2 or FHIR message still to be processed
    or read, and never passes a message younger than :data:`CURSOR_GRACE`.
    """
    read = select(workflow_marks.c.message_id).where(workflow_marks.c.step == STEP)
    waiting = conn.execute(
        select(func.min(messages.c.id)).where(
            messages.c.id > cursor, _READABLE,
            (messages.c.state == "received")
            | ((messages.c.state == "processed") & messages.c.id.not_in(read)),
        )
    ).scalar()
    settled = conn.execute(
        select(func.max(messages.c.id)).where(
            messages.c.id > cursor,
            messages.c.received_at < dt.datetime.now(dt.UTC) - CURSOR_GRACE,
        )
    ).scalar()
    if settled is None:
        return
    target = settled if waiting is None else min(settled, waiting - 1)
    if target <= cursor:
        return
    now = dt.datetime.now(dt.UTC)
    if conn.execute(
        update(workflow_cursors).where(workflow_cursors.c.step == STEP)
        .values(last_message_id=target, updated_at=now)
    ).rowcount == 0:
        conn.execute(insert(workflow_cursors).values(step=STEP, last_message_id=target,
                                                     updated_at=now))
    conn.execute(delete(workflow_marks).where(workflow_marks.c.step == STEP,
                                              workflow_marks.c.message_id <= target))


def _store_authorization(conn: Connection, config: Configuration, record: Authorization,
                         result: AuthorizationResult) -> None:
    """Insert or update one authorization record, then re-check the bookings it covers."""
    now = dt.datetime.now(dt.UTC)
    decision = record.code is None
    if decision and record.auth_key.endswith("#*"):
        targets = conn.execute(
            select(authorizations).where(authorizations.c.request_key == record.request_key)
        ).mappings().all()
    else:
        targets = conn.execute(
            select(authorizations).where(authorizations.c.auth_key == record.auth_key)
        ).mappings().all()
    if not targets:
        values = _values(record)
        if not decision:
            values.update(_earlier_decision(conn, record))
        conn.execute(insert(authorizations).values(
            auth_key=record.auth_key, source=record.source, request_key=record.request_key,
            source_message_id=record.source_message_id, created_at=now, **values))
        result.authorizations += 1
    for target in targets:
        values = _values(record)
        if decision:
            values = {name: value for name, value in values.items()
                      if name == "status" or value is not None}
            for name in ("patient_id", "code_system", "code", "units"):
                values.pop(name, None)
        elif target["status"] in (AuthorizationStatus.APPROVED, AuthorizationStatus.DENIED) \
                and record.status is AuthorizationStatus.PENDING \
                and record.source == "fhir:Claim":
            # A resent preauthorization request never undoes its decision.
            values.pop("status")
        conn.execute(update(authorizations).where(authorizations.c.id == target["id"])
                     .values(**values))
        result.authorizations += 1
    _check_units(conn, config, record, result)
    if record.patient_id and record.code:
        _recheck_bookings(conn, record.patient_id, record.code)
    elif record.request_key:
        for row in conn.execute(select(authorizations.c.patient_id, authorizations.c.code)
                                .where(authorizations.c.request_key == record.request_key)):
            if row.patient_id and row.code:
                _recheck_bookings(conn, row.patient_id, row.code)


def _values(record: Authorization) -> dict[str, object]:
    return {
        "status": record.status.value,
        "patient_id": record.patient_id,
        "code_system": record.code_system,
        "code": record.code,
        "units": record.units,
        "valid_from": record.valid_from,
        "valid_to": record.valid_to,
        "reference": record.reference,
        "updated_message_id": record.source_message_id,
        "updated_at": dt.datetime.now(dt.UTC),
    }


def _earlier_decision(conn: Connection, record: Authorization) -> dict[str, object]:
    """Return the decision a ClaimResponse made before its Claim arrived, if any."""
    if record.request_key is None:
        return {}
    earlier = conn.execute(
        select(authorizations.c.status, authorizations.c.valid_from,
               authorizations.c.valid_to, authorizations.c.reference)
        .where(authorizations.c.auth_key == f"{record.request_key}#*")
    ).first()
    if earlier is None:
        return {}
    return {name: value for name, value in earlier._mapping.items() if value is not None}


def _check_units(conn: Connection, config: Configuration, record: Authorization,
                 result: AuthorizationResult) -> None:
    rules = config.rule_book.in_force(record.valid_from)
    limit = rules.validation.max_authorized_units
    if record.units is None or record.units <= limit:
        return
    _, created = open_item(
        conn, subject_key=f"authorization:{record.auth_key}",
        reason=Reason.UNITS_TOO_HIGH, team=team_for(Reason.UNITS_TOO_HIGH, rules),
        message_id=record.source_message_id,
        detail=(f"authorization {record.auth_key} grants {record.units} units, above the "
                f"limit {limit} of rules {rules.version}; check it with the payer"),
    )
    result.work_items += int(created)


def _store_booking(conn: Connection, config: Configuration, booked: ScheduledService,
                   result: AuthorizationResult) -> None:
    """Store a booked service once and raise a work item when it lacks an authorization."""
    exists = conn.execute(
        select(scheduled_services.c.id)
        .where(scheduled_services.c.appointment_key == booked.appointment_key)
    ).scalar()
    if exists is not None:
        return
    rules = config.rule_book.in_force(booked.scheduled_on)
    state: str | None = None
    if rules.needs_authorization(booked.code_system, booked.code):
        state = authorization_status(conn, booked.patient_id, booked.code,
                                     booked.scheduled_on, code_system=booked.code_system)
    conn.execute(insert(scheduled_services).values(
        appointment_key=booked.appointment_key, patient_id=booked.patient_id,
        code_system=booked.code_system, code=booked.code, scheduled_on=booked.scheduled_on,
        status=booked.status, authorization_status=state, message_id=booked.source_message_id,
        created_at=dt.datetime.now(dt.UTC)))
    result.scheduled += 1
    if state is None or state == "approved":
        return
    reason = _REASON_BY_STATE[state]
    _, created = open_item(
        conn, subject_key=f"schedule:{booked.appointment_key}", reason=reason,
        team=team_for(reason, rules), message_id=booked.source_message_id,
        detail=(f"{booked.code_system} {booked.code} is booked for "
                f"{booked.scheduled_on.isoformat()} and needs an authorization (rules "
                f"{rules.version}); it is {state}: obtain or renew it before the visit"),
    )
    result.work_items += int(created)


def _recheck_bookings(conn: Connection, patient_id: str, code: str) -> None:
    """Close the work items of bookings that an authorization now covers."""
    rows = conn.execute(
        select(scheduled_services).where(
            scheduled_services.c.patient_id == patient_id,
            scheduled_services.c.code == code,
            scheduled_services.c.authorization_status.in_(tuple(_REASON_BY_STATE)),
        )
    ).mappings().all()
    for row in rows:
        state = authorization_status(conn, patient_id, code, row["scheduled_on"],
                                     code_system=row["code_system"])
        if state == row["authorization_status"]:
            continue
        conn.execute(update(scheduled_services).where(scheduled_services.c.id == row["id"])
                     .values(authorization_status=state))
        if state == "approved":
            close_item(conn, f"schedule:{row['appointment_key']}",
                       _REASON_BY_STATE[row["authorization_status"]],
                       "an approved authorization now covers the booking")


def warn_expiring(conn: Connection, config: Configuration, today: dt.date) -> int:
    """Open a work item for each approved authorization that ends within the warning days.

    Returns:
        The number of work items opened.
    """
    rules = config.rule_book.in_force(today)
    horizon = today + dt.timedelta(days=rules.expiry_warning_days)
    rows = conn.execute(
        select(authorizations.c.id, authorizations.c.auth_key, authorizations.c.valid_to,
               authorizations.c.updated_message_id)
        .where(authorizations.c.status == AuthorizationStatus.APPROVED.value,
               authorizations.c.valid_to >= today, authorizations.c.valid_to <= horizon)
        .order_by(authorizations.c.id)
    ).all()
    opened = 0
    for row in rows:
        _, created = open_item(
            conn, subject_key=f"authorization:{row.id}:expires:{row.valid_to.isoformat()}",
            reason=Reason.AUTHORIZATION_EXPIRING,
            team=team_for(Reason.AUTHORIZATION_EXPIRING, rules),
            message_id=row.updated_message_id,
            detail=(f"authorization {row.auth_key} ends on {row.valid_to.isoformat()}, within "
                    f"{rules.expiry_warning_days} days; renew it if services continue"),
        )
        opened += int(created)
    return opened
