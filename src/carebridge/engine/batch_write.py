"""Writing a staged batch: a few statements per table, in one transaction.

On PostgreSQL new rows go in with ``COPY`` and their ids are taken from the
table's sequence first, and the messages' new states are set with one
``UPDATE ... FROM unnest(...)``. A multi-row ``INSERT ... RETURNING`` of 500
rows is a statement with thousands of parameters that the driver rewrites
and the server parses on every batch, and an executemany runs the executor
once per row; ``COPY`` costs both sides the least per row. Other databases
(SQLite) use SQLAlchemy's executemany.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Column, Connection, Table, bindparam, insert, text

from carebridge.engine.staging import ENCOUNTER_FIELDS, PATIENT_FIELDS, BatchState
from carebridge.store.copy import copy_rows
from carebridge.store.schema import (
    charge_lines,
    diagnoses,
    encounters,
    messages,
    patients,
    services,
    supply_issues,
    supply_usages,
    waits,
    work_items,
)


def _column_values(conn: Connection, table: Table, rows: list[dict[str, Any]]
                   ) -> tuple[list[Column[Any]], list[tuple[Any, ...]]]:
    """Return the columns that ``COPY`` fills and each row's values for them.

    A column missing from every row is left out, so that the server fills
    its default, unless it has a scalar client-side default (which SQLAlchemy
    would send) that the server does not know.
    """
    supplied = set().union(*(row.keys() for row in rows))
    unknown = supplied - set(table.columns.keys())
    if unknown:
        raise ValueError(f"invalid rows for {table.name}: no columns named {sorted(unknown)}")
    columns: list[Column[Any]] = []
    constants: dict[str, Any] = {}
    for column in table.columns:
        if column.name in supplied:
            columns.append(column)
        elif column.default is not None:
            if not column.default.is_scalar:
                raise ValueError(
                    f"{table.name}.{column.name} has a computed default; pass its value"
                )
            columns.append(column)
            constants[column.name] = column.default.arg
    processors = [column.type._cached_bind_processor(conn.dialect)  # noqa: SLF001
                  for column in columns]
    values = []
    for row in rows:
        record = []
        for column, processor in zip(columns, processors, strict=True):
            value = row.get(column.name, constants.get(column.name))
            record.append(value if processor is None or value is None else processor(value))
        values.append(tuple(record))
    return columns, values


def _copy(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` with PostgreSQL's ``COPY FROM STDIN`` in the open transaction."""
    columns, values = _column_values(conn, table, rows)
    copy_rows(conn, table, [column.name for column in columns], values)


def reserve_ids(conn: Connection, table: Table, count: int) -> list[int]:
    """Take ``count`` ascending ids from the sequence of ``table.id`` (PostgreSQL)."""
    return sorted(conn.execute(
        text("SELECT nextval(pg_get_serial_sequence(:table, 'id')) "
             "FROM generate_series(1, :count)"),
        {"table": table.name, "count": count},
    ).scalars())


def insert_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (dicts of column values) into ``table``."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        _copy(conn, table, rows)
    else:
        conn.execute(insert(table), rows)


def insert_returning_ids(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> list[int]:
    """Insert ``rows`` into ``table`` and return their new ids, in row order."""
    if not rows:
        return []
    if conn.dialect.name == "postgresql":
        ids = reserve_ids(conn, table, len(rows))
        _copy(conn, table, [{**row, "id": row_id} for row, row_id in zip(rows, ids, strict=True)])
        return ids
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
    insert_rows(conn, table, new_rows)
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
    insert_rows(conn, table, children)


def _update_messages(conn: Connection, rows: list[dict[str, Any]], run_id: int | None) -> None:
    """Set each message's state, error, summary and ``diagnoses_stored``, and
    mark it processed now."""
    now = dt.datetime.now(dt.UTC)
    if conn.dialect.name == "postgresql":
        # One statement for the batch instead of one execution per message.
        conn.execute(
            text(
                "UPDATE messages SET state = batch.state, error = batch.error, "
                "summary = batch.summary, diagnoses_stored = batch.diagnoses_stored, "
                "processed_at = :now, processed_run_id = :run_id "
                "FROM unnest(CAST(:ids AS integer[]), CAST(:states AS varchar[]), "
                "CAST(:errors AS text[]), CAST(:summaries AS text[]), "
                "CAST(:stored AS integer[])) "
                "AS batch(id, state, error, summary, diagnoses_stored) "
                "WHERE messages.id = batch.id"
            ),
            {"now": now, "run_id": run_id,
             "ids": [row["b_id"] for row in rows],
             "states": [row["state"] for row in rows],
             "errors": [row["error"] for row in rows],
             "summaries": [row["summary"] for row in rows],
             "stored": [row["diagnoses_stored"] for row in rows]},
        )
        return
    conn.execute(
        messages.update()
        .where(messages.c.id == bindparam("b_id"))
        .values(state=bindparam("state"), error=bindparam("error"),
                summary=bindparam("summary"), diagnoses_stored=bindparam("diagnoses_stored"),
                processed_at=now, processed_run_id=run_id),
        rows,
    )


def flush(state: BatchState, run_id: int | None) -> None:
    """Write everything the batch decided, a few statements per table."""
    conn, writes = state.conn, state.writes
    _upsert(conn, patients, patients.c.patient_id, writes.patients,
            state.known_patients, PATIENT_FIELDS)
    _upsert(conn, encounters, encounters.c.encounter_id, writes.encounters,
            set(state.encounter_classes), ENCOUNTER_FIELDS)

    item_ids = insert_returning_ids(conn, work_items, writes.work_items)
    for row, item_id in zip(writes.work_items, item_ids, strict=True):
        row["_id"] = item_id

    service_ids = insert_returning_ids(conn, services, _stored_columns(writes.services))
    _insert_children(conn, charge_lines, writes.services, service_ids, "_charge", "service_id")
    _insert_children(conn, waits, writes.services, service_ids, "_wait", "service_id")
    usage_ids = insert_returning_ids(conn, supply_usages, _stored_columns(writes.usages))
    _insert_children(conn, supply_issues, writes.usages, usage_ids, "_issue", "usage_id")
    insert_rows(conn, diagnoses, writes.diagnoses)

    if writes.messages:
        _update_messages(conn, writes.messages, run_id)
