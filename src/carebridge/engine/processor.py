"""Process stored messages in batches: map, capture charges, issue supplies.

A batch of received messages is claimed in id order, each message is handled
inside its own savepoint, and the batch commits its outputs together with the
messages' new state: there is no moment where a charge exists but its message
still looks unprocessed, or the reverse. A message that raises becomes a
failed message with a work item; the messages behind it go on.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, insert, select

from carebridge.config.model import Configuration
from carebridge.engine.intake import FAILED, PROCESSED, RECEIVED, open_work_item
from carebridge.errors import InputError
from carebridge.ingest.registry import map_raw
from carebridge.model import NULL, CanonicalBatch, Encounter, Patient, Service, SupplyUse
from carebridge.store.schema import (
    charge_lines,
    encounters,
    messages,
    patients,
    services,
    supply_issues,
    supply_usages,
)
from carebridge.workflows.charge_capture import ChargeCapture
from carebridge.workflows.reasons import Reason, Rejection
from carebridge.workflows.supplies import issue_supply

log = logging.getLogger(__name__)

CHARGED = "charged"
WORK_ITEM = "work_item"
DUPLICATE = "duplicate"
ISSUED = "issued"


@dataclass(slots=True)
class ProcessResult:
    """Counts of one processing pass."""

    processed: int = 0
    failed: int = 0


def _upsert_patient(conn: Connection, patient: Patient) -> None:
    fields = ("mrn", "family_name", "given_name", "birth_date", "gender",
              "home_phone", "business_phone")
    # HL7 v2 null semantics: NULL ("" on the wire) clears the stored value,
    # None (field not sent) leaves it unchanged.
    sent = {
        name: (None if value is NULL else value)
        for name in fields
        if (value := getattr(patient, name)) is not None
    }
    exists = conn.execute(
        select(patients.c.patient_id).where(patients.c.patient_id == patient.patient_id)
    ).first()
    if exists is None:
        conn.execute(
            insert(patients).values(
                patient_id=patient.patient_id,
                source_message_id=patient.source_message_id,
                updated_message_id=patient.source_message_id,
                **sent,
            )
        )
    else:
        conn.execute(
            patients.update()
            .where(patients.c.patient_id == patient.patient_id)
            .values(updated_message_id=patient.source_message_id, **sent)
        )


def _upsert_encounter(conn: Connection, encounter: Encounter) -> None:
    values = {
        "patient_id": encounter.patient_id,
        "encounter_class": encounter.encounter_class,
        "start": encounter.start,
        "end": encounter.end,
        "code": encounter.code,
        "code_system": encounter.code_system,
        "department": encounter.department,
        "guarantor": (
            json.dumps(_guarantor_dict(encounter)) if encounter.guarantor else None
        ),
    }
    sent = {name: value for name, value in values.items() if value is not None}
    exists = conn.execute(
        select(encounters.c.encounter_id).where(
            encounters.c.encounter_id == encounter.encounter_id
        )
    ).first()
    if exists is None:
        conn.execute(
            insert(encounters).values(
                encounter_id=encounter.encounter_id,
                source_message_id=encounter.source_message_id,
                updated_message_id=encounter.source_message_id,
                **sent,
            )
        )
    else:
        conn.execute(
            encounters.update()
            .where(encounters.c.encounter_id == encounter.encounter_id)
            .values(updated_message_id=encounter.source_message_id, **sent)
        )


def _guarantor_dict(encounter: Encounter) -> dict[str, str | None]:
    guarantor = encounter.guarantor
    assert guarantor is not None
    return {
        "family_name": guarantor.family_name,
        "given_name": guarantor.given_name,
        "relationship": guarantor.relationship,
        "phone": guarantor.phone,
    }


class BatchApplier:
    """Applies one message's canonical records inside an open transaction."""

    def __init__(self, conn: Connection, config: Configuration, capture: ChargeCapture):
        self.conn = conn
        self.config = config
        self.capture = capture
        self.outcomes: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.outcomes[name] = self.outcomes.get(name, 0) + 1

    def apply(self, batch: CanonicalBatch) -> None:
        """Store patients and encounters, then capture services and supplies."""
        for patient in batch.patients:
            _upsert_patient(self.conn, patient)
        for encounter in batch.encounters:
            _upsert_encounter(self.conn, encounter)
        for service in batch.services:
            self.capture_service(service, origin="clinical")
        for use in batch.supplies:
            self.issue(use)

    def _encounter_class(self, encounter_id: str | None) -> str | None:
        if encounter_id is None:
            return None
        row = self.conn.execute(
            select(encounters.c.encounter_class).where(
                encounters.c.encounter_id == encounter_id
            )
        ).first()
        if row is None:
            return None
        return row.encounter_class or ""

    def capture_service(self, service: Service, *, origin: str) -> None:
        """Record ``service`` as a charge line, a work item or a duplicate."""
        row = {
            "service_key": service.service_key,
            "message_id": service.source_message_id,
            "origin": origin,
            "kind": service.kind.value,
            "code_system": service.code_system,
            "code": service.code,
            "quantity": service.quantity,
            "service_date": service.service_date,
            "patient_id": service.patient_id,
            "encounter_id": service.encounter_id,
        }
        seen = self.conn.execute(
            select(services.c.id).where(services.c.service_key == service.service_key).limit(1)
        ).first()
        if seen is not None:
            self.conn.execute(insert(services).values(outcome=DUPLICATE, **row))
            self._count(f"{origin}_{DUPLICATE}")
            return
        encounter_found = self._encounter_class(service.encounter_id) is not None
        result = self.capture.price(service, encounter_found)
        if isinstance(result, Rejection):
            item_id = open_work_item(
                self.conn,
                subject_key=f"service:{service.service_key}",
                rejection=result,
                message_id=service.source_message_id,
            )
            self.conn.execute(
                insert(services).values(outcome=WORK_ITEM, work_item_id=item_id, **row)
            )
            self._count(f"{origin}_{WORK_ITEM}")
            return
        service_id = self.conn.execute(
            insert(services).values(outcome=CHARGED, **row)
        ).inserted_primary_key[0]
        line = result
        self.conn.execute(
            insert(charge_lines).values(
                service_id=service_id,
                chargemaster_version=self.config.chargemaster_version.version_id,
                **{name: getattr(line, name) for name in line.__dataclass_fields__},
            )
        )
        self._count(f"{origin}_{CHARGED}")

    def issue(self, use: SupplyUse) -> None:
        """Record ``use`` as an inventory issue, a work item or a duplicate."""
        row = {
            "usage_key": use.usage_key,
            "message_id": use.source_message_id,
            "code_system": use.code_system,
            "code": use.code,
            "quantity": use.quantity,
        }
        seen = self.conn.execute(
            select(supply_usages.c.id).where(supply_usages.c.usage_key == use.usage_key).limit(1)
        ).first()
        if seen is not None:
            self.conn.execute(insert(supply_usages).values(outcome=DUPLICATE, **row))
            self._count(f"supply_{DUPLICATE}")
            return
        result = issue_supply(use, self._encounter_class(use.encounter_id), self.config)
        if isinstance(result, Rejection):
            item_id = open_work_item(
                self.conn,
                subject_key=f"supply:{use.usage_key}",
                rejection=result,
                message_id=use.source_message_id,
            )
            self.conn.execute(
                insert(supply_usages).values(outcome=WORK_ITEM, work_item_id=item_id, **row)
            )
            self._count(f"supply_{WORK_ITEM}")
            return
        usage_id = self.conn.execute(
            insert(supply_usages).values(outcome=ISSUED, **row)
        ).inserted_primary_key[0]
        issue = result.issue
        self.conn.execute(
            insert(supply_issues).values(
                usage_id=usage_id,
                **{name: getattr(issue, name) for name in issue.__dataclass_fields__},
            )
        )
        self._count(f"supply_{ISSUED}")
        if result.charge_service is not None:
            self.capture_service(result.charge_service, origin="supply")


def _fail_message(conn: Connection, message_id: int, exc: Exception) -> None:
    rejection = Rejection(Reason.MALFORMED_INPUT, str(exc) or type(exc).__name__)
    open_work_item(
        conn, subject_key=f"message:{message_id}", rejection=rejection, message_id=message_id
    )
    conn.execute(
        messages.update()
        .where(messages.c.id == message_id)
        .values(
            state=FAILED,
            error=rejection.detail,
            summary=json.dumps({"reason": rejection.reason.value}),
            processed_at=dt.datetime.now(dt.UTC),
        )
    )


def _process_one(conn: Connection, row, applier: BatchApplier) -> bool:
    savepoint = conn.begin_nested()
    try:
        batch = map_raw(row.format, row.raw, row.id, row.occurrence)
        applier.outcomes = {}
        applier.apply(batch)
        summary = {
            "outcomes": applier.outcomes,
            "warnings": batch.warnings,
            "ignored": batch.ignored,
        }
        conn.execute(
            messages.update()
            .where(messages.c.id == row.id)
            .values(
                state=PROCESSED,
                summary=json.dumps(summary, sort_keys=True),
                processed_at=dt.datetime.now(dt.UTC),
            )
        )
        savepoint.commit()
        return True
    except InputError as exc:
        savepoint.rollback()
        failure: Exception = exc
        log.warning(
            "message rejected",
            extra={"action": "message_failed", "message_id": row.id,
                   "error_type": type(exc).__name__},
        )
    except Exception as exc:  # noqa: BLE001 - a poison message must not stop the batch
        savepoint.rollback()
        # The exception text may quote message content, so the log names only
        # its type; the full text goes to the work item, which is access
        # controlled like the message itself.
        log.error(
            "message processing raised",
            extra={"action": "message_error", "message_id": row.id,
                   "error_type": type(exc).__name__},
        )
        failure = Exception(f"processing failed: {type(exc).__name__}: {exc}")
    _fail_message(conn, row.id, failure)
    return False


def process_pending(
    engine: Engine,
    config: Configuration,
    *,
    as_of: dt.date | None = None,
    batch_size: int = 200,
    progress: Callable[[int], None] | None = None,
) -> ProcessResult:
    """Process every received message, oldest first, ``batch_size`` per commit.

    Args:
        engine: the database.
        config: master data and rules to price and post with.
        as_of: the date that bounds service dates from above when the rules
            set no latest date; today when ``None``.
        batch_size: messages per transaction.
        progress: called with the number of messages finished in each batch.
    """
    capture = ChargeCapture(config, as_of or dt.date.today())
    result = ProcessResult()
    while True:
        with engine.begin() as conn:
            rows = conn.execute(
                select(messages.c.id, messages.c.format, messages.c.raw, messages.c.occurrence)
                .where(messages.c.state == RECEIVED)
                .order_by(messages.c.id)
                .limit(batch_size)
            ).all()
            if not rows:
                break
            applier = BatchApplier(conn, config, capture)
            for row in rows:
                if _process_one(conn, row, applier):
                    result.processed += 1
                else:
                    result.failed += 1
        if progress:
            progress(len(rows))
    log.info(
        "processing finished",
        extra={"action": "process_done", "processed": result.processed,
               "failed": result.failed},
    )
    return result
