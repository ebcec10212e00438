"""The work-item state machine and the corrections a resolution can carry.

::

    open ──claim──► claimed ──resolve──► resolved ──approve──► approved
      │               ▲  │                   │
      └──reassign─────┘  └──approve/reject───┴──reject──────► rejected

``open`` and ``claimed`` items can also be resolved, approved or rejected
directly; ``approved`` and ``rejected`` are final. Each change is a
conditional UPDATE on the status read, so two callers racing on one item
cannot both succeed: the second gets 409.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Row, func, insert, select, update

from carebridge import audit
from carebridge.api.deps import ApiError
from carebridge.api.ops.message_store import store_copy
from carebridge.api.security import STEP_DECIDERS, Principal, Role
from carebridge.config.model import Configuration
from carebridge.ingest.files.sources import bounded
from carebridge.store.bodies import with_bodies
from carebridge.store.schema import (
    charge_lines,
    message_bodies,
    messages,
    retained_bodies,
    services,
    supply_issues,
    supply_usages,
    work_item_events,
    work_items,
)

logger = logging.getLogger(__name__)

OPEN, CLAIMED, RESOLVED, APPROVED, REJECTED = (
    "open", "claimed", "resolved", "approved", "rejected")
STATUSES = (OPEN, CLAIMED, RESOLVED, APPROVED, REJECTED)


@dataclass(frozen=True, slots=True)
class Transition:
    """An action: the statuses it starts from and the status it leaves."""

    action: str
    event: str
    sources: frozenset[str]
    target: str


TRANSITIONS = {
    "claim": Transition("claim", "claimed", frozenset({OPEN}), CLAIMED),
    "reassign": Transition("reassign", "reassigned", frozenset({OPEN, CLAIMED}), CLAIMED),
    "resolve": Transition("resolve", "resolved", frozenset({OPEN, CLAIMED}), RESOLVED),
    "approve": Transition("approve", "approved", frozenset({OPEN, CLAIMED, RESOLVED}),
                          APPROVED),
    "reject": Transition("reject", "rejected", frozenset({OPEN, CLAIMED, RESOLVED}),
                         REJECTED),
}


def visible(principal: Principal) -> Any:
    """Return the SQL condition limiting work items to the caller's teams."""
    teams = principal.teams()
    if teams is None:
        return work_items.c.id.is_not(None)
    return work_items.c.team.in_(sorted(teams) or [""])


def load_item(conn: Connection, item_id: int, principal: Principal) -> Row:
    """Return a work item the caller may see; 404 for a missing one or another team's."""
    row = conn.execute(
        select(work_items).where(work_items.c.id == item_id, visible(principal))
    ).first()
    if row is None:
        raise ApiError(404, "not-found", f"work item {item_id} not found")
    return row


def fill_due_dates(engine: Engine, config: Configuration, limit: int = 5000) -> int:
    """Set ``due_at`` to ``created_at`` plus the team's SLA hours where it is unset.

    Work items are created by the engine without a due time; the SLA comes
    from ``api.sla_hours_by_team``. Items of teams without an SLA keep none.
    Runs before work items are listed or shown, so ordering by ``due_at``
    happens in SQL. Returns the number of items updated.
    """
    hours = config.api.sla_hours_by_team
    if not hours:
        return 0
    with engine.begin() as conn:
        rows = conn.execute(
            select(work_items.c.id, work_items.c.team, work_items.c.created_at)
            .where(work_items.c.due_at.is_(None), work_items.c.team.in_(sorted(hours)))
            .order_by(work_items.c.id).limit(limit)
        ).all()
        for row in rows:
            created = row.created_at
            if created.tzinfo is None:
                created = created.replace(tzinfo=dt.UTC)
            conn.execute(
                update(work_items)
                .where(work_items.c.id == row.id, work_items.c.due_at.is_(None))
                .values(due_at=created + dt.timedelta(hours=hours[row.team]))
            )
    if rows:
        logger.info("due times set on %d work items", len(rows))
    return len(rows)


def check_status(item: Row, action: str) -> Transition:
    """Return the transition of ``action``; 409 when ``item``'s status does not allow it."""
    transition = TRANSITIONS[action]
    if item.status not in transition.sources:
        allowed = " or ".join(sorted(transition.sources))
        raise ApiError(409, "conflict", f"work item {item.id} is {item.status}; "
                       f"{action} needs a work item that is {allowed}")
    return transition


def apply(conn: Connection, item: Row, action: str, principal: Principal,
          values: dict[str, Any], detail: dict[str, Any]) -> None:
    """Move ``item`` by ``action``: status check, update, history row and audit row.

    Raises:
        ApiError: 409 when the item's status does not allow ``action`` or it
            changed since it was read.
    """
    transition = check_status(item, action)
    if action in ("approve", "reject"):
        _check_procurement_duties(conn, item, principal)
    done = conn.execute(
        update(work_items)
        .where(work_items.c.id == item.id, work_items.c.status == item.status)
        .values(status=transition.target, **values)
    ).rowcount
    if done != 1:
        raise ApiError(409, "conflict", f"work item {item.id} changed while this request "
                       "ran; read it again and retry")
    now = dt.datetime.now(dt.UTC)
    conn.execute(insert(work_item_events).values(
        work_item_id=item.id, at=now, actor=principal.actor, action=transition.event,
        detail=json.dumps(detail, sort_keys=True, default=str) if detail else None,
    ))
    if action == "approve" and item.reason == "duplicate_patient":
        # Approving a flagged pair is the person's decision to merge them.
        from carebridge.checks.merge import MergeError, merge_patients

        try:
            merge_patients(conn, item, principal.actor)
        except MergeError as exc:
            logger.info("merge of work item %d refused: %s", item.id, exc)
            raise ApiError(409, "conflict", str(exc)) from None
    ids_only = {key: value for key, value in detail.items() if key not in ("note", "reason")}
    audit.record(conn, principal.actor, f"work_item.{action}", "work_item", item.id,
                 {"from": item.status, "to": transition.target, **ids_only})
    logger.info("work item %d %s by %s", item.id, transition.event, principal.client_id)


def may_decide(conn: Connection, item: Row, principal: Principal) -> bool:
    """Return whether the caller's roles may decide ``item`` if it is an approval step.

    Any other work item returns True. The caller's scope is checked separately.
    """
    from carebridge.store.schema import approvals

    team = conn.execute(
        select(approvals.c.team).where(approvals.c.work_item_id == item.id)
    ).scalar()
    if team is None or Role.ADMIN in principal.roles:
        return True
    return bool(STEP_DECIDERS.get(team, frozenset()) & principal.roles)


def _check_procurement_duties(conn: Connection, item: Row, principal: Principal) -> None:
    """Raise 403 when a procurement approval step would break separation of duties.

    The requester may not decide their own request, one person decides at
    most one step of a request, and a step is decided by a role of the team
    it names (or an admin), whichever route the decision comes by.
    """
    from carebridge.store.schema import approvals, procurement_requests

    step = conn.execute(
        select(approvals.c.request_id, approvals.c.step_name, approvals.c.team)
        .where(approvals.c.work_item_id == item.id)
    ).first()
    if step is None:
        return
    if not may_decide(conn, item, principal):
        deciders = STEP_DECIDERS.get(step.team, frozenset())
        roles = " or ".join(sorted(role.value for role in deciders)) or "admin"
        raise ApiError(403, "forbidden", f"step {step.step_name} belongs to team "
                       f"{step.team}; an approver with the role {roles} must decide it")
    owner = conn.execute(
        select(procurement_requests.c.requested_by)
        .where(procurement_requests.c.id == step.request_id)
    ).scalar()
    if owner == principal.actor:
        raise ApiError(403, "forbidden", "the requester may not approve their own request")
    earlier = conn.execute(
        select(approvals.c.id).where(approvals.c.request_id == step.request_id,
                                     approvals.c.decided_by == principal.actor)
    ).first()
    if earlier is not None:
        raise ApiError(403, "forbidden", "one person decides one step of a request; "
                       "another approver must decide this step")


def check_assignee(item: Row, principal: Principal) -> None:
    """Raise 409 when ``item`` is claimed by someone other than the caller."""
    if item.status == CLAIMED and item.assignee not in (None, principal.client_id):
        raise ApiError(409, "conflict", f"work item {item.id} is claimed by "
                       f"{item.assignee}; reassign it before resolving")


def store_correction(conn: Connection, item: Row, raw: bytes, actor: str) -> int:
    """Store corrected content for ``item``'s message and free its business key.

    The record the item is about (a service or a supply usage) keeps its row
    but its key gets a ``#superseded-by:{message id}`` suffix, so the
    corrected message's record is captured afresh instead of being taken
    for a changed resend. The item's own ``subject_key`` gets a
    ``#resolved:{id}`` suffix so that a correction that fails the same way
    opens a new work item. Returns the id of the stored message.

    Raises:
        ApiError: 404 when the item's message is gone, 409 when the record
            was posted already (a correction cannot post it twice).
    """
    raw_body = func.coalesce(message_bodies.c.raw, retained_bodies.c.raw).label("raw")
    original = conn.execute(
        select(messages, raw_body).select_from(with_bodies())
        .where(messages.c.id == item.message_id)
    ).first()
    if original is None:
        raise ApiError(404, "not-found", f"message {item.message_id} of work item "
                       f"{item.id} not found")
    new_id = store_copy(conn, original, raw,
                        origin=f"correction for work item {item.id} by {actor}")
    subject, _, _ = item.subject_key.partition("#")
    kind, _, key = subject.partition(":")
    if "#" not in item.subject_key and kind == "service":
        _supersede(conn, item, services, services.c.service_key, key, new_id,
                   charge_lines, charge_lines.c.service_key)
    elif "#" not in item.subject_key and kind == "supply":
        _supersede(conn, item, supply_usages, supply_usages.c.usage_key, key, new_id,
                   supply_issues, supply_issues.c.usage_key)
    conn.execute(
        update(work_items).where(work_items.c.id == item.id)
        .values(subject_key=bounded(f"{item.subject_key}#resolved:{item.id}", 320))
    )
    return new_id


def _supersede(conn: Connection, item: Row, table: Any, key_column: Any, key: str,
               new_id: int, posted: Any, posted_key: Any) -> None:
    if conn.execute(select(posted.c.id).where(posted_key == key)).first() is not None:
        raise ApiError(409, "conflict", f"the record of work item {item.id} was posted "
                       "already; a correction cannot post it again")
    conn.execute(
        update(table).where(key_column == key)
        .values({key_column.name: bounded(f"{key}#superseded-by:{new_id}", 300)})
    )


def correction_outcome(engine: Engine, message_id: int) -> dict[str, Any]:
    """Return the state of a corrected message and the work items it opened."""
    with engine.connect() as conn:
        row = conn.execute(
            select(messages.c.id, messages.c.state, messages.c.summary)
            .where(messages.c.id == message_id)
        ).one()
        item_ids = list(conn.execute(
            select(work_items.c.id).where(work_items.c.message_id == message_id)
            .order_by(work_items.c.id)
        ).scalars())
    summary = json.loads(row.summary) if row.summary else {}
    return {
        "message_id": row.id,
        "state": row.state,
        "outcomes": summary.get("outcomes", {}) if isinstance(summary, dict) else {},
        "work_item_ids": item_ids,
    }
