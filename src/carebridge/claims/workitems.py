"""Work items for held claims, one per reason, on subject ``claim:{encounter id}``.

A reason that no longer applies when the claim is checked again is resolved
by carebridge, and a resolved reason that applies again is reopened, so the
queue always shows why each held claim waits.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from decimal import Decimal

from sqlalchemy import Connection, insert, select, update

from carebridge.store.schema import work_item_events, work_items
from carebridge.workflows.reasons import Rejection

ACTOR = "carebridge"
OPEN_STATUSES = ("open", "claimed")
# The readiness and validation reasons this module owns; other reasons on a
# claim subject (none today) are left alone.
_CLAIM_REASONS = frozenset({
    "diagnosis_missing", "authorization_missing", "open_work_items",
    "patient_incomplete", "claim_credit_balance", "claim_invalid",
})


def claim_subject(encounter_id: str) -> str:
    """Return the work-item subject key of an encounter's claim."""
    return f"claim:{encounter_id}"


def _event(conn: Connection, item_id: int, action: str, now: dt.datetime, detail: dict) -> None:
    conn.execute(insert(work_item_events).values(
        work_item_id=item_id, at=now, actor=ACTOR, action=action,
        detail=json.dumps(detail, sort_keys=True),
    ))


def sync_claim_items(
    conn: Connection,
    encounter_id: str,
    message_id: int,
    problems: Sequence[Rejection],
    *,
    now: dt.datetime,
    amount_at_risk: Decimal | None = None,
) -> None:
    """Open a work item per reason in ``problems``; resolve the claim's other reasons."""
    subject = claim_subject(encounter_id)
    existing = {
        row.reason: row
        for row in conn.execute(select(work_items).where(work_items.c.subject_key == subject))
    }
    wanted = {problem.reason.value: problem for problem in problems}
    for reason, problem in wanted.items():
        row = existing.get(reason)
        if row is None:
            conn.execute(insert(work_items).values(
                subject_key=subject, reason=reason, team=problem.team.value,
                message_id=message_id, detail=problem.detail, status="open",
                created_at=now, amount_at_risk=amount_at_risk,
            ))
        elif row.status in OPEN_STATUSES:
            conn.execute(update(work_items).where(work_items.c.id == row.id).values(
                detail=problem.detail, amount_at_risk=amount_at_risk,
            ))
        else:
            conn.execute(update(work_items).where(work_items.c.id == row.id).values(
                status="open", detail=problem.detail, amount_at_risk=amount_at_risk,
                resolved_at=None, resolved_by=None, resolution=None,
                assignee=None, claimed_at=None,
            ))
            _event(conn, row.id, "reopened", now, {"reason": reason})
    stale = [row for reason, row in existing.items()
             if reason not in wanted and reason in _CLAIM_REASONS]
    _resolve(conn, stale, now, "no longer applies when the claim was checked again")


def resolve_claim_items(
    conn: Connection, encounter_id: str, *, now: dt.datetime, resolution: str
) -> None:
    """Resolve every open work item of an encounter's claim."""
    rows = conn.execute(
        select(work_items).where(work_items.c.subject_key == claim_subject(encounter_id))
    ).all()
    _resolve(conn, [row for row in rows if row.reason in _CLAIM_REASONS], now, resolution)


def _resolve(conn: Connection, rows: Sequence, now: dt.datetime, resolution: str) -> None:
    for row in rows:
        if row.status not in OPEN_STATUSES:
            continue
        conn.execute(update(work_items).where(work_items.c.id == row.id).values(
            status="resolved", resolved_at=now, resolved_by=ACTOR, resolution=resolution,
        ))
        _event(conn, row.id, "resolved", now, {"resolution": resolution})
