"""Writing a staged batch: a few statements per table, in one transaction."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, insert

from carebridge.engine.staging import ENCOUNTER_FIELDS, PATIENT_FIELDS, BatchState
from carebridge.store.schema import (
    charge_lines,
    encounters,
    messages,
    patients,
    services,
    supply_issues,
    supply_usages,
    waits,
    work_items,
)

def _insert_returning_ids(conn: Connection, table, rows: list[dict[str, Any]]) -> list[int]:
    if not rows:
        return []
    result = conn.execute(insert(table).returning(table.c.id, sort_by_parameter_order=True), rows)
    return list(result.scalars())


def _upsert(conn: Connection, table, key_column, staged: dict[str, dict[str, Any]],
            known: set[str], fields: Sequence[str]) -> None:
    new_rows, updates = [], []
    for key, values in staged.items():
        source = values["_source"]
        columns = {name: values[name] for name in fields if name in values}
        if key in known:
            updates.append((key, source, columns))
        else:
            new_rows.append(
                {key_column.name: key, "source_message_id": source,
                 "updated_message_id": source, **{name: values.get(name) for name in fields}}
            )
    if new_rows:
        conn.execute(insert(table), new_rows)
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for key, source, columns in updates:
        names = tuple(sorted(columns))
        by_columns.setdefault(names, []).append(
            {"b_key": key, "b_source": source, **{f"b_{n}": columns[n] for n in names}}
        )
    for names, rows in by_columns.items():
        statement = (
            table.update()
            .where(key_column == bindparam("b_key"))
            .values(updated_message_id=bindparam("b_source"),
                    **{name: bindparam(f"b_{name}") for name in names})
        )
        conn.execute(statement, rows)


def _stored_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return ``rows`` without their staging keys (``_``), linked to their work item."""
    return [
        {key: value for key, value in row.items() if not key.startswith("_")}
        | {"work_item_id": row["_work_item"]["_id"] if row["_work_item"] else None}
        for row in rows
    ]


def _insert_children(conn: Connection, table, parents: list[dict[str, Any]],
                     parent_ids: list[int], staged_key: str, link_column: str) -> None:
    """Insert the child row each parent staged under ``staged_key``, linked by id."""
    children = [
        {**parent[staged_key], link_column: parent_id}
        for parent, parent_id in zip(parents, parent_ids, strict=True)
        if parent[staged_key]
    ]
    if children:
        conn.execute(insert(table), children)


def flush(state: BatchState, run_id: int | None) -> None:
    """Write everything the batch decided, a few statements per table."""
    conn, writes = state.conn, state.writes
    _upsert(conn, patients, patients.c.patient_id, writes.patients,
            state.known_patients, PATIENT_FIELDS)
    _upsert(conn, encounters, encounters.c.encounter_id, writes.encounters,
            set(state.encounter_classes), ENCOUNTER_FIELDS)

    item_ids = _insert_returning_ids(conn, work_items, writes.work_items)
    for row, item_id in zip(writes.work_items, item_ids, strict=True):
        row["_id"] = item_id

    service_ids = _insert_returning_ids(conn, services, _stored_columns(writes.services))
    _insert_children(conn, charge_lines, writes.services, service_ids, "_charge", "service_id")
    _insert_children(conn, waits, writes.services, service_ids, "_wait", "service_id")
    usage_ids = _insert_returning_ids(conn, supply_usages, _stored_columns(writes.usages))
    _insert_children(conn, supply_issues, writes.usages, usage_ids, "_issue", "usage_id")

    now = dt.datetime.now(dt.UTC)
    conn.execute(
        messages.update()
        .where(messages.c.id == bindparam("b_id"))
        .values(state=bindparam("state"), error=bindparam("error"),
                summary=bindparam("summary"), processed_at=now, processed_run_id=run_id),
        writes.messages,
    )
