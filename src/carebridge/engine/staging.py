"""Batch staging: what each message of a batch produces, decided in memory.

:class:`MessageApplier` turns one message's canonical records into staged
rows (patients, encounters, services with their charge, wait or work item,
supply usages with their issue) and :class:`BatchState` contains what the batch
prefetched from the database and what its earlier messages staged, so that
each message sees the ones before it. Nothing here writes to the database.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Connection, select

from carebridge.config.model import Configuration
from carebridge.engine.intake import PROCESSED
from carebridge.engine.waits import service_to_json
from carebridge.errors import InputError
from carebridge.model import NULL, CanonicalBatch, Encounter, Patient, Service, SupplyUse
from carebridge.store.lookups import among
from carebridge.store.schema import encounters, patients, services, supply_usages
from carebridge.workflows.charge_capture import ChargeCapture
from carebridge.workflows.reasons import Reason, Rejection
from carebridge.workflows.supplies import issue_supply

CHARGED = "charged"
WORK_ITEM = "work_item"
DUPLICATE = "duplicate"
ISSUED = "issued"
WAITING = "waiting"

PATIENT_FIELDS = ("mrn", "family_name", "given_name", "birth_date", "gender",
                  "home_phone", "business_phone")
ENCOUNTER_FIELDS = ("patient_id", "encounter_class", "start", "end", "code",
                    "code_system", "department", "guarantor")


class EncounterConflict(InputError):
    """A message assigns an existing encounter to a different patient.

    Visit numbers are not unique across senders everywhere, so rewriting the
    encounter would move its charges to the wrong patient; a person decides.
    """

    reason = Reason.ENCOUNTER_PATIENT_CONFLICT


@dataclass(slots=True)
class ProcessResult:
    """Counts of one processing pass."""

    processed: int = 0
    failed: int = 0
    batches: int = 0


def fingerprint(*parts: object) -> str:
    """Return a short hash of ``parts``, used to compare two copies of an event."""
    text = "\x1f".join("" if part is None else str(part) for part in parts)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def service_fingerprint(service: Service) -> str:
    """Return the fingerprint of the content of ``service``, not of its origin."""
    return fingerprint(
        service.code_system, service.code, service.quantity, service.service_date,
        service.amount, service.unit_price, service.transaction_type.value,
        service.currency, service.encounter_id,
    )


def usage_fingerprint(use: SupplyUse) -> str:
    """Return the fingerprint of the content of a supply usage.

    The encounter is left out because FHIR R4 SupplyDelivery has no element
    for it, so the same usage arrives with and without one.
    """
    return fingerprint(
        use.code_system, use.code, use.quantity, use.service_date,
        use.lot_number, use.serial_number,
    )


def _patient_values(patient: Patient) -> dict[str, Any]:
    # HL7 v2 null semantics: NULL ("" on the wire) clears the stored value,
    # None (field not sent) leaves it unchanged.
    return {
        name: (None if value is NULL else value)
        for name in PATIENT_FIELDS
        if (value := getattr(patient, name)) is not None
    }


def _encounter_values(encounter: Encounter) -> dict[str, Any]:
    guarantor = encounter.guarantor
    values = {
        "patient_id": encounter.patient_id,
        "encounter_class": encounter.encounter_class,
        "start": encounter.start,
        "end": encounter.end,
        "code": encounter.code,
        "code_system": encounter.code_system,
        "department": encounter.department,
        "guarantor": json.dumps(
            {
                "family_name": guarantor.family_name,
                "given_name": guarantor.given_name,
                "relationship": guarantor.relationship,
                "phone": guarantor.phone,
            }
        ) if guarantor else None,
    }
    return {name: value for name, value in values.items() if value is not None}


@dataclass(slots=True)
class Writes:
    """Rows one message (or a whole batch, once merged) adds or changes."""

    patients: dict[str, dict[str, Any]] = field(default_factory=dict)
    encounters: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: list[dict[str, Any]] = field(default_factory=list)
    usages: list[dict[str, Any]] = field(default_factory=list)
    diagnoses: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    work_items: list[dict[str, Any]] = field(default_factory=list)

    def merge(self, other: Writes) -> None:
        """Append ``other``'s rows; later values win for the same patient or encounter."""
        for key, values in other.patients.items():
            self.patients.setdefault(key, {}).update(values)
        for key, values in other.encounters.items():
            self.encounters.setdefault(key, {}).update(values)
        self.services.extend(other.services)
        self.usages.extend(other.usages)
        self.diagnoses.extend(other.diagnoses)
        self.messages.extend(other.messages)
        self.work_items.extend(other.work_items)


class BatchState:
    """Lookup state of a batch: rows prefetched from the database plus its own writes."""

    def __init__(self, conn: Connection, config: Configuration, capture: ChargeCapture):
        self.conn = conn
        self.config = config
        self.capture = capture
        self.known_patients: set[str] = set()
        self.encounter_classes: dict[str, str] = {}
        self.encounter_patients: dict[str, str] = {}
        self.service_prints: dict[str, str] = {}
        self.usage_prints: dict[str, str] = {}
        self.writes = Writes()

    def prefetch(self, batches: Sequence[CanonicalBatch]) -> None:
        """Load the rows the batch's records refer to, a few queries per table."""
        patient_ids = {p.patient_id for b in batches for p in b.patients}
        encounter_ids = {e.encounter_id for b in batches for e in b.encounters}
        encounter_ids |= {s.encounter_id for b in batches for s in b.services if s.encounter_id}
        encounter_ids |= {u.encounter_id for b in batches for u in b.supplies if u.encounter_id}
        service_keys = {s.service_key for b in batches for s in b.services}
        service_keys |= {f"supply-charge:{u.usage_key}" for b in batches for u in b.supplies}
        usage_keys = {u.usage_key for b in batches for u in b.supplies}

        for chunk in _chunks(patient_ids):
            rows = self.conn.execute(
                select(patients.c.patient_id).where(self._among(patients.c.patient_id, chunk))
            )
            self.known_patients.update(rows.scalars())
        for chunk in _chunks(encounter_ids):
            rows = self.conn.execute(
                select(
                    encounters.c.encounter_id,
                    encounters.c.encounter_class,
                    encounters.c.patient_id,
                ).where(self._among(encounters.c.encounter_id, chunk))
            )
            for row in rows:
                self.encounter_classes[row.encounter_id] = row.encounter_class or ""
                self.encounter_patients[row.encounter_id] = row.patient_id
        self._prefetch_prints(services, services.c.service_key, service_keys, self.service_prints)
        self._prefetch_prints(
            supply_usages, supply_usages.c.usage_key, usage_keys, self.usage_prints
        )

    def _among(self, column: ColumnElement[str], values: list[str]) -> ColumnElement[bool]:
        return among(self.conn, column, values)

    def _prefetch_prints(self, table, key_column, keys: set[str], into: dict[str, str]) -> None:
        for chunk in _chunks(keys):
            rows = self.conn.execute(
                select(key_column, table.c.fingerprint)
                .where(self._among(key_column, chunk))
                .order_by(table.c.id)
            )
            for key, print_ in rows:
                into.setdefault(key, print_)


def _chunks(values: set[str] | list[str], size: int = 500) -> list[list[str]]:
    ordered = sorted(values)
    return [ordered[start : start + size] for start in range(0, len(ordered), size)]


class MessageApplier:
    """Decides what one message's canonical records produce, in memory.

    Lookups see the batch state and this message's own earlier records, so a
    FHIR bundle's procedure finds the encounter the same bundle carried.
    """

    def __init__(self, state: BatchState, message_id: int, run_id: int | None) -> None:
        self.state = state
        self.message_id = message_id
        self.run_id = run_id
        self.writes = Writes()
        self.outcomes: dict[str, int] = {}
        self.service_prints: dict[str, str] = {}
        self.usage_prints: dict[str, str] = {}

    def _count(self, name: str) -> None:
        self.outcomes[name] = self.outcomes.get(name, 0) + 1

    def apply(self, batch: CanonicalBatch) -> None:
        """Stage patients and encounters, then capture services and supplies."""
        for patient in batch.patients:
            self.writes.patients.setdefault(patient.patient_id, {}).update(
                {"_source": patient.source_message_id, **_patient_values(patient)}
            )
        for encounter in batch.encounters:
            self._check_patient(encounter)
            self.writes.encounters.setdefault(encounter.encounter_id, {}).update(
                {"_source": encounter.source_message_id, **_encounter_values(encounter)}
            )
        for service in batch.services:
            self.capture_service(service, origin="clinical")
        for use in batch.supplies:
            self.issue(use)

    def _check_patient(self, encounter: Encounter) -> None:
        """Raise if ``encounter`` is known under another patient."""
        known = None
        for staged in (self.writes.encounters, self.state.writes.encounters):
            if encounter.encounter_id in staged:
                known = staged[encounter.encounter_id].get("patient_id")
                break
        known = known or self.state.encounter_patients.get(encounter.encounter_id)
        if known is not None and known != encounter.patient_id:
            raise EncounterConflict(
                f"encounter {encounter.encounter_id} belongs to patient {known}, but "
                f"this message assigns it to patient {encounter.patient_id}; check the "
                "sender's visit numbers (PV1-19) or merge the patients, then replay"
            )

    def encounter_class(self, encounter_id: str | None) -> str | None:
        """Return the class of a known encounter ('' if unset), or ``None``."""
        if encounter_id is None:
            return None
        for staged in (self.writes.encounters, self.state.writes.encounters):
            if encounter_id in staged:
                return staged[encounter_id].get("encounter_class") or (
                    self.state.encounter_classes.get(encounter_id, "")
                )
        return self.state.encounter_classes.get(encounter_id)

    def _seen(self, key: str, own: dict[str, str], batch: dict[str, str]) -> str | None:
        return own.get(key) or batch.get(key)

    def _work_item(self, subject_key: str, rejection: Rejection) -> dict[str, Any]:
        row = {
            "subject_key": subject_key,
            "reason": rejection.reason.value,
            "team": rejection.team.value,
            "message_id": self.message_id,
            "detail": rejection.detail,
            "status": "open",
            "created_at": dt.datetime.now(dt.UTC),
        }
        self.writes.work_items.append(row)
        return row

    def _mark_repeat(
        self, row: dict[str, Any], earlier: str, counter: str, subject: str, detail: str
    ) -> None:
        """Stage a key received before: a duplicate, or a conflict when it differs.

        ``earlier`` is the first copy's fingerprint; a different one means the
        sender reused the key for other content, which a person must resolve.
        """
        row["outcome"] = DUPLICATE
        self._count(counter)
        if earlier != row["fingerprint"]:
            row["outcome"] = WORK_ITEM
            row["_work_item"] = self._work_item(
                f"{subject}#conflict:{self.message_id}",
                Rejection(Reason.SERVICE_KEY_CONFLICT, detail),
            )

    def capture_service(self, service: Service, *, origin: str) -> None:
        """Stage ``service`` as a charge line, a work item or a duplicate."""
        print_ = service_fingerprint(service)
        row: dict[str, Any] = {
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
            "fingerprint": print_,
            "_charge": None,
            "_work_item": None,
            "_wait": None,
        }
        self.writes.services.append(row)
        earlier = self._seen(service.service_key, self.service_prints, self.state.service_prints)
        if earlier is not None:
            self._mark_repeat(
                row, earlier, f"{origin}_{DUPLICATE}", f"service:{service.service_key}",
                f"service {service.service_key} was received before with different "
                "content (code, units, date or price); decide which is right and "
                "post a correction",
            )
            return
        self.service_prints[service.service_key] = print_
        encounter_found = self.encounter_class(service.encounter_id) is not None
        wait_hours = self.state.config.rules.encounter_wait_hours
        if service.encounter_id is not None and not encounter_found and wait_hours > 0:
            # The ADT or FHIR Encounter may still be on its way: park the
            # charge until it arrives or the wait runs out.
            row["outcome"] = WAITING
            now = dt.datetime.now(dt.UTC)
            row["_wait"] = {
                "kind": "encounter",
                "wait_key": service.encounter_id,
                "message_id": service.source_message_id,
                "payload": service_to_json(service),
                "state": WAITING,
                "deadline": now + dt.timedelta(hours=wait_hours),
                "created_at": now,
            }
            self._count(f"{origin}_{WAITING}")
            return
        result = self.state.capture.price(service, encounter_found)
        if isinstance(result, Rejection):
            row["outcome"] = WORK_ITEM
            row["_work_item"] = self._work_item(f"service:{service.service_key}", result)
            self._count(f"{origin}_{WORK_ITEM}")
            return
        row["outcome"] = CHARGED
        row["_charge"] = {
            **{name: getattr(result, name) for name in result.__dataclass_fields__},
            "chargemaster_version": self.state.config.chargemaster_version.version_id,
        }
        self._count(f"{origin}_{CHARGED}")

    def issue(self, use: SupplyUse) -> None:
        """Stage ``use`` as an inventory issue, a work item or a duplicate."""
        print_ = usage_fingerprint(use)
        row: dict[str, Any] = {
            "usage_key": use.usage_key,
            "message_id": use.source_message_id,
            "code_system": use.code_system,
            "code": use.code,
            "quantity": use.quantity,
            "fingerprint": print_,
            "_issue": None,
            "_work_item": None,
        }
        self.writes.usages.append(row)
        earlier = self._seen(use.usage_key, self.usage_prints, self.state.usage_prints)
        if earlier is not None:
            self._mark_repeat(
                row, earlier, f"supply_{DUPLICATE}", f"supply:{use.usage_key}",
                f"supply usage {use.usage_key} was received before with different "
                "content; decide which is right",
            )
            return
        self.usage_prints[use.usage_key] = print_
        result = issue_supply(use, self.encounter_class(use.encounter_id), self.state.config)
        if isinstance(result, Rejection):
            row["outcome"] = WORK_ITEM
            row["_work_item"] = self._work_item(f"supply:{use.usage_key}", result)
            self._count(f"supply_{WORK_ITEM}")
            return
        row["outcome"] = ISSUED
        issue = result.issue
        row["_issue"] = {name: getattr(issue, name) for name in issue.__dataclass_fields__}
        self._count(f"supply_{ISSUED}")
        if result.charge_service is not None:
            self.capture_service(result.charge_service, origin="supply")

    def finish(self, batch: CanonicalBatch) -> None:
        """Stage the message's diagnoses and its own new state."""
        self.writes.diagnoses.extend(
            {"message_id": self.message_id, "position": position,
             "encounter_id": diagnosis.encounter_id, "code_system": diagnosis.code_system,
             "code": diagnosis.code, "description": diagnosis.description}
            for position, diagnosis in enumerate(batch.diagnoses)
        )
        summary = {"outcomes": self.outcomes, "warnings": batch.warnings,
                   "ignored": batch.ignored}
        self.writes.messages.append(
            {"b_id": self.message_id, "state": PROCESSED, "error": None,
             "summary": json.dumps(summary, sort_keys=True), "diagnoses_stored": 1}
        )

    def commit_to_batch(self) -> None:
        """Make this message's writes and keys part of the batch."""
        self.state.writes.merge(self.writes)
        self.state.service_prints.update(self.service_prints)
        self.state.usage_prints.update(self.usage_prints)
