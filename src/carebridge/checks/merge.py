"""Patient merges, applied only when a person approves a duplicate-patient work item.

Approving re-points the merged patient's encounters, services and charge
lines to the surviving patient, as an ADT A40 (merge patient) would, and
records the merge in ``patient_links``, the work item's history and the
audit log, all in one transaction. Rejecting closes the work item and
changes nothing else. No code path merges without one of these calls.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from carebridge import audit
from carebridge.errors import CarebridgeError
from carebridge.store.schema import (
    charge_lines,
    encounters,
    patient_links,
    patients,
    services,
    work_item_events,
    work_items,
)
from carebridge.workflows.reasons import Reason

log = logging.getLogger(__name__)

_ACTIONABLE = ("open", "claimed", "resolved")


class MergeError(CarebridgeError):
    """A merge or rejection that cannot be applied as asked; nothing was changed."""


@dataclass(frozen=True, slots=True)
class MergeResult:
    """The patients of an approved merge and the rows re-pointed per table."""

    work_item_id: int
    merged_patient_id: str
    surviving_patient_id: str
    repointed: dict[str, int]


def _load(conn: Connection, work_item_id: int) -> tuple[Any, dict[str, Any]]:
    item = conn.execute(select(work_items).where(work_items.c.id == work_item_id)).first()
    if item is None:
        raise MergeError(f"work item {work_item_id} not found")
    if item.reason != Reason.DUPLICATE_PATIENT.value:
        raise MergeError(f"work item {work_item_id} is a {item.reason} item, "
                         "not a duplicate_patient item")
    if item.status not in _ACTIONABLE:
        raise MergeError(f"work item {work_item_id} is {item.status}; only an open, "
                         "claimed or resolved item can be approved or rejected")
    return item, json.loads(item.detail)


def _close(conn: Connection, item: Any, status: str, actor: str, resolution: str,
           event_detail: dict[str, Any]) -> None:
    now = dt.datetime.now(dt.UTC)
    done = conn.execute(
        update(work_items)
        .where(work_items.c.id == item.id, work_items.c.status == item.status)
        .values(status=status, resolved_at=now, resolved_by=actor, resolution=resolution)
    ).rowcount
    if done != 1:
        raise MergeError(f"work item {item.id} changed while it was being closed; "
                         "read it again and retry")
    conn.execute(insert(work_item_events).values(
        work_item_id=item.id, at=now, actor=actor, action=status,
        detail=json.dumps(event_detail, sort_keys=True),
    ))


def approve_merge(
    engine: Engine, work_item_id: int, actor: str, surviving_patient_id: str | None = None
) -> MergeResult:
    """Apply the merge a duplicate-patient work item proposes, as ``actor`` approves it.

    ``surviving_patient_id`` is one of the pair; by default the patient
    registered first (the lower source message id) survives.

    Raises:
        MergeError: the item is missing, not a duplicate-patient item, final
            already, names another patient, or a patient of the pair was
            merged already.
    """
    if not actor.strip():
        raise MergeError("an approval needs the actor who approves it")
    with engine.begin() as conn:
        item, _ = _load(conn, work_item_id)
        result = merge_patients(conn, item, actor, surviving_patient_id)
        ids = {"merged_patient_id": result.merged_patient_id,
               "surviving_patient_id": result.surviving_patient_id,
               "repointed": result.repointed}
        _close(conn, item, "approved", actor,
               f"merged {result.merged_patient_id} into {result.surviving_patient_id}", ids)
    log.info("patient merge approved", extra={"action": "patient_merge",
                                              "work_item_id": work_item_id})
    return result


def merge_patients(
    conn: Connection, item: Any, actor: str, surviving_patient_id: str | None = None
) -> MergeResult:
    """Re-point the records of the pair a duplicate-patient item names, in ``conn``.

    The caller closes the work item in the same transaction; the merge and
    its audit row commit with that approval or not at all.

    Raises:
        MergeError: the item names another patient, or a patient of the pair
            was merged already.
    """
    work_item_id = item.id
    detail = json.loads(item.detail)
    pair = (detail["left_patient_id"], detail["right_patient_id"])
    merged_already = conn.execute(
        select(patient_links.c.merged_patient_id)
        .where(patient_links.c.merged_patient_id.in_(pair))
    ).scalars().all()
    if merged_already:
        raise MergeError(f"patient {merged_already[0]} was merged already; "
                         f"reject work item {work_item_id} instead")
    survivor = surviving_patient_id or _registered_first(conn, pair)
    if survivor not in pair:
        raise MergeError(f"patient {survivor} is not one of the pair of work item "
                         f"{work_item_id} ({pair[0]}, {pair[1]})")
    merged = pair[1] if survivor == pair[0] else pair[0]
    repointed = {}
    for table in (encounters, services, charge_lines):
        repointed[table.name] = conn.execute(
            update(table).where(table.c.patient_id == merged)
            .values(patient_id=survivor)
        ).rowcount
    # Patients merged into ``merged`` earlier now point at the survivor.
    repointed["patient_links"] = conn.execute(
        update(patient_links).where(patient_links.c.surviving_patient_id == merged)
        .values(surviving_patient_id=survivor)
    ).rowcount
    conn.execute(insert(patient_links).values(
        merged_patient_id=merged, surviving_patient_id=survivor,
        work_item_id=work_item_id, linked_at=dt.datetime.now(dt.UTC),
        linked_by=actor, repointed=json.dumps(repointed, sort_keys=True),
    ))
    audit.record(conn, actor, "patient.merge", "patient", merged,
                 {"work_item_id": work_item_id, "merged_patient_id": merged,
                  "surviving_patient_id": survivor, "repointed": repointed})
    return MergeResult(work_item_id, merged, survivor, repointed)


def reject_duplicate(engine: Engine, work_item_id: int, actor: str, note: str = "") -> None:
    """Close a duplicate-patient work item as not the same person; merges nothing."""
    if not actor.strip():
        raise MergeError("a rejection needs the actor who rejects it")
    with engine.begin() as conn:
        item, _ = _load(conn, work_item_id)
        _close(conn, item, "rejected", actor, note or "not the same patient",
               {"note": note} if note else {})
        audit.record(conn, actor, "work_item.reject", "work_item", work_item_id,
                     {"reason": Reason.DUPLICATE_PATIENT.value})
    log.info("duplicate patient rejected", extra={"action": "patient_merge_rejected",
                                                  "work_item_id": work_item_id})


def _registered_first(conn: Connection, pair: tuple[str, str]) -> str:
    rows = conn.execute(
        select(patients.c.patient_id, patients.c.source_message_id)
        .where(patients.c.patient_id.in_(pair))
    ).all()
    if len(rows) != 2:
        raise MergeError(f"patients {pair[0]} and {pair[1]} are not both in the database")
    return min(rows, key=lambda row: (row.source_message_id, row.patient_id)).patient_id
