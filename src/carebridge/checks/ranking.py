"""Work-queue ranking: money at risk and time left to the SLA, with the reason shown.

The priority is the sum of two parts, so that either can put an item first:

- money: 100 points per tenfold of the amount at risk (USD 10 gives 100,
  USD 10,000 gives 400), up to 600;
- time: 400 points when the SLA deadline has passed, otherwise
  400 * 24 / (24 + hours left): 200 a day before the deadline, 100 three
  days before. An item without a deadline gets none.

Ranking only orders the queue; it changes no work item's status.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from decimal import Decimal

from sqlalchemy import Connection, select, update

from carebridge.store.schema import work_items

log = logging.getLogger(__name__)

MAX_MONEY_POINTS = 600
OVERDUE_POINTS = 400

SLA_HOURS_BY_REASON = {
    "duplicate_patient": 72.0,
    "missing_charge": 120.0,
    "units_anomaly": 48.0,
    "price_anomaly": 48.0,
    "billed_not_documented": 72.0,
}
"""Default SLA of each check's work items, in hours from creation."""


def priority(
    amount_at_risk: Decimal | None, due_at: dt.datetime | None, now: dt.datetime
) -> tuple[int, str]:
    """Return the priority of a work item and the reason to show next to it."""
    parts = []
    points = 0.0
    if amount_at_risk is not None and amount_at_risk > 0:
        points += min(MAX_MONEY_POINTS, 100 * math.log10(1 + float(amount_at_risk)))
        parts.append(f"USD {amount_at_risk:,.2f} at risk")
    else:
        parts.append("no amount at risk")
    if due_at is not None:
        if due_at.tzinfo is None:  # SQLite returns naive UTC datetimes
            due_at = due_at.replace(tzinfo=dt.UTC)
        hours_left = (due_at - now).total_seconds() / 3600
        if hours_left <= 0:
            points += OVERDUE_POINTS
            parts.append(f"SLA overdue by {_hours(-hours_left)}")
        else:
            points += OVERDUE_POINTS * 24 / (24 + hours_left)
            parts.append(f"SLA due in {_hours(hours_left)}")
    else:
        parts.append("no SLA")
    return round(points), "; ".join(parts)


def _hours(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.0f} days"
    return f"{hours:.0f} h"


def rank_work_queue(conn: Connection, now: dt.datetime | None = None) -> int:
    """Set ``priority`` and ``priority_reason`` of every open or claimed work item.

    Returns the number of items updated.
    """
    now = now or dt.datetime.now(dt.UTC)
    rows = conn.execute(
        select(work_items.c.id, work_items.c.amount_at_risk, work_items.c.due_at)
        .where(work_items.c.status.in_(("open", "claimed")))
    ).all()
    for row in rows:
        points, reason = priority(row.amount_at_risk, row.due_at, now)
        conn.execute(
            update(work_items).where(work_items.c.id == row.id)
            .values(priority=points, priority_reason=reason)
        )
    log.info("work queue ranked", extra={"action": "rank", "items": len(rows)})
    return len(rows)
