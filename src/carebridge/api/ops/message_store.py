"""Queries behind the message routes: search, lineage, and storing a message again."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    and_,
    func,
    insert,
    or_,
    select,
    union,
)

from carebridge.api.deps import ApiError
from carebridge.api.ops.common import like_escape, utc
from carebridge.engine.lanes import lane_of
from carebridge.ingest.files.sources import (
    bounded,
    fhir_ordering_key,
    hl7_dedup_key,
    hl7_ordering_key,
    sha256,
)
from carebridge.store.bodies import insert_bodies, with_bodies
from carebridge.store.schema import (
    charge_lines,
    deliveries,
    encounters,
    journal_lines,
    message_bodies,
    messages,
    patients,
    retained_bodies,
    services,
    supply_issues,
    supply_usages,
    work_items,
)

HEAD_BYTES = 1024
"""Bytes read from the start of a body to find its message type and control id."""

SCAN_LIMIT = 5000
"""Messages a search with a message-type filter inspects per page at most."""

_FORMAT = r"[a-z][a-z0-9-]*([:;][A-Za-z0-9_=.-]+)?"
_HL7_TYPE = r"[A-Z0-9]{3}(\^[A-Z0-9]{2,3})?"
_FHIR_TYPE = r"[A-Z][a-z][A-Za-z]*"
TYPE_PATTERN = f"^({_FORMAT}|{_HL7_TYPE}|{_FHIR_TYPE})$"
"""The values of the search's ``type`` filter: a format, an HL7 or a FHIR type."""
_FHIR_RESOURCE_TYPE = re.compile(rb'"resourceType"\s*:\s*"([A-Za-z]+)"')

SUMMARY_COLUMNS = (
    messages.c.id, messages.c.source, messages.c.format, messages.c.received_at,
    messages.c.state, messages.c.ordering_key, messages.c.duplicate_of,
    messages.c.replay_of, messages.c.processed_at, messages.c.content_pruned_at,
    messages.c.dedup_key,
)


def head_column() -> ColumnElement[Any]:
    """The first :data:`HEAD_BYTES` of a message's body; select it from ``with_bodies()``."""
    raw = func.coalesce(message_bodies.c.raw, retained_bodies.c.raw)
    return func.substr(raw, 1, HEAD_BYTES).label("head")


def describe(fmt: str, head: bytes | None) -> tuple[str | None, str | None]:
    """Return the message type and control id read from the start of a body.

    HL7 v2 gives MSH-9 (message code and trigger event) and MSH-10; FHIR JSON
    gives the first ``resourceType`` in the head, which is the document's own
    when it is written first, as FHIR servers and Synthea write it.
    """
    if not head:
        return None, None
    head = bytes(head)
    if fmt.startswith("hl7v2"):
        return _describe_hl7(head)
    if fmt == "fhir-json":
        found = _FHIR_RESOURCE_TYPE.search(head)
        return (found.group(1).decode("ascii") if found else None), None
    return None, None


def _describe_hl7(head: bytes) -> tuple[str | None, str | None]:
    segment = head.split(b"\r", 1)[0].split(b"\n", 1)[0]
    if not segment.startswith(b"MSH") or len(segment) < 8:
        return None, None
    fields = segment.split(segment[3:4])
    component = fields[1][:1] or b"^"
    message_type = None
    if len(fields) > 8 and fields[8]:
        parts = [part for part in fields[8].split(component)[:2] if part]
        message_type = "^".join(part.decode("latin-1") for part in parts) or None
    control_id = fields[9].decode("latin-1").strip() or None if len(fields) > 9 else None
    return message_type, control_id


def summary_values(row: Row) -> dict[str, Any]:
    """Return the fields of :class:`MessageSummary` from a row of :data:`SUMMARY_COLUMNS`."""
    message_type, control_id = describe(row.format, getattr(row, "head", None))
    if control_id is None and row.format.startswith("hl7v2"):
        control_id = _control_id_from_key(row.dedup_key)
    return {
        "id": row.id, "source": row.source, "format": row.format,
        "message_type": message_type, "control_id": control_id,
        "received_at": utc(row.received_at), "state": row.state,
        "patient_id": row.ordering_key, "duplicate_of": row.duplicate_of,
        "replay_of": row.replay_of, "processed_at": utc(row.processed_at),
        "content_pruned": row.content_pruned_at is not None,
    }


def _control_id_from_key(dedup_key: str) -> str | None:
    parts = dedup_key.split("|")
    if len(parts) == 4 and parts[0] == "hl7v2":
        return parts[3] or None
    return None


@dataclass(frozen=True, slots=True)
class MessageFilter:
    """The filters of a message search; ``None`` means not filtered."""

    source: str | None = None
    type: str | None = None
    state: str | None = None
    control_id: str | None = None
    patient_id: str | None = None
    encounter_id: str | None = None
    received_from: dt.datetime | None = None
    received_to: dt.datetime | None = None


def type_condition(value: str) -> tuple[ColumnElement[bool], str | None]:
    """Return the SQL condition of a ``type`` filter and the message type left to check.

    A lower-case value is a format (``hl7v2``, ``fhir-json``, ``synthea-csv``
    or ``synthea-csv:procedures``); ``ADT`` or ``ADT^A01`` is an HL7 message
    type; ``Bundle`` or ``Patient`` is a FHIR resource type. The latter two
    are read from the bodies, so the second value is returned to check each.
    """
    if re.fullmatch(_FORMAT, value):
        return or_(messages.c.format == value,
                   messages.c.format.like(like_escape(value) + ":%", escape="\\"),
                   messages.c.format.like(like_escape(value) + ";%", escape="\\")), None
    if re.fullmatch(_HL7_TYPE, value):
        return messages.c.format.like("hl7v2%"), value
    if re.fullmatch(_FHIR_TYPE, value):
        return messages.c.format == "fhir-json", value
    raise ApiError(422, "invalid", f"type {value!r} is neither a format (hl7v2, fhir-json, "
                   "synthea-csv:KIND), an HL7 message type (ADT, ADT^A01) nor a FHIR "
                   "resource type (Bundle)", location="query.type")


def type_matches(expected: str, message_type: str | None) -> bool:
    """Return whether a message's type is ``expected`` (``ADT`` matches ``ADT^A01``)."""
    if message_type is None:
        return False
    return message_type == expected or message_type.startswith(expected + "^")


def conditions(where: MessageFilter) -> tuple[list[ColumnElement[bool]], str | None]:
    """Return the SQL conditions of a search and the message type to check per row."""
    found: list[ColumnElement[bool]] = []
    left = None
    if where.source is not None:
        found.append(messages.c.source == where.source)
    if where.type is not None:
        condition, left = type_condition(where.type)
        found.append(condition)
    if where.state is not None:
        found.append(messages.c.state == where.state)
    if where.control_id is not None:
        # The HL7 dedup key is "hl7v2|MSH-3|MSH-4|MSH-10".
        found.append(and_(messages.c.dedup_key.like("hl7v2|%"),
                          messages.c.dedup_key.like("%|" + like_escape(where.control_id),
                                                    escape="\\")))
    if where.patient_id is not None:
        found.append(messages.c.id.in_(_patient_messages(where.patient_id)))
    if where.encounter_id is not None:
        found.append(messages.c.id.in_(_encounter_messages(where.encounter_id)))
    if where.received_from is not None:
        found.append(messages.c.received_at >= where.received_from)
    if where.received_to is not None:
        found.append(messages.c.received_at < where.received_to)
    return found, left


def _patient_messages(patient_id: str):
    return union(
        select(messages.c.id).where(messages.c.ordering_key == patient_id),
        select(services.c.message_id).where(services.c.patient_id == patient_id),
        select(patients.c.source_message_id).where(patients.c.patient_id == patient_id),
        select(patients.c.updated_message_id).where(patients.c.patient_id == patient_id),
        select(encounters.c.source_message_id).where(encounters.c.patient_id == patient_id),
    )


def _encounter_messages(encounter_id: str):
    return union(
        select(services.c.message_id).where(services.c.encounter_id == encounter_id),
        select(encounters.c.source_message_id).where(
            encounters.c.encounter_id == encounter_id),
        select(encounters.c.updated_message_id).where(
            encounters.c.encounter_id == encounter_id),
        select(supply_issues.c.source_message_id).where(
            supply_issues.c.encounter_id == encounter_id),
    )


def search(conn: Connection, where: MessageFilter, below: int | None,
           limit: int) -> tuple[list[dict[str, Any]], int | None]:
    """Return up to ``limit`` messages, newest first, and the id the next page starts below.

    With a message-type filter at most :data:`SCAN_LIMIT` candidates are read
    per call, so a page may hold fewer than ``limit`` items and still have a
    next page.
    """
    found, expected_type = conditions(where)
    columns = [*SUMMARY_COLUMNS, head_column()]
    chunk = limit + 1 if expected_type is None else max(limit, 200)
    items: list[dict[str, Any]] = []
    scanned = 0
    while True:
        query = select(*columns).select_from(with_bodies()).where(*found)
        if below is not None:
            query = query.where(messages.c.id < below)
        rows = conn.execute(query.order_by(messages.c.id.desc()).limit(chunk)).all()
        for row in rows:
            if len(items) == limit:
                return items, items[-1]["id"]
            values = summary_values(row)
            scanned += 1
            if expected_type is None or type_matches(expected_type, values["message_type"]):
                items.append(values)
            if expected_type is not None and scanned >= SCAN_LIMIT:
                return items, row.id
        if len(rows) < chunk:
            return items, None
        below = rows[-1].id


def message_row(conn: Connection, message_id: int) -> Row | None:
    """Return a message's metadata row with the head of its body, or ``None``."""
    return conn.execute(
        select(messages, head_column()).select_from(with_bodies())
        .where(messages.c.id == message_id)
    ).first()


def linked_ids(conn: Connection, column: Any, value: int, limit: int = 100) -> list[int]:
    """Return the ids of up to ``limit`` messages whose ``column`` is ``value``."""
    return list(conn.execute(
        select(messages.c.id).where(column == value).order_by(messages.c.id).limit(limit)
    ).scalars())


def _dicts(conn: Connection, query) -> list[dict[str, Any]]:
    return [dict(row) for row in conn.execute(query).mappings()]


def lineage(conn: Connection, message: Row) -> dict[str, Any]:
    """Return the records derived from ``message``, its work items and deliveries."""
    message_id = message.id
    journal_ids = sorted(conn.execute(
        select(journal_lines.c.journal_id).distinct()
        .where(journal_lines.c.source_message_id == message_id)
    ).scalars())
    item_ids = select(services.c.work_item_id).where(
        services.c.message_id == message_id, services.c.work_item_id.is_not(None))
    usage_item_ids = select(supply_usages.c.work_item_id).where(
        supply_usages.c.message_id == message_id, supply_usages.c.work_item_id.is_not(None))
    delivery_rows: list[dict[str, Any]] = []
    if journal_ids:
        delivery_rows = _dicts(conn, select(
            deliveries.c.id, deliveries.c.destination, deliveries.c.kind,
            deliveries.c.record_id, deliveries.c.state, deliveries.c.replay_of,
        ).where(deliveries.c.kind == "journal", deliveries.c.record_id.in_(journal_ids))
            .order_by(deliveries.c.id))
    for row in (encounter_rows := _dicts(conn, select(encounters).where(or_(
            encounters.c.source_message_id == message_id,
            encounters.c.updated_message_id == message_id)).order_by(
                encounters.c.encounter_id))):
        row["start"], row["end"] = utc(row["start"]), utc(row["end"])
    return {
        "message_id": message_id,
        "state": message.state,
        "replay_of": message.replay_of,
        "replays": linked_ids(conn, messages.c.replay_of, message_id),
        "duplicates": linked_ids(conn, messages.c.duplicate_of, message_id),
        "patients": _dicts(conn, select(patients).where(or_(
            patients.c.source_message_id == message_id,
            patients.c.updated_message_id == message_id)).order_by(patients.c.patient_id)),
        "encounters": encounter_rows,
        "services": _dicts(conn, select(services).where(
            services.c.message_id == message_id).order_by(services.c.id)),
        "charge_lines": _dicts(conn, select(charge_lines).where(
            charge_lines.c.source_message_id == message_id).order_by(charge_lines.c.id)),
        "supply_usages": _dicts(conn, select(supply_usages).where(
            supply_usages.c.message_id == message_id).order_by(supply_usages.c.id)),
        "supply_issues": _dicts(conn, select(supply_issues).where(
            supply_issues.c.source_message_id == message_id).order_by(supply_issues.c.id)),
        "journal_ids": journal_ids,
        "work_items": _dicts(conn, select(
            work_items.c.id, work_items.c.reason, work_items.c.team, work_items.c.status,
        ).where(or_(work_items.c.message_id == message_id, work_items.c.id.in_(item_ids),
                    work_items.c.id.in_(usage_item_ids))).order_by(work_items.c.id)),
        "deliveries": delivery_rows,
    }


def store_copy(conn: Connection, original: Row, raw: bytes, *,
               origin: str) -> int:
    """Store ``raw`` as a new received message that replaces ``original``.

    The copy is stored with ``replay_of`` naming the original and skips the
    intake dedup check on purpose, so workers process it again. Postings
    stay effectively once because charges and supply issues are unique by
    their business keys. ``raw`` is the original's bytes for a replay, or a
    corrected version of them.
    """
    digest = sha256(raw)
    dedup_key = original.dedup_key
    ordering_key = original.ordering_key
    if raw != bytes(original.raw or b""):
        if original.format.startswith("hl7v2"):
            dedup_key = hl7_dedup_key(raw, digest)
            ordering_key = hl7_ordering_key(raw) or ordering_key
        elif original.format == "fhir-json":
            ordering_key = fhir_ordering_key(raw) or ordering_key
    ordering_key = bounded(ordering_key, 200)
    now = dt.datetime.now(dt.UTC)
    message_id = conn.execute(insert(messages).values(
        source=original.source, origin=origin, format=original.format, received_at=now,
        content_sha256=digest, dedup_key=bounded(dedup_key, 300),
        occurrence=original.occurrence, ordering_key=ordering_key,
        lane=lane_of(ordering_key), state="received", replay_of=original.id,
    )).inserted_primary_key[0]
    insert_bodies(conn, [message_id], now, [raw])
    return message_id


def original_with_raw(conn: Connection, message_id: int) -> Row | None:
    """Return a message's row with its full body as ``raw`` (``None`` once pruned)."""
    raw = func.coalesce(message_bodies.c.raw, retained_bodies.c.raw).label("raw")
    return conn.execute(
        select(messages, raw).select_from(with_bodies()).where(messages.c.id == message_id)
    ).first()


def pruned_error(message: Row) -> ApiError:
    """Return the 410 error for a message whose content is no longer stored."""
    if message.content_pruned_at is not None:
        where = message.content_archive or "no archive recorded"
        return ApiError(410, "deleted", f"the content of message {message.id} was pruned "
                        f"at {utc(message.content_pruned_at).isoformat()}; it is archived "
                        f"in {where}")
    return ApiError(410, "deleted", f"the content of message {message.id} is not stored")
