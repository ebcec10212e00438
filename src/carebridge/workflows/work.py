"""Work items raised and closed by the stock, authorization and procurement steps.

These steps run outside message processing, so they open work items one at
a time, and only when none exists for the same subject and reason: running
a step twice never opens a second item.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

from sqlalchemy import Connection, insert, select, update

from carebridge.config.rules import RuleSet
from carebridge.store.schema import work_item_events, work_items
from carebridge.workflows.reasons import TEAM_BY_REASON, Reason

SYSTEM_ACTOR = "carebridge"
"""The actor recorded when carebridge itself closes a work item."""

OPEN_STATUSES = ("open", "claimed")


def team_for(reason: Reason, rules: RuleSet) -> str:
    """Return the team that owns ``reason``: the rules' routing, else the built-in one."""
    return rules.routing.get(reason.value) or TEAM_BY_REASON[reason].value


def open_item(
    conn: Connection,
    *,
    subject_key: str,
    reason: Reason,
    team: str,
    message_id: int,
    detail: str,
    amount_at_risk: Decimal | None = None,
) -> tuple[int, bool]:
    """Return the work item for ``subject_key`` and ``reason``, opening it if none exists.

    Returns:
        The item's id and whether this call created it.
    """
    existing = conn.execute(
        select(work_items.c.id).where(
            work_items.c.subject_key == subject_key, work_items.c.reason == reason.value
        )
    ).scalar()
    if existing is not None:
        return existing, False
    item_id = conn.execute(
        insert(work_items).values(
            subject_key=subject_key,
            reason=reason.value,
            team=team,
            message_id=message_id,
            detail=detail,
            status="open",
            created_at=dt.datetime.now(dt.UTC),
            amount_at_risk=amount_at_risk,
        )
    ).inserted_primary_key[0]
    return item_id, True


def item_status(conn: Connection, subject_key: str, reason: Reason) -> str | None:
    """Return the status of the work item for ``subject_key`` and ``reason``, if any."""
    return conn.execute(
        select(work_items.c.status).where(
            work_items.c.subject_key == subject_key, work_items.c.reason == reason.value
        )
    ).scalar()


def close_item(conn: Connection, subject_key: str, reason: Reason, resolution: str) -> bool:
    """Resolve an open work item that carebridge no longer needs a person for.

    Returns:
        Whether an open item was resolved; items a person already closed stay as they are.
    """
    item_id = conn.execute(
        select(work_items.c.id).where(
            work_items.c.subject_key == subject_key,
            work_items.c.reason == reason.value,
            work_items.c.status.in_(OPEN_STATUSES),
        )
    ).scalar()
    if item_id is None:
        return False
    now = dt.datetime.now(dt.UTC)
    done = conn.execute(
        update(work_items)
        .where(work_items.c.id == item_id, work_items.c.status.in_(OPEN_STATUSES))
        .values(status="resolved", resolved_at=now, resolved_by=SYSTEM_ACTOR,
                resolution=resolution)
    ).rowcount
    if done:
        conn.execute(
            insert(work_item_events).values(
                work_item_id=item_id, at=now, actor=SYSTEM_ACTOR, action="resolved",
                detail=json.dumps({"resolution": resolution}),
            )
        )
    return bool(done)
