"""Message routes: search, metadata, raw content, lineage and replay.

Every response that shows patient data (a search result names patients, the
raw content and the lineage hold them) writes an audit row with the
caller and the message ids, in the same transaction as the read.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select

from carebridge import audit
from carebridge.api.deps import ApiError, context, require
from carebridge.api.ops.common import (
    IdCursor,
    Limit,
    Page,
    id_path,
    page,
    parse_json,
    problems,
    text_query,
    utc,
)
from carebridge.api.ops.message_models import (
    Lineage,
    MessageDetail,
    MessageSummary,
    RawContent,
    ReplayAccepted,
)
from carebridge.api.ops.message_store import (
    TYPE_PATTERN,
    MessageFilter,
    lineage,
    linked_ids,
    message_row,
    original_with_raw,
    pruned_error,
    search,
    store_copy,
    summary_values,
)
from carebridge.api.security import Principal, Scope
from carebridge.store.bodies import read_raw
from carebridge.store.schema import messages, work_items

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/messages", tags=["messages"])

MessageId = Annotated[int, id_path("The message id.")]


class MessageState(StrEnum):
    RECEIVED = "received"
    PROCESSED = "processed"
    FAILED = "failed"
    DUPLICATE = "duplicate"


def _not_found(message_id: int) -> ApiError:
    return ApiError(404, "not-found", f"message {message_id} not found")


@router.get(
    "", response_model=Page[MessageSummary], responses=problems(),
    summary="Search stored messages",
    description=(
        "Scope: `messages:read`. Newest first. Every filter is optional and they "
        "combine. `type` is a format (`hl7v2`, `fhir-json`, `synthea-csv`, "
        "`synthea-csv:procedures`), an HL7 message type (`ADT`, `DFT^P03`) or a FHIR "
        "resource type (`Bundle`). Message and resource types are read from the "
        "stored content, at most 5,000 messages per page, so a page with such a "
        "filter may be short and still have a `next` link. The search is written "
        "to the audit log with the ids of the messages returned."
    ),
)
def search_messages(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.MESSAGES_READ))],
    limit: Limit = 50,
    cursor: IdCursor = None,
    source: Annotated[str | None, text_query("Source the message arrived from.")] = None,
    type: Annotated[str | None, Query(
        min_length=1, max_length=60, pattern=TYPE_PATTERN,
        description="Format, HL7 message type or FHIR resource type.")] = None,
    state: Annotated[MessageState | None, Query(description="Message state.")] = None,
    control_id: Annotated[str | None, text_query("HL7 MSH-10 control id.")] = None,
    patient_id: Annotated[str | None, text_query("Patient id (PID-3.1 or the FHIR or "
                                                 "Synthea patient id).", 100)] = None,
    encounter_id: Annotated[str | None, text_query("Encounter (visit) id.", 100)] = None,
    received_from: Annotated[dt.datetime | None, Query(
        description="Received at or after this instant (ISO 8601; UTC when no offset).",
    )] = None,
    received_to: Annotated[dt.datetime | None, Query(
        description="Received before this instant.")] = None,
) -> Any:
    where = MessageFilter(
        source=source, type=type, state=state.value if state else None,
        control_id=control_id, patient_id=patient_id, encounter_id=encounter_id,
        received_from=utc(received_from), received_to=utc(received_to),
    )
    ctx = context(request)
    with ctx.engine.begin() as conn:
        items, below = search(conn, where, cursor, limit)
        if items:
            audit.record(conn, principal.actor, "message.search", "message", None,
                         {"message_ids": [item["id"] for item in items]})
    logger.info("message search by %s returned %d messages", principal.client_id, len(items))
    return page(request, items, below)


@router.get(
    "/{message_id}", response_model=MessageDetail, responses=problems(404),
    summary="Show a message's metadata",
    description="Scope: `messages:read`. The read is written to the audit log.",
)
def get_message(
    request: Request, message_id: MessageId,
    principal: Annotated[Principal, Depends(require(Scope.MESSAGES_READ))],
) -> Any:
    ctx = context(request)
    with ctx.engine.begin() as conn:
        row = message_row(conn, message_id)
        if row is None:
            raise _not_found(message_id)
        detail = summary_values(row) | {
            "origin": row.origin, "content_sha256": row.content_sha256,
            "dedup_key": row.dedup_key, "occurrence": row.occurrence, "error": row.error,
            "summary": parse_json(row.summary),
            "content_pruned_at": utc(row.content_pruned_at),
            "content_archive": row.content_archive,
            "replays": linked_ids(conn, messages.c.replay_of, message_id),
            "work_item_ids": list(conn.execute(
                select(work_items.c.id).where(work_items.c.message_id == message_id)
                .order_by(work_items.c.id)).scalars()),
        }
        audit.record(conn, principal.actor, "message.read", "message", message_id)
    return detail


def _as_content(message_id: int, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    printable = text is not None and all(
        char in "\r\n\t\x0b\x1c" or char >= " " for char in text)
    return {
        "message_id": message_id,
        "encoding": "text" if printable else "base64",
        "content_sha256": hashlib.sha256(raw).hexdigest(),
        "size": len(raw),
        "content": text if printable else base64.b64encode(raw).decode("ascii"),
    }


@router.get(
    "/{message_id}/raw", response_model=RawContent, responses=problems(404, 410),
    summary="Show a message's raw content",
    description=(
        "Scope: `messages:read`. The bytes as stored: as text when they are valid "
        "UTF-8 without control characters other than CR, LF, tab and the MLLP "
        "frame bytes; otherwise base64. 410 when retention pruned the content; the "
        "message names the archive file that holds it. The read is written to the "
        "audit log."
    ),
)
def get_raw(
    request: Request, message_id: MessageId,
    principal: Annotated[Principal, Depends(require(Scope.MESSAGES_READ))],
) -> Any:
    ctx = context(request)
    with ctx.engine.begin() as conn:
        row = conn.execute(select(messages).where(messages.c.id == message_id)).first()
        if row is None:
            raise _not_found(message_id)
        raw = read_raw(conn, message_id)
        if raw is None:
            raise pruned_error(row)
        audit.record(conn, principal.actor, "message.raw.read", "message", message_id)
    return _as_content(message_id, bytes(raw))


@router.get(
    "/{message_id}/canonical", response_model=Lineage, responses=problems(404),
    summary="Show the records derived from a message",
    description=(
        "Scope: `messages:read`. The lineage of one message: the patients and "
        "encounters it created or updated, its services and their charge lines, "
        "supply usages and issues, the journals with its lines and their "
        "deliveries, its work items, and the messages replayed from it or "
        "recorded as its duplicates. The read is written to the audit log."
    ),
)
def get_canonical(
    request: Request, message_id: MessageId,
    principal: Annotated[Principal, Depends(require(Scope.MESSAGES_READ))],
) -> Any:
    ctx = context(request)
    with ctx.engine.begin() as conn:
        row = conn.execute(select(messages).where(messages.c.id == message_id)).first()
        if row is None:
            raise _not_found(message_id)
        view = lineage(conn, row)
        audit.record(conn, principal.actor, "message.canonical.read", "message", message_id,
                     {"patient_ids_shown": len(view["patients"]),
                      "service_ids": [service["id"] for service in view["services"]]})
    return view


@router.post(
    "/{message_id}/replay", response_model=ReplayAccepted, status_code=202,
    responses=problems(404, 410),
    summary="Store a message again so it is processed again",
    description=(
        "Scope: `messages:replay`. Stores the same bytes as a new message with "
        "`replay_of` naming this one, skipping the duplicate check, so workers "
        "process it again. Charges and supply issues already posted are not "
        "posted twice: they are unique by their business keys, so the copy's "
        "services that were charged before come out as duplicates. 410 when the "
        "content was pruned. The replay is written to the audit log."
    ),
)
def replay_message(
    request: Request, message_id: MessageId,
    principal: Annotated[Principal, Depends(require(Scope.MESSAGES_REPLAY))],
) -> Any:
    ctx = context(request)
    with ctx.engine.begin() as conn:
        original = original_with_raw(conn, message_id)
        if original is None:
            raise _not_found(message_id)
        if original.raw is None:
            raise pruned_error(original)
        new_id = store_copy(conn, original, bytes(original.raw),
                            origin=f"replay of message {message_id}")
        audit.record(conn, principal.actor, "message.replay", "message", new_id,
                     {"replay_of": message_id})
    logger.info("message %d replayed as message %d by %s", message_id, new_id,
                principal.client_id)
    return ReplayAccepted(message_id=new_id, replay_of=message_id, state="received")

