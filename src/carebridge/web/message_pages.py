"""Message search, the message page with its lineage, and replay.

Reads and replays use the queries of :mod:`carebridge.api.ops.message_store`
and write the same audit rows as the API routes.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select

from carebridge import audit
from carebridge.api.deps import ApiError, context
from carebridge.api.ops.message_store import (
    MessageFilter,
    lineage,
    message_row,
    original_with_raw,
    pruned_error,
    search,
    store_copy,
    summary_values,
)
from carebridge.api.security import Scope
from carebridge.store.schema import deliveries, journals
from carebridge.web.highlight import raw_view
from carebridge.web.render import current_user, deny, deny_post, from_api_error, render
from carebridge.web.session import WebUser

logger = logging.getLogger(__name__)

router = APIRouter()

PAGE_SIZE = 50
STATES = ("received", "processed", "failed", "duplicate")

User = Annotated[WebUser | None, Depends(current_user)]

_FILTERS = ("source", "type", "state", "control_id", "patient_id", "encounter_id")


def _date(value: str, name: str) -> dt.datetime | None:
    """Return the UTC midnight starting the day ``value`` (YYYY-MM-DD), or ``None``."""
    if not value:
        return None
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise ApiError(422, "invalid", f"{name} {value!r} is not a date (YYYY-MM-DD)",
                       location=name) from None
    return dt.datetime.combine(day, dt.time(), dt.UTC)


@router.get("/messages")
def messages_page(request: Request, user: User, below: int | None = None) -> Response:
    """Search stored messages, newest first."""
    if (refusal := deny(request, user, Scope.MESSAGES_READ)) is not None:
        return refusal
    params = request.query_params
    filters = {name: (params.get(name) or "").strip()[:200] for name in
               (*_FILTERS, "received_from", "received_to")}
    searched = any(filters.values()) or below is not None
    items: list[dict[str, Any]] = []
    next_below = None
    error = None
    if searched:
        try:
            low = _date(filters["received_from"], "received_from")
            high = _date(filters["received_to"], "received_to")
            if low is not None and high is not None and high <= low:
                raise ApiError(422, "invalid", "received_to must be later than "
                               "received_from")
            where = MessageFilter(**{name: filters[name] or None for name in _FILTERS},
                                  received_from=low, received_to=high)
            with context(request).engine.begin() as conn:
                items, next_below = search(conn, where, below, PAGE_SIZE)
                if items:
                    audit.record(conn, user.principal.actor, "message.search", "message",
                                 None, {"message_ids": [item["id"] for item in items]})
        except ApiError as exc:
            error = exc.message
    query = urlencode({name: value for name, value in filters.items() if value})
    return render(request, user, "messages.html", filters=filters, items=items,
                  searched=searched, next_below=next_below, error=error, states=STATES,
                  query=query, status_code=422 if error else 200)


def _journal_deliveries(conn: Any, journal_ids: list[int]) -> list[Any]:
    """Return the deliveries of the journals, with the destination's response."""
    if not journal_ids:
        return []
    return conn.execute(
        select(deliveries.c.id, deliveries.c.destination, deliveries.c.record_id,
               deliveries.c.state, deliveries.c.attempts, deliveries.c.last_error,
               deliveries.c.response, deliveries.c.delivered_at, deliveries.c.replay_of,
               journals.c.journal_key)
        .join(journals, journals.c.id == deliveries.c.record_id)
        .where(deliveries.c.kind == "journal", deliveries.c.record_id.in_(journal_ids))
        .order_by(deliveries.c.id)).all()


@router.get("/messages/{message_id}")
def message_page(request: Request, message_id: int, user: User) -> Response:
    """Show a message: metadata, raw content and lineage down to the deliveries."""
    if (refusal := deny(request, user, Scope.MESSAGES_READ)) is not None:
        return refusal
    with context(request).engine.begin() as conn:
        row = message_row(conn, message_id)
        if row is None:
            return from_api_error(request, user, ApiError(
                404, "not-found", f"message {message_id} not found"), "/ui/messages")
        summary = summary_values(row)
        full = original_with_raw(conn, message_id)
        view = None
        if full is not None and full.raw is not None:
            view = raw_view(bytes(full.raw), row.format, "", "", [])
        trace = lineage(conn, row)
        sent = _journal_deliveries(conn, trace["journal_ids"])
        audit.record(conn, user.principal.actor, "message.read", "message", message_id)
        audit.record(conn, user.principal.actor, "message.canonical.read", "message",
                     message_id, {"patient_ids_shown": len(trace["patients"]),
                                  "service_ids": [s["id"] for s in trace["services"]]})
    return render(request, user, "message.html", message=row, summary=summary,
                  view=view, trace=trace, deliveries=sent,
                  can_replay=user.may(Scope.MESSAGES_REPLAY),
                  pruned=None if view else pruned_error(row).message)


@router.post("/messages/{message_id}/replay")
def replay(
    request: Request, message_id: int, user: User,
    csrf: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    """Store the message again so that workers process it again."""
    if (refusal := deny_post(request, user, Scope.MESSAGES_REPLAY, csrf)) is not None:
        return refusal
    back = f"/ui/messages/{message_id}"
    with context(request).engine.begin() as conn:
        original = original_with_raw(conn, message_id)
        if original is None:
            return from_api_error(request, user, ApiError(
                404, "not-found", f"message {message_id} not found"), "/ui/messages")
        if original.raw is None:
            return from_api_error(request, user, pruned_error(original), back)
        new_id = store_copy(conn, original, bytes(original.raw),
                            origin=f"replay of message {message_id}")
        audit.record(conn, user.principal.actor, "message.replay", "message", new_id,
                     {"replay_of": message_id})
    logger.info("message %d replayed as message %d by client %s", message_id, new_id,
                user.client_id)
    return RedirectResponse(f"/ui/messages/{new_id}", status_code=303)
