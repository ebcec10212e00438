"""Work-item routes: the queue, one item with its history, and the actions on it.

A caller sees and acts on the items of the teams its roles allow
(``Principal.teams()``); another team's item returns 404 as if it did not
exist. The state machine is in :mod:`carebridge.api.ops.work_item_actions`.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import and_, or_, select

from carebridge import audit
from carebridge.api.deps import context, require
from carebridge.api.ops import work_item_actions as actions
from carebridge.api.ops.common import (
    BASE64_PATTERN,
    TEXT_PATTERN,
    Limit,
    Page,
    id_path,
    page,
    parse_json,
    problems,
    text_query,
    utc,
)
from carebridge.api.ops.message_models import ServiceRecord, SupplyUsageRecord
from carebridge.api.security import Principal, Scope
from carebridge.engine.processor import process_pending
from carebridge.store.schema import services, supply_usages, work_item_events, work_items
from carebridge.workflows.reasons import Reason, Team

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/work-items", tags=["work items"])

ItemId = Annotated[int, id_path("The work item id.")]

Status = StrEnum("Status", {name.upper(): name for name in actions.STATUSES})


class WorkItemSummary(BaseModel):
    """A work item as the queue lists it."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 17, "reason": "unknown_code", "team": "revenue_cycle", "status": "open",
        "message_id": 1203, "subject_key": "service:hl7:SENDFAC:TXN0011",
        "created_at": "2025-03-02T10:15:01Z", "due_at": "2025-03-04T10:15:01Z",
        "priority": 0, "priority_reason": None, "amount_at_risk": None,
        "assignee": None, "claimed_at": None, "resolved_at": None, "resolved_by": None,
    }]})

    id: int
    reason: str
    team: str
    status: str = Field(description="open, claimed, resolved, approved or rejected.")
    message_id: int
    subject_key: str = Field(description="What is stuck: service:KEY, supply:KEY or "
                             "message:ID.")
    created_at: dt.datetime
    due_at: dt.datetime | None = Field(
        default=None, description="SLA deadline: created_at plus the team's "
        "api.sla_hours_by_team unless set otherwise.")
    priority: int
    priority_reason: str | None = None
    amount_at_risk: Decimal | None = None
    assignee: str | None = None
    claimed_at: dt.datetime | None = None
    resolved_at: dt.datetime | None = None
    resolved_by: str | None = None


class WorkItemEvent(BaseModel):
    """One entry of a work item's history."""

    id: int
    at: dt.datetime
    actor: str
    action: str
    detail: Any = None


class WorkItemDetail(WorkItemSummary):
    """A work item with what a person needs to fix it and its history."""

    detail: str = Field(description="What failed and what to do next.")
    resolution: Any = None
    services: list[ServiceRecord] = Field(description="The services this item is about.")
    supply_usages: list[SupplyUsageRecord]
    history: list[WorkItemEvent]


class CorrectionOutcome(BaseModel):
    """The result of processing the corrected message."""

    message_id: int
    state: str = Field(description="processed or failed; received if processing is "
                       "left to the workers.")
    outcomes: dict[str, int] = Field(default_factory=dict)
    work_item_ids: list[int] = Field(default_factory=list,
                                     description="Work items the correction opened.")


class ActionResult(WorkItemSummary):
    """The work item after the action."""

    correction: CorrectionOutcome | None = None


class Reassign(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"assignee": "rc-analyst-2", "note": "coding question, over to Sam"}]})

    assignee: str = Field(min_length=1, max_length=120, pattern=TEXT_PATTERN,
                          description="The user or client id that takes the item.")
    note: str | None = Field(default=None, max_length=2000)


class CorrectedText(BaseModel):
    """Corrected content given as text; it is stored UTF-8 encoded."""

    model_config = ConfigDict(extra="forbid")

    encoding: Literal["text"]
    content: str = Field(min_length=1, max_length=5_000_000)


class CorrectedBase64(BaseModel):
    """Corrected content given as base64, for bytes that are not UTF-8."""

    model_config = ConfigDict(extra="forbid")

    encoding: Literal["base64"]
    content: str = Field(min_length=4, max_length=7_000_000, pattern=BASE64_PATTERN)


class Resolve(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"note": "CPT corrected from 99999 to 99213 after checking the chart",
         "corrected_message": {"encoding": "text",
                               "content": "MSH|^~\\&|CHGSYS|SENDFAC|...\rFT1|1|TXN0011|..."}}]})

    note: str = Field(min_length=1, max_length=2000, description="What was done.")
    corrected_message: Annotated[
        CorrectedText | CorrectedBase64, Field(discriminator="encoding")
    ] | None = Field(
        default=None,
        description="The item's message with the error fixed, in the format of the "
        "original. It is stored as a new message with replay_of naming the original "
        "and processed before the answer.")


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"note": "amount confirmed with the department"}]})

    note: str | None = Field(default=None, max_length=2000)


class Rejection(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"reason": "service was not performed; the charge must not post"}]})

    reason: str = Field(min_length=1, max_length=2000)


def _json_text(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, default=str)


def _summary(row: Any) -> dict[str, Any]:
    return {
        "id": row.id, "reason": row.reason, "team": row.team, "status": row.status,
        "message_id": row.message_id, "subject_key": row.subject_key,
        "created_at": utc(row.created_at), "due_at": utc(row.due_at),
        "priority": row.priority, "priority_reason": row.priority_reason,
        "amount_at_risk": row.amount_at_risk, "assignee": row.assignee,
        "claimed_at": utc(row.claimed_at), "resolved_at": utc(row.resolved_at),
        "resolved_by": row.resolved_by,
    }


QUEUE_CURSOR_PATTERN = r"^-?[0-9]{1,10}\.(-?[0-9]{1,16}|n)\.[0-9]{1,10}$"
"""A queue position: priority, due time in microseconds since 1970 (``n`` for
none) and id, joined by dots."""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _encode_position(item: dict[str, Any]) -> str:
    due = item["due_at"]
    micros = "n" if due is None else str((due - _EPOCH) // dt.timedelta(microseconds=1))
    return f"{item['priority']}.{micros}.{item['id']}"


def _decode_position(cursor: str) -> tuple[int, dt.datetime | None, int]:
    priority, micros, item_id = cursor.split(".")
    due = None if micros == "n" else _EPOCH + dt.timedelta(microseconds=int(micros))
    # Columns are 32-bit on PostgreSQL; no stored value lies beyond these bounds.
    return _int32(int(priority)), due, _int32(int(item_id))


def _int32(value: int) -> int:
    return max(-(2**31), min(value, 2**31 - 1))


def _after(priority: int, due: dt.datetime | None, item_id: int) -> Any:
    """Return the keyset condition for items after (priority, due, id) in queue order."""
    c = work_items.c
    if due is None:
        same_priority = and_(c.due_at.is_(None), c.id > item_id)
    else:
        same_priority = or_(c.due_at > due, c.due_at.is_(None),
                            and_(c.due_at == due, c.id > item_id))
    return or_(c.priority < priority, and_(c.priority == priority, same_priority))


@router.get(
    "", response_model=Page[WorkItemSummary], responses=problems(),
    summary="List work items in queue order",
    description=(
        "Scope: `workitems:read`. Highest priority first, then earliest due time, "
        "then oldest. Only items of the caller's teams are listed. Filters combine."
    ),
)
def list_work_items(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_READ))],
    limit: Limit = 50,
    cursor: Annotated[str | None, Query(
        max_length=40, pattern=QUEUE_CURSOR_PATTERN,
        description="The `next_cursor` of the previous page.")] = None,
    team: Annotated[Team | None, Query(description="Owning team.")] = None,
    reason: Annotated[Reason | None, Query(description="Reason code.")] = None,
    status: Annotated[Status | None, Query(description="Status.")] = None,
    assignee: Annotated[str | None, text_query("Assignee (user or client id).", 120)] = None,
    message_id: Annotated[int | None, Query(ge=1, le=2**31 - 1,
                                            description="The message it is about.")] = None,
    created_from: Annotated[dt.datetime | None, Query(
        description="Created at or after this instant (ISO 8601).")] = None,
    created_to: Annotated[dt.datetime | None, Query(
        description="Created before this instant.")] = None,
) -> Any:
    low, high = utc(created_from), utc(created_to)
    ctx = context(request)
    actions.fill_due_dates(ctx.engine, ctx.config)
    c = work_items.c
    query = select(work_items).where(actions.visible(principal))
    for column, value in ((c.team, team), (c.reason, reason), (c.status, status),
                          (c.assignee, assignee), (c.message_id, message_id)):
        if value is not None:
            query = query.where(column == (value.value if isinstance(value, StrEnum)
                                           else value))
    if low is not None:
        query = query.where(c.created_at >= low)
    if high is not None:
        query = query.where(c.created_at < high)
    if cursor is not None:
        query = query.where(_after(*_decode_position(cursor)))
    query = query.order_by(c.priority.desc(), c.due_at.asc().nulls_last(), c.id.asc())
    with ctx.engine.connect() as conn:
        rows = conn.execute(query.limit(limit + 1)).all()
    more = len(rows) > limit
    items = [_summary(row) for row in rows[:limit]]
    return page(request, items, _encode_position(items[-1]) if more else None)


def _detail(conn: Any, row: Any) -> dict[str, Any]:
    history = [
        {"id": event.id, "at": utc(event.at), "actor": event.actor,
         "action": event.action, "detail": parse_json(event.detail)}
        for event in conn.execute(
            select(work_item_events).where(work_item_events.c.work_item_id == row.id)
            .order_by(work_item_events.c.id))
    ]
    return _summary(row) | {
        "detail": row.detail,
        "resolution": parse_json(row.resolution),
        "services": [dict(r) for r in conn.execute(
            select(services).where(services.c.work_item_id == row.id)
            .order_by(services.c.id)).mappings()],
        "supply_usages": [dict(r) for r in conn.execute(
            select(supply_usages).where(supply_usages.c.work_item_id == row.id)
            .order_by(supply_usages.c.id)).mappings()],
        "history": history,
    }


@router.get(
    "/{item_id}", response_model=WorkItemDetail, responses=problems(404),
    summary="Show a work item with its records and history",
    description=(
        "Scope: `workitems:read`. Includes the services or supply usages the item "
        "holds (patient and encounter ids, codes, quantities), so the read is "
        "written to the audit log."
    ),
)
def get_work_item(
    request: Request, item_id: ItemId,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_READ))],
) -> Any:
    ctx = context(request)
    actions.fill_due_dates(ctx.engine, ctx.config)
    with ctx.engine.begin() as conn:
        row = actions.load_item(conn, item_id, principal)
        detail = _detail(conn, row)
        audit.record(conn, principal.actor, "work_item.read", "work_item", item_id)
    return detail


def _act(request: Request, item_id: int, principal: Principal, action: str,
         values: dict[str, Any], detail: dict[str, Any]) -> dict[str, Any]:
    ctx = context(request)
    with ctx.engine.begin() as conn:
        row = actions.load_item(conn, item_id, principal)
        actions.apply(conn, row, action, principal, values, detail)
        return _summary(actions.load_item(conn, item_id, principal))


ACTION_ERRORS = problems(404, 409)


@router.post(
    "/{item_id}/claim", response_model=ActionResult, responses=ACTION_ERRORS,
    summary="Claim an open work item",
    description="Scope: `workitems:write`. open → claimed, assigned to the caller.",
)
def claim(
    request: Request, item_id: ItemId,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_WRITE))],
) -> Any:
    now = dt.datetime.now(dt.UTC)
    return _act(request, item_id, principal, "claim",
                {"assignee": principal.client_id, "claimed_at": now},
                {"assignee": principal.client_id})


@router.post(
    "/{item_id}/reassign", response_model=ActionResult, responses=ACTION_ERRORS,
    summary="Assign a work item to someone else",
    description="Scope: `workitems:write`. open or claimed → claimed by `assignee`.",
)
def reassign(
    request: Request, item_id: ItemId, body: Reassign,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_WRITE))],
) -> Any:
    now = dt.datetime.now(dt.UTC)
    return _act(request, item_id, principal, "reassign",
                {"assignee": body.assignee, "claimed_at": now},
                {"assignee": body.assignee, "note": body.note})


def _corrected_bytes(body: Resolve) -> bytes | None:
    correction = body.corrected_message
    if correction is None:
        return None
    if correction.encoding == "text":
        return correction.content.encode("utf-8")
    # BASE64_PATTERN admits only well-formed base64, so this decodes.
    return base64.b64decode(correction.content, validate=True)


@router.post(
    "/{item_id}/resolve", response_model=ActionResult, responses=ACTION_ERRORS,
    summary="Resolve a work item, optionally with a corrected message",
    description=(
        "Scope: `workitems:write`. open or claimed (by the caller) → resolved. "
        "With `corrected_message`, the corrected content is stored as a new message "
        "with `replay_of` naming the item's message, the record the item holds is "
        "marked superseded, and the message is processed before the answer; "
        "`correction` shows the outcome. A charge or supply issue is posted at most "
        "once: 409 when the item's record was posted already."
    ),
)
def resolve(
    request: Request, item_id: ItemId, body: Resolve,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_WRITE))],
) -> Any:
    ctx = context(request)
    raw = _corrected_bytes(body)
    now = dt.datetime.now(dt.UTC)
    with ctx.engine.begin() as conn:
        row = actions.load_item(conn, item_id, principal)
        actions.check_status(row, "resolve")
        actions.check_assignee(row, principal)
        detail: dict[str, Any] = {"note": body.note}
        if raw is not None:
            detail["corrected_message_id"] = actions.store_correction(
                conn, row, raw, principal.actor)
        actions.apply(conn, row, "resolve", principal, {
            "resolved_at": now, "resolved_by": principal.actor,
            "resolution": _json_text(detail)}, detail)
        result = _summary(actions.load_item(conn, item_id, principal))
    corrected = detail.get("corrected_message_id")
    if corrected is not None:
        try:
            process_pending(ctx.engine, ctx.config)
        except Exception:  # the message stays received; a worker processes it later
            logger.exception("processing corrected message %d failed", corrected)
        result["correction"] = actions.correction_outcome(ctx.engine, corrected)
    return result


@router.post(
    "/{item_id}/approve", response_model=ActionResult, responses=ACTION_ERRORS,
    summary="Approve a work item",
    description=(
        "Scope: `workitems:approve`. open, claimed or resolved → approved (final). "
        "Records the decision; nothing is posted by the approval itself."
    ),
)
def approve(
    request: Request, item_id: ItemId,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_APPROVE))],
    body: Annotated[Decision | None, Body()] = None,
) -> Any:
    now = dt.datetime.now(dt.UTC)
    note = body.note if body is not None else None
    return _act(request, item_id, principal, "approve",
                {"resolved_at": now, "resolved_by": principal.actor},
                {"note": note} if note else {})


@router.post(
    "/{item_id}/reject", response_model=ActionResult, responses=ACTION_ERRORS,
    summary="Reject a work item",
    description="Scope: `workitems:approve`. open, claimed or resolved → rejected (final).",
)
def reject(
    request: Request, item_id: ItemId, body: Rejection,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_APPROVE))],
) -> Any:
    now = dt.datetime.now(dt.UTC)
    return _act(request, item_id, principal, "reject",
                {"resolved_at": now, "resolved_by": principal.actor,
                 "resolution": _json_text({"rejected": body.reason})},
                {"reason": body.reason})
