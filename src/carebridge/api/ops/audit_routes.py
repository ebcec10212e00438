"""Audit routes: query the hash-chained audit log and verify its chain."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from carebridge import audit
from carebridge.api.deps import context, require
from carebridge.api.ops.common import (
    IdCursor,
    Limit,
    Page,
    page,
    parse_json,
    problems,
    text_query,
    utc,
)
from carebridge.api.security import Principal, Scope
from carebridge.store.schema import audit_events

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/audit", tags=["audit"])

Scoped = Annotated[Principal, Depends(require(Scope.AUDIT_READ))]


class AuditEvent(BaseModel):
    """One row of the audit log."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 812, "at": "2025-03-02T10:31:07Z", "actor": "client:rc-analyst-1",
        "action": "work_item.resolve", "object_type": "work_item", "object_id": "17",
        "detail": {"from": "claimed", "to": "resolved", "corrected_message_id": 1611},
        "prev_hash": "5d1e...", "hash": "a93c...",
    }]})

    id: int
    at: dt.datetime
    actor: str = Field(description="Who acted: client:ID for API clients.")
    action: str
    object_type: str
    object_id: str | None = None
    detail: Any = None
    prev_hash: str
    hash: str


class ChainStatus(BaseModel):
    """The result of recomputing the audit chain from its first row."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"ok": True, "rows": 812, "broken_id": None, "problem": None},
        {"ok": False, "rows": 40, "broken_id": 41,
         "problem": "row 41 was changed after it was written"}]})

    ok: bool
    rows: int = Field(description="Rows checked before the first break, or all rows.")
    broken_id: int | None = None
    problem: str | None = None


@router.get(
    "/events", response_model=Page[AuditEvent], responses=problems(),
    summary="Query the audit log",
    description="Scope: `audit:read`. Newest first. Filters combine and match exactly.",
)
def list_events(
    request: Request, principal: Scoped, limit: Limit = 50, cursor: IdCursor = None,
    actor: Annotated[str | None, text_query("Actor, e.g. client:rc-analyst-1.", 120)] = None,
    action: Annotated[str | None, text_query("Action, e.g. message.raw.read.", 60)] = None,
    object_type: Annotated[str | None, text_query("Object type, e.g. message.", 60)] = None,
    object_id: Annotated[str | None, text_query("Object id.", 200)] = None,
    at_from: Annotated[dt.datetime | None, Query(
        description="At or after this instant (ISO 8601).")] = None,
    at_to: Annotated[dt.datetime | None, Query(description="Before this instant.")] = None,
) -> Any:
    low, high = utc(at_from), utc(at_to)
    c = audit_events.c
    query = select(audit_events)
    for column, value in ((c.actor, actor), (c.action, action),
                          (c.object_type, object_type), (c.object_id, object_id)):
        if value is not None:
            query = query.where(column == value)
    if low is not None:
        query = query.where(c.at >= low)
    if high is not None:
        query = query.where(c.at < high)
    if cursor is not None:
        query = query.where(c.id < cursor)
    with context(request).engine.connect() as conn:
        rows = conn.execute(query.order_by(c.id.desc()).limit(limit + 1)).all()
    items = [
        {"id": row.id, "at": utc(row.at), "actor": row.actor, "action": row.action,
         "object_type": row.object_type, "object_id": row.object_id,
         "detail": parse_json(row.detail), "prev_hash": row.prev_hash, "hash": row.hash}
        for row in rows[:limit]
    ]
    return page(request, items, items[-1]["id"] if len(rows) > limit else None)


@router.get(
    "/verify", response_model=ChainStatus, responses=problems(),
    summary="Verify the audit chain",
    description=(
        "Scope: `audit:read`. Recomputes every row's hash from the first row on and "
        "names the first row that was changed, inserted or deleted. Reads the whole "
        "log, so it takes time in proportion to its size."
    ),
)
def verify(request: Request, principal: Scoped) -> Any:
    check = audit.verify(context(request).engine)
    if not check.ok:
        logger.warning("audit chain broken at row %s (checked by %s)", check.broken_id,
                       principal.client_id)
    return {"ok": check.ok, "rows": check.rows, "broken_id": check.broken_id,
            "problem": check.problem}
