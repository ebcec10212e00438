"""Work items for held claims, one per reason, on subject ``claim:{encounter id}``.

A reason that no longer applies when the claim is checked again is resolved
by carebridge, and a resolved reason that applies again is reopened, so the
queue always shows why each held claim waits.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Row, insert, select, update

from carebridge.engine.batch_write import insert_rows
from carebridge.store.lookups import chunks
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


@dataclass(frozen=True, slots=True)
class ClaimCheck:
    """The outcome of one readiness or validation check of an encounter's claim."""

    encounter_id: str
    message_id: int
    problems: Sequence[Rejection]
    amount_at_risk: Decimal | None = None


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
    sync_many_claim_items(conn, [ClaimCheck(encounter_id, message_id, problems, amount_at_risk)],
                          now=now)


def sync_many_claim_items(
    conn: Connection, checks: Sequence[ClaimCheck], *, now: dt.datetime
) -> None:
    """Bring the work items of each checked claim in line with what its check found.

    The items of all the claims are read in a few queries and new items are
    inserted together, because the first check of a large load finds
    thousands of claims to hold at once.
    """
    existing: dict[str, dict[str, Row]] = defaultdict(dict)
    subjects = [claim_subject(check.encounter_id) for check in checks]
    for chunk in chunks(subjects):
        for row in conn.execute(select(work_items).where(work_items.c.subject_key.in_(chunk))):
            existing[row.subject_key][row.reason] = row
    new_items: list[dict[str, Any]] = []
    stale: list[Row] = []
    for subject, check in zip(subjects, checks, strict=True):
        known = existing.get(subject, {})
        expected = {problem.reason.value: problem for problem in check.problems}
        for reason, problem in expected.items():
            row = known.get(reason)
            if row is None:
                new_items.append({
                    "subject_key": subject, "reason": reason, "team": problem.team.value,
                    "message_id": check.message_id, "detail": problem.detail,
                    "status": "open", "created_at": now,
                    "amount_at_risk": check.amount_at_risk,
                })
            elif row.status in OPEN_STATUSES:
                if row.detail != problem.detail or row.amount_at_risk != check.amount_at_risk:
                    conn.execute(update(work_items).where(work_items.c.id == row.id).values(
                        detail=problem.detail, amount_at_risk=check.amount_at_risk,
                    ))
            else:
                conn.execute(update(work_items).where(work_items.c.id == row.id).values(
                    status="open", detail=problem.detail, amount_at_risk=check.amount_at_risk,
                    resolved_at=None, resolved_by=None, resolution=None,
                    assignee=None, claimed_at=None,
                ))
                _event(conn, row.id, "reopened", now, {"reason": reason})
        stale.extend(row for reason, row in known.items()
                     if reason not in expected and reason in _CLAIM_REASONS)
    insert_rows(conn, work_items, new_items)
    _resolve(conn, stale, now, "no longer applies when the claim was checked again")


def resolve_claim_items(
    conn: Connection, encounter_id: str, *, now: dt.datetime, resolution: str
) -> None:
    """Resolve every open work item of an encounter's claim."""
    resolve_many_claim_items(conn, {encounter_id: resolution}, now=now)


def resolve_many_claim_items(
    conn: Connection, resolutions: dict[str, str], *, now: dt.datetime
) -> None:
    """Resolve the open work items of each encounter's claim, with its resolution."""
    by_subject = {claim_subject(encounter_id): text for encounter_id, text in resolutions.items()}
    for chunk in chunks(by_subject):
        rows = conn.execute(select(work_items).where(
            work_items.c.subject_key.in_(chunk),
            work_items.c.reason.in_(sorted(_CLAIM_REASONS)),
            work_items.c.status.in_(OPEN_STATUSES),
        )).all()
        for row in rows:
            _resolve(conn, [row], now, by_subject[row.subject_key])


def _resolve(conn: Connection, rows: Sequence, now: dt.datetime, resolution: str) -> None:
    for row in rows:
        if row.status not in OPEN_STATUSES:
            continue
        conn.execute(update(work_items).where(work_items.c.id == row.id).values(
            status="resolved", resolved_at=now, resolved_by=ACTOR, resolution=resolution,
        ))
        _event(conn, row.id, "resolved", now, {"resolution": resolution})
