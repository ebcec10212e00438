"""Process stored messages in batches: map, capture charges, issue supplies.

A worker claims a batch of received messages in id order and commits the
batch's outputs together with the messages' new state, so no charge exists
whose message still looks unprocessed, and the reverse. The batch is decided
in memory (one message at a time, in order, each seeing what the earlier ones
produced) and written with a few statements per table, which is what makes
thousands of messages a second possible.

A message that cannot be mapped becomes a failed message with a work item;
the messages behind it go on. If writing the batch fails, the batch is rolled
back and its messages are processed again one per transaction, so a single
poison message cannot hold the others back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, Row, bindparam, insert, select
from sqlalchemy.exc import SQLAlchemyError

from carebridge.config.model import Configuration
from carebridge.engine.intake import FAILED, PROCESSED, RECEIVED
from carebridge.engine.lanes import LANE_COUNT, ensure_lanes
from carebridge.engine.waits import resume_waits, service_to_json
from carebridge.errors import InputError
from carebridge.ingest.registry import map_raw
from carebridge.model import NULL, CanonicalBatch, Encounter, Patient, Service, SupplyUse
from carebridge.store.bodies import raw_column, with_bodies
from carebridge.store.schema import (
    charge_lines,
    encounters,
    lanes,
    messages,
    patients,
    services,
    supply_issues,
    supply_usages,
    waits,
    work_items,
)
from carebridge.workflows.charge_capture import ChargeCapture
from carebridge.workflows.reasons import Reason, Rejection
from carebridge.workflows.supplies import issue_supply

log = logging.getLogger(__name__)

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
    """Return the fingerprint of what ``service`` says, not where it came from."""
    return fingerprint(
        service.code_system, service.code, service.quantity, service.service_date,
        service.amount, service.unit_price, service.transaction_type.value,
        service.currency, service.encounter_id,
    )


def usage_fingerprint(use: SupplyUse) -> str:
    """Return the fingerprint of what a supply usage says.

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
        self.messages.extend(other.messages)
        self.work_items.extend(other.work_items)


class BatchState:
    """What a batch knows: rows prefetched from the database plus its own writes."""

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
                select(patients.c.patient_id).where(patients.c.patient_id.in_(chunk))
            )
            self.known_patients.update(rows.scalars())
        for chunk in _chunks(encounter_ids):
            rows = self.conn.execute(
                select(
                    encounters.c.encounter_id,
                    encounters.c.encounter_class,
                    encounters.c.patient_id,
                ).where(encounters.c.encounter_id.in_(chunk))
            )
            for row in rows:
                self.encounter_classes[row.encounter_id] = row.encounter_class or ""
                self.encounter_patients[row.encounter_id] = row.patient_id
        self._prefetch_prints(services, services.c.service_key, service_keys, self.service_prints)
        self._prefetch_prints(
            supply_usages, supply_usages.c.usage_key, usage_keys, self.usage_prints
        )

    def _prefetch_prints(self, table, key_column, keys: set[str], into: dict[str, str]) -> None:
        for chunk in _chunks(keys):
            rows = self.conn.execute(
                select(key_column, table.c.fingerprint)
                .where(key_column.in_(chunk))
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
            row["outcome"] = DUPLICATE
            self._count(f"{origin}_{DUPLICATE}")
            if earlier != print_:
                row["outcome"] = WORK_ITEM
                row["_work_item"] = self._work_item(
                    f"service:{service.service_key}#conflict:{self.message_id}",
                    Rejection(
                        Reason.SERVICE_KEY_CONFLICT,
                        f"service {service.service_key} was received before with "
                        "different content (code, units, date or price); decide "
                        "which is right and post a correction",
                    ),
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
            row["outcome"] = DUPLICATE
            self._count(f"supply_{DUPLICATE}")
            if earlier != print_:
                row["outcome"] = WORK_ITEM
                row["_work_item"] = self._work_item(
                    f"supply:{use.usage_key}#conflict:{self.message_id}",
                    Rejection(
                        Reason.SERVICE_KEY_CONFLICT,
                        f"supply usage {use.usage_key} was received before with "
                        "different content; decide which is right",
                    ),
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
        """Stage the message's own new state."""
        summary = {"outcomes": self.outcomes, "warnings": batch.warnings,
                   "ignored": batch.ignored}
        self.writes.messages.append(
            {"b_id": self.message_id, "state": PROCESSED, "error": None,
             "summary": json.dumps(summary, sort_keys=True)}
        )

    def commit_to_batch(self) -> None:
        """Make this message's writes and keys part of the batch."""
        self.state.writes.merge(self.writes)
        self.state.service_prints.update(self.service_prints)
        self.state.usage_prints.update(self.usage_prints)


def _failed_message(message_id: int, exc: Exception) -> Writes:
    """Return the writes that fail a message and open its work item."""
    reason = getattr(exc, "reason", None)
    if not isinstance(reason, Reason):
        reason = Reason.MALFORMED_INPUT
    rejection = Rejection(reason, str(exc) or type(exc).__name__)
    writes = Writes()
    writes.work_items.append(
        {
            "subject_key": f"message:{message_id}",
            "reason": rejection.reason.value,
            "team": rejection.team.value,
            "message_id": message_id,
            "detail": rejection.detail,
            "status": "open",
            "created_at": dt.datetime.now(dt.UTC),
        }
    )
    writes.messages.append(
        {"b_id": message_id, "state": FAILED, "error": rejection.detail,
         "summary": json.dumps({"reason": rejection.reason.value})}
    )
    return writes


def _map_one(row: Row) -> CanonicalBatch | Writes:
    """Map one message, or return the writes that fail it."""
    try:
        return map_raw(row.format, row.raw, row.id, row.occurrence)
    except InputError as exc:
        log.warning(
            "message rejected",
            extra={"action": "message_failed", "message_id": row.id,
                   "error_type": type(exc).__name__},
        )
        return _failed_message(row.id, exc)
    except Exception as exc:  # noqa: BLE001 - a poison message must not stop the batch
        # The exception text may quote message content, so the log names only
        # its type. The full text goes to the work item, which is access
        # controlled like the message itself.
        log.error(
            "message mapping raised",
            extra={"action": "message_error", "message_id": row.id,
                   "error_type": type(exc).__name__},
        )
        return _failed_message(
            row.id, Exception(f"processing failed: {type(exc).__name__}: {exc}")
        )


def _apply_one(state: BatchState, message_id: int, batch: CanonicalBatch,
               run_id: int | None) -> bool:
    """Stage one mapped message's outputs; return whether it was processed."""
    applier = MessageApplier(state, message_id, run_id)
    try:
        applier.apply(batch)
        applier.finish(batch)
    except InputError as exc:
        log.warning(
            "message rejected",
            extra={"action": "message_failed", "message_id": message_id,
                   "error_type": type(exc).__name__},
        )
        state.writes.merge(_failed_message(message_id, exc))
        return False
    except Exception as exc:  # noqa: BLE001 - same reason as in _map_one
        log.error(
            "message processing raised",
            extra={"action": "message_error", "message_id": message_id,
                   "error_type": type(exc).__name__},
        )
        state.writes.merge(_failed_message(
            message_id, Exception(f"processing failed: {type(exc).__name__}: {exc}")
        ))
        return False
    applier.commit_to_batch()
    return True


def _insert_returning_ids(conn: Connection, table, rows: list[dict[str, Any]]) -> list[int]:
    if not rows:
        return []
    result = conn.execute(insert(table).returning(table.c.id, sort_by_parameter_order=True), rows)
    return list(result.scalars())


def _upsert(conn: Connection, table, key_column, staged: dict[str, dict[str, Any]],
            known: set[str], fields: Sequence[str]) -> None:
    new_rows, updates = [], []
    for key, values in staged.items():
        source = values["_source"]
        columns = {name: values[name] for name in fields if name in values}
        if key in known:
            updates.append((key, source, columns))
        else:
            new_rows.append(
                {key_column.name: key, "source_message_id": source,
                 "updated_message_id": source, **{name: values.get(name) for name in fields}}
            )
    if new_rows:
        conn.execute(insert(table), new_rows)
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for key, source, columns in updates:
        names = tuple(sorted(columns))
        by_columns.setdefault(names, []).append(
            {"b_key": key, "b_source": source, **{f"b_{n}": columns[n] for n in names}}
        )
    for names, rows in by_columns.items():
        statement = (
            table.update()
            .where(key_column == bindparam("b_key"))
            .values(updated_message_id=bindparam("b_source"),
                    **{name: bindparam(f"b_{name}") for name in names})
        )
        conn.execute(statement, rows)


def _stored_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return ``rows`` without their staging keys (``_``), linked to their work item."""
    return [
        {key: value for key, value in row.items() if not key.startswith("_")}
        | {"work_item_id": row["_work_item"]["_id"] if row["_work_item"] else None}
        for row in rows
    ]


def _insert_children(conn: Connection, table, parents: list[dict[str, Any]],
                     parent_ids: list[int], staged_key: str, link_column: str) -> None:
    """Insert the child row each parent staged under ``staged_key``, linked by id."""
    children = [
        {**parent[staged_key], link_column: parent_id}
        for parent, parent_id in zip(parents, parent_ids, strict=True)
        if parent[staged_key]
    ]
    if children:
        conn.execute(insert(table), children)


def _flush(state: BatchState, run_id: int | None) -> None:
    """Write everything the batch decided, a few statements per table."""
    conn, writes = state.conn, state.writes
    _upsert(conn, patients, patients.c.patient_id, writes.patients,
            state.known_patients, PATIENT_FIELDS)
    _upsert(conn, encounters, encounters.c.encounter_id, writes.encounters,
            set(state.encounter_classes), ENCOUNTER_FIELDS)

    item_ids = _insert_returning_ids(conn, work_items, writes.work_items)
    for row, item_id in zip(writes.work_items, item_ids, strict=True):
        row["_id"] = item_id

    service_ids = _insert_returning_ids(conn, services, _stored_columns(writes.services))
    _insert_children(conn, charge_lines, writes.services, service_ids, "_charge", "service_id")
    _insert_children(conn, waits, writes.services, service_ids, "_wait", "service_id")
    usage_ids = _insert_returning_ids(conn, supply_usages, _stored_columns(writes.usages))
    _insert_children(conn, supply_issues, writes.usages, usage_ids, "_issue", "usage_id")

    now = dt.datetime.now(dt.UTC)
    conn.execute(
        messages.update()
        .where(messages.c.id == bindparam("b_id"))
        .values(state=bindparam("state"), error=bindparam("error"),
                summary=bindparam("summary"), processed_at=now, processed_run_id=run_id),
        writes.messages,
    )


def claim_batch(conn: Connection, batch_size: int) -> list[Row]:
    """Claim up to ``batch_size`` received messages, oldest first.

    On PostgreSQL the worker first locks a share of the lanes with
    ``FOR UPDATE SKIP LOCKED`` and takes messages of those lanes only; the
    locks last until the batch commits, so no other worker touches a message
    of the same patient meanwhile. SQLite has one writer at a time, so the
    batch takes messages of every lane.
    """
    query = (
        select(messages.c.id, messages.c.format, raw_column(), messages.c.occurrence)
        .select_from(with_bodies())
        .where(messages.c.state == RECEIVED)
        .order_by(messages.c.id)
        .limit(batch_size)
    )
    if conn.dialect.name == "postgresql":
        offset = random.randrange(LANE_COUNT)
        pending = (
            select(messages.c.id)
            .where(messages.c.state == RECEIVED, messages.c.lane == lanes.c.lane)
            .exists()
        )
        held = list(
            conn.execute(
                select(lanes.c.lane)
                .where(pending)
                .order_by((lanes.c.lane + offset) % LANE_COUNT)
                .limit(max(LANE_COUNT // 4, 1))
                .with_for_update(skip_locked=True)
            ).scalars()
        )
        if not held:
            return []
        query = query.where(messages.c.lane.in_(held))
    return list(conn.execute(query))


def _process_rows(conn: Connection, rows: Sequence[Row], config: Configuration,
                  capture: ChargeCapture, run_id: int | None) -> tuple[int, int]:
    """Decide and write one batch inside the open transaction of ``conn``."""
    state = BatchState(conn, config, capture)
    mapped = [(row.id, _map_one(row)) for row in rows]
    state.prefetch([result for _, result in mapped if isinstance(result, CanonicalBatch)])
    processed = failed = 0
    for message_id, result in mapped:
        if isinstance(result, Writes):
            state.writes.merge(result)
            failed += 1
        elif _apply_one(state, message_id, result, run_id):
            processed += 1
        else:
            failed += 1
    _flush(state, run_id)
    return processed, failed


def _process_alone(engine: Engine, row: Row, config: Configuration,
                   capture: ChargeCapture, run_id: int | None) -> tuple[int, int]:
    """Process one message in its own transaction; fail it if writing raises."""
    try:
        with engine.begin() as conn:
            return _process_rows(conn, [row], config, capture, run_id)
    except SQLAlchemyError as exc:
        log.error(
            "message could not be written",
            extra={"action": "message_error", "message_id": row.id,
                   "error_type": type(exc).__name__},
        )
    with engine.begin() as conn:
        state = BatchState(conn, config, capture)
        state.writes = _failed_message(
            row.id, Exception("writing the message's results failed in the database; "
                              "check the values against column limits, then replay it")
        )
        _flush(state, run_id)
    return 0, 1


def process_batch(engine: Engine, config: Configuration, capture: ChargeCapture, *,
                  batch_size: int, run_id: int | None = None) -> tuple[int, int]:
    """Claim and process one batch; return (processed, failed), (0, 0) if idle."""
    try:
        with engine.begin() as conn:
            rows = claim_batch(conn, batch_size)
            if not rows:
                return 0, 0
            return _process_rows(conn, rows, config, capture, run_id)
    except SQLAlchemyError as exc:
        # Something in the batch broke a database rule. Redo the batch one
        # message per transaction so that only the message at fault fails.
        log.warning(
            "batch write failed; processing its messages one at a time",
            extra={"action": "batch_isolate", "error_type": type(exc).__name__},
        )
    with engine.begin() as conn:
        rows = claim_batch(conn, batch_size)
    totals = [0, 0]
    for row in rows:
        processed, failed = _process_alone(engine, row, config, capture, run_id)
        totals[0] += processed
        totals[1] += failed
    return totals[0], totals[1]


def process_pending(
    engine: Engine,
    config: Configuration,
    *,
    as_of: dt.date | None = None,
    batch_size: int = 500,
    run_id: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> ProcessResult:
    """Process every received message, oldest first, ``batch_size`` per commit.

    Args:
        engine: the database.
        config: master data and rules to price and post with.
        as_of: the date that bounds service dates from above when the rules
            set no latest date; today when ``None``.
        batch_size: messages per transaction.
        run_id: the run recorded as having processed each message.
        progress: called with the number of messages finished in each batch.
    """
    capture = ChargeCapture(config, as_of or dt.date.today())
    result = ProcessResult()
    with engine.begin() as conn:
        ensure_lanes(conn)
    while True:
        processed, failed = process_batch(
            engine, config, capture, batch_size=batch_size, run_id=run_id
        )
        if processed + failed == 0:
            break
        result.processed += processed
        result.failed += failed
        result.batches += 1
        if progress:
            progress(processed + failed)
    resume_waits(engine, config, as_of=as_of)
    log.info(
        "processing finished",
        extra={"action": "process_done", "processed": result.processed,
               "failed": result.failed, "batches": result.batches},
    )
    return result
