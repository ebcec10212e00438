"""Work queues and the work item page, with fix-and-resume, approve, reject and reassign.

Every state change goes through :mod:`carebridge.api.ops.work_item_actions`,
the functions behind the API's routes, so the UI and the API share one state
machine, one history table and one audit trail.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import case, func, select

from carebridge import audit
from carebridge.api.deps import ApiError, context
from carebridge.api.ops import work_item_actions as actions
from carebridge.api.ops.message_store import original_with_raw
from carebridge.api.security import Scope
from carebridge.engine.processor import process_pending
from carebridge.store.schema import (
    charge_lines,
    messages,
    services,
    supply_issues,
    supply_usages,
    work_item_events,
    work_items,
)
from carebridge.web.highlight import raw_view
from carebridge.web.render import current_user, deny, deny_post, from_api_error, render
from carebridge.web.session import WebUser

logger = logging.getLogger(__name__)

router = APIRouter()

PAGE_SIZE = 50
ACTIVE = "active"
"""The status filter that lists open and claimed items, the queue's default."""

MAX_EDIT_BYTES = 1024 * 1024
"""Largest message the fix form offers for editing; larger ones are fixed through the API."""

User = Annotated[WebUser | None, Depends(current_user)]
Csrf = Annotated[str, Form(max_length=100)]


def _status_condition(status: str) -> Any:
    if status == ACTIVE:
        return work_items.c.status.in_((actions.OPEN, actions.CLAIMED))
    if status in actions.STATUSES:
        return work_items.c.status == status
    return None


def _countdown(due: dt.datetime | None, now: dt.datetime) -> dict[str, Any] | None:
    if due is None:
        return None
    if due.tzinfo is None:  # SQLite returns naive UTC times
        due = due.replace(tzinfo=dt.UTC)
    return {"due_at": due, "seconds": (due - now).total_seconds()}


@router.get("/queues")
def queues(
    request: Request, user: User, team: str = "", reason: str = "", status: str = ACTIVE,
    assignee: str = "", page: int = 1,
) -> Response:
    """List work items in queue order: priority, then SLA due time, then age."""
    if (refusal := deny(request, user, Scope.WORK_ITEMS_READ)) is not None:
        return refusal
    ctx = context(request)
    actions.fill_due_dates(ctx.engine, ctx.config)

    allowed = actions.visible(user.principal)
    page = max(1, min(page, 10_000))
    c = work_items.c
    query = select(work_items).where(allowed)
    for column, value in ((c.team, team), (c.reason, reason), (c.assignee, assignee)):
        if value:
            query = query.where(column == value[:120])
    condition = _status_condition(status)
    if condition is not None:
        query = query.where(condition)
    now = dt.datetime.now(dt.UTC)

    with ctx.engine.connect() as conn:
        total = conn.execute(
            select(func.count()).select_from(query.subquery())).scalar_one()
        rows = conn.execute(
            query.order_by(c.priority.desc(), c.due_at.asc().nulls_last(), c.id.asc())
            .limit(PAGE_SIZE).offset((page - 1) * PAGE_SIZE)).all()
        team_counts = conn.execute(
            select(c.team, func.count(), func.sum(case((c.due_at < now, 1), else_=0)))
            .where(allowed, c.status.in_((actions.OPEN, actions.CLAIMED)))
            .group_by(c.team).order_by(c.team)).all()
        reasons = list(conn.execute(
            select(c.reason).where(allowed).distinct().order_by(c.reason)).scalars())
    items = [{"row": row, "countdown": _countdown(row.due_at, now)} for row in rows]

    return render(
        request, user, "queues.html", items=items, total=total, page=page,
        pages=max(1, -(-total // PAGE_SIZE)),
        teams=[{"team": t, "active": n, "overdue": int(o or 0)} for t, n, o in team_counts],
        reasons=reasons, statuses=[ACTIVE, *actions.STATUSES, "all"],
        filters={"team": team, "reason": reason, "status": status, "assignee": assignee},
    )


def _held_records(conn: Any, item_id: int) -> tuple[list[dict], list[dict]]:
    held_services = [dict(r) for r in conn.execute(
        select(services).where(services.c.work_item_id == item_id)
        .order_by(services.c.id)).mappings()]
    held_usages = [dict(r) for r in conn.execute(
        select(supply_usages).where(supply_usages.c.work_item_id == item_id)
        .order_by(supply_usages.c.id)).mappings()]
    return held_services, held_usages


def _history(conn: Any, item_id: int) -> list[dict[str, Any]]:
    events = []
    for event in conn.execute(select(work_item_events)
                              .where(work_item_events.c.work_item_id == item_id)
                              .order_by(work_item_events.c.id)):
        detail = json.loads(event.detail) if event.detail else {}
        events.append({"at": event.at, "actor": event.actor, "action": event.action,
                       "detail": detail})
    return events


def correction_view(conn: Any, message_id: int) -> dict[str, Any]:
    """Return a corrected message's state, its charges and supply issues, and new items."""
    row = conn.execute(select(messages.c.id, messages.c.state, messages.c.error)
                       .where(messages.c.id == message_id)).first()
    if row is None:
        return {"message_id": message_id, "state": "unknown"}
    return {
        "message_id": message_id, "state": row.state, "error": row.error,
        "charges": conn.execute(select(charge_lines).where(
            charge_lines.c.source_message_id == message_id)
            .order_by(charge_lines.c.id)).all(),
        "supply_issues": conn.execute(select(supply_issues).where(
            supply_issues.c.source_message_id == message_id)
            .order_by(supply_issues.c.id)).all(),
        "work_items": conn.execute(select(work_items.c.id, work_items.c.reason,
                                          work_items.c.status)
                                   .where(work_items.c.message_id == message_id)
                                   .order_by(work_items.c.id)).all(),
    }


@router.get("/work-items/{item_id}")
def work_item(request: Request, item_id: int, user: User) -> Response:
    """Show one work item: the rule that failed, the raw message, its records and history."""
    if (refusal := deny(request, user, Scope.WORK_ITEMS_READ)) is not None:
        return refusal
    ctx = context(request)
    actions.fill_due_dates(ctx.engine, ctx.config)
    show_raw = user.may(Scope.MESSAGES_READ)
    with ctx.engine.begin() as conn:
        try:
            row = actions.load_item(conn, item_id, user.principal)
        except ApiError as exc:
            return from_api_error(request, user, exc, "/ui/queues")
        held_services, held_usages = _held_records(conn, item_id)
        audit.record(conn, user.principal.actor, "work_item.read", "work_item", item_id)
        message = original_with_raw(conn, row.message_id)
        view = None
        raw_text = None
        if show_raw and message is not None and message.raw is not None:
            raw = bytes(message.raw)
            view = raw_view(raw, message.format, row.reason, row.detail,
                            held_services + held_usages)
            if len(raw) <= MAX_EDIT_BYTES:
                raw_text = raw.decode("utf-8", errors="replace")
            audit.record(conn, user.principal.actor, "message.raw.read", "message",
                         row.message_id)
        history = _history(conn, item_id)
        decides = actions.may_decide(conn, row, user.principal)
        resolution = json.loads(row.resolution) if row.resolution else {}
        corrected = resolution.get("corrected_message_id") \
            if isinstance(resolution, dict) else None
        correction = correction_view(conn, corrected) if corrected else None
    return render(
        request, user, "work_item.html", item=row, services=held_services,
        usages=held_usages, view=view, raw_text=raw_text, show_raw=show_raw,
        message=message, history=history, resolution=resolution, correction=correction,
        countdown=_countdown(row.due_at, dt.datetime.now(dt.UTC)),
        can_write=user.may(Scope.WORK_ITEMS_WRITE),
        can_approve=user.may(Scope.WORK_ITEMS_APPROVE) and decides,
        open_statuses=(actions.OPEN, actions.CLAIMED),
        decidable=(actions.OPEN, actions.CLAIMED, actions.RESOLVED),
    )


def match_line_endings(submitted: str, original: bytes) -> str:
    """Return ``submitted`` with the line breaks of ``original``.

    Browsers send a textarea's line breaks as CRLF, so an HL7 v2 message
    whose segments end with CR comes back with CRLF; this restores CR.
    """
    text = submitted.replace("\r\n", "\n")
    if b"\r\n" in original:
        return text.replace("\n", "\r\n")
    if b"\r" in original and b"\n" not in original:
        return text.replace("\n", "\r")
    return text


def _item_page(item_id: int) -> RedirectResponse:
    return RedirectResponse(f"/ui/work-items/{item_id}", status_code=303)


@router.post("/work-items/{item_id}/resolve")
def resolve(
    request: Request, item_id: int, user: User, csrf: Csrf = "",
    note: Annotated[str, Form(max_length=2000)] = "",
    corrected_message: Annotated[str, Form(max_length=5_000_000)] = "",
) -> Response:
    """Resolve an item; with a corrected message, store it and process it (fix-and-resume)."""
    if (refusal := deny_post(request, user, Scope.WORK_ITEMS_WRITE, csrf)) is not None:
        return refusal
    back = f"/ui/work-items/{item_id}"
    if not note.strip():
        return from_api_error(request, user, ApiError(
            422, "invalid", "enter a note that says what was done"), back)
    if corrected_message and not user.may(Scope.MESSAGES_READ):
        return from_api_error(request, user, ApiError(
            422, "invalid", "a corrected message needs the scope messages:read"), back)
    ctx = context(request)
    principal = user.principal
    now = dt.datetime.now(dt.UTC)

    try:
        with ctx.engine.begin() as conn:
            row = actions.load_item(conn, item_id, principal)
            actions.check_status(row, "resolve")
            actions.check_assignee(row, principal)
            detail: dict[str, Any] = {"note": note.strip()}
            if corrected_message.strip():
                original = original_with_raw(conn, row.message_id)
                before = bytes(original.raw or b"") if original else b""
                raw = match_line_endings(corrected_message, before).encode("utf-8")
                if raw != before:  # an unchanged message resolves without a copy
                    detail["corrected_message_id"] = actions.store_correction(
                        conn, row, raw, principal.actor)
            actions.apply(conn, row, "resolve", principal, {
                "resolved_at": now, "resolved_by": principal.actor,
                "resolution": json.dumps(detail, sort_keys=True)}, detail)
    except ApiError as exc:
        return from_api_error(request, user, exc, back)

    corrected = detail.get("corrected_message_id")
    if corrected is not None:
        try:
            process_pending(ctx.engine, ctx.config)
        except Exception:  # the message stays received; a worker processes it later
            logger.exception("processing corrected message %d failed", corrected)
        logger.info("work item %d fixed by client %s as message %d", item_id,
                    principal.client_id, corrected)
    return _item_page(item_id)


def _act(request: Request, user: WebUser, item_id: int, action: str,
         values: dict[str, Any], detail: dict[str, Any]) -> Response:
    try:
        with context(request).engine.begin() as conn:
            row = actions.load_item(conn, item_id, user.principal)
            actions.apply(conn, row, action, user.principal, values, detail)
    except ApiError as exc:
        return from_api_error(request, user, exc, f"/ui/work-items/{item_id}")
    return _item_page(item_id)


@router.post("/work-items/{item_id}/claim")
def claim(request: Request, item_id: int, user: User, csrf: Csrf = "") -> Response:
    if (refusal := deny_post(request, user, Scope.WORK_ITEMS_WRITE, csrf)) is not None:
        return refusal
    now = dt.datetime.now(dt.UTC)
    return _act(request, user, item_id, "claim",
                {"assignee": user.client_id, "claimed_at": now},
                {"assignee": user.client_id})


@router.post("/work-items/{item_id}/reassign")
def reassign(
    request: Request, item_id: int, user: User, csrf: Csrf = "",
    assignee: Annotated[str, Form(max_length=120)] = "",
    note: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    if (refusal := deny_post(request, user, Scope.WORK_ITEMS_WRITE, csrf)) is not None:
        return refusal
    assignee = assignee.strip()
    if not assignee or not assignee.isprintable():
        return from_api_error(request, user, ApiError(
            422, "invalid", "enter the client id of the new assignee"),
            f"/ui/work-items/{item_id}")
    now = dt.datetime.now(dt.UTC)
    return _act(request, user, item_id, "reassign",
                {"assignee": assignee, "claimed_at": now},
                {"assignee": assignee, "note": note.strip() or None})


@router.post("/work-items/{item_id}/approve")
def approve(
    request: Request, item_id: int, user: User, csrf: Csrf = "",
    note: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    if (refusal := deny_post(request, user, Scope.WORK_ITEMS_APPROVE, csrf)) is not None:
        return refusal
    now = dt.datetime.now(dt.UTC)
    return _act(request, user, item_id, "approve",
                {"resolved_at": now, "resolved_by": user.principal.actor},
                {"note": note.strip()} if note.strip() else {})


@router.post("/work-items/{item_id}/reject")
def reject(
    request: Request, item_id: int, user: User, csrf: Csrf = "",
    reason: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    if (refusal := deny_post(request, user, Scope.WORK_ITEMS_APPROVE, csrf)) is not None:
        return refusal
    if not reason.strip():
        return from_api_error(request, user, ApiError(
            422, "invalid", "enter the reason for the rejection"),
            f"/ui/work-items/{item_id}")
    now = dt.datetime.now(dt.UTC)
    return _act(request, user, item_id, "reject",
                {"resolved_at": now, "resolved_by": user.principal.actor,
                 "resolution": json.dumps({"rejected": reason.strip()})},
                {"reason": reason.strip()})
