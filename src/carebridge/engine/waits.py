"""Parked workflow steps: charges waiting for their encounter.

Interfaces deliver events out of order: a procedure can arrive before the
encounter it references (a FHIR Procedure whose Encounter comes later, a
CSV export read before the encounters file). An HL7 DFT does not wait,
because its own PV1 registers the visit. Rather than raising a work item at once, charge
capture parks the service in ``waits`` with a deadline. :func:`resume_waits`
wakes the ones whose encounter now exists and prices them, and turns the
ones past their deadline into ``encounter_not_found`` work items. Waiting
costs nothing: no worker polls a parked row until its encounter or its time
arrives.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, insert, select

from carebridge.config.model import Configuration
from carebridge.model import Service, ServiceKind, TransactionType
from carebridge.store.schema import charge_lines, encounters, services, waits, work_items
from carebridge.workflows.charge_capture import ChargeCapture
from carebridge.workflows.reasons import Reason, Rejection

log = logging.getLogger(__name__)

WAITING = "waiting"
RESUMED = "resumed"
EXPIRED = "expired"


def service_to_json(service: Service) -> str:
    """Serialise a service so a parked step can resume from stored state."""
    values: dict[str, Any] = {}
    for item in fields(service):
        value = getattr(service, item.name)
        if isinstance(value, Decimal):
            value = str(value)
        elif isinstance(value, dt.date):
            value = value.isoformat()
        elif isinstance(value, tuple):
            value = list(value)
        values[item.name] = value
    return json.dumps(values, sort_keys=True)


def service_from_json(text: str) -> Service:
    """Rebuild a service written by :func:`service_to_json`."""
    values = json.loads(text)
    for name in ("quantity", "amount", "unit_price"):
        if values.get(name) is not None:
            values[name] = Decimal(values[name])
    if values.get("service_date"):
        values["service_date"] = dt.date.fromisoformat(values["service_date"])
    values["kind"] = ServiceKind(values["kind"])
    values["transaction_type"] = TransactionType(values["transaction_type"])
    values["diagnosis_codes"] = tuple(values.get("diagnosis_codes") or ())
    return Service(**values)


@dataclass(slots=True)
class WaitResult:
    """Counts of one pass over parked steps."""

    charged: int = 0
    work_items: int = 0
    expired: int = 0


def _claim(conn: Connection, query, limit: int) -> list:
    query = query.order_by(waits.c.id).limit(limit)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(of=waits, skip_locked=True)
    return list(conn.execute(query))


def _open_item(conn: Connection, wait_row, rejection: Rejection, now: dt.datetime) -> int:
    subject = f"service:{service_from_json(wait_row.payload).service_key}"
    existing = conn.execute(
        select(work_items.c.id).where(
            work_items.c.subject_key == subject,
            work_items.c.reason == rejection.reason.value,
        )
    ).scalar()
    if existing is not None:
        return existing
    return conn.execute(
        insert(work_items).values(
            subject_key=subject, reason=rejection.reason.value, team=rejection.team.value,
            message_id=wait_row.message_id, detail=rejection.detail, status="open",
            created_at=now,
        )
    ).inserted_primary_key[0]


def _resume(conn: Connection, wait_row, capture: ChargeCapture, config: Configuration,
            now: dt.datetime, result: WaitResult) -> None:
    service = service_from_json(wait_row.payload)
    priced = capture.price(service, encounter_found=True)
    if isinstance(priced, Rejection):
        item_id = _open_item(conn, wait_row, priced, now)
        outcome = {"outcome": "work_item", "work_item_id": item_id}
        result.work_items += 1
    else:
        conn.execute(
            insert(charge_lines).values(
                service_id=wait_row.service_id,
                chargemaster_version=config.chargemaster_version.version_id,
                **{name: getattr(priced, name) for name in priced.__dataclass_fields__},
            )
        )
        outcome = {"outcome": "charged"}
        result.charged += 1
    conn.execute(services.update().where(services.c.id == wait_row.service_id).values(**outcome))
    conn.execute(
        waits.update().where(waits.c.id == wait_row.id).values(state=RESUMED, resolved_at=now)
    )


def resume_waits(
    engine: Engine,
    config: Configuration,
    *,
    now: dt.datetime | None = None,
    as_of: dt.date | None = None,
    limit: int = 500,
) -> WaitResult:
    """Price parked charges whose encounter arrived; expire the overdue ones."""
    now = now or dt.datetime.now(dt.UTC)
    capture = ChargeCapture(config, as_of or now.date())
    result = WaitResult()
    with engine.begin() as conn:
        arrived = (
            select(waits)
            .join(encounters, encounters.c.encounter_id == waits.c.wait_key)
            .where(waits.c.state == WAITING, waits.c.kind == "encounter")
        )
        for row in _claim(conn, arrived, limit):
            _resume(conn, row, capture, config, now, result)
        overdue = select(waits).where(waits.c.state == WAITING, waits.c.deadline <= now)
        for row in _claim(conn, overdue, limit):
            rejection = Rejection(
                Reason.ENCOUNTER_NOT_FOUND,
                f"encounter {row.wait_key} was not registered within "
                f"{config.rules.encounter_wait_hours} hours; send or register the "
                "encounter, then resume this charge",
            )
            item_id = _open_item(conn, row, rejection, now)
            conn.execute(
                services.update().where(services.c.id == row.service_id)
                .values(outcome="work_item", work_item_id=item_id)
            )
            conn.execute(
                waits.update().where(waits.c.id == row.id).values(state=EXPIRED, resolved_at=now)
            )
            result.expired += 1
    if result.charged or result.work_items or result.expired:
        log.info(
            "parked charges resumed",
            extra={"action": "waits_resumed", "charged": result.charged,
                   "work_items": result.work_items, "expired": result.expired},
        )
    return result
