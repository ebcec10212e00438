"""Bulk inserts with PostgreSQL's ``COPY FROM STDIN``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.exc import DBAPIError


def copy_rows(
    conn: Connection, table: Table, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Insert ``rows`` into ``table`` with ``COPY`` in the open transaction (PostgreSQL).

    Each row has the values of ``columns`` in order, as the driver takes
    them (bind processing already applied). A failure raises what SQLAlchemy
    raises for any other statement (IntegrityError, DataError...), with the
    values hidden, so callers' handling of database errors applies.
    """
    quote = conn.dialect.identifier_preparer.quote
    names = ", ".join(quote(name) for name in columns)
    statement = f"COPY {conn.dialect.identifier_preparer.format_table(table)} ({names}) FROM STDIN"
    cursor = conn.connection.driver_connection.cursor()
    try:
        with cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(
            statement, None, exc, conn.dialect.loaded_dbapi.Error, hide_parameters=True,
            dialect=conn.dialect,
        ) from exc
    finally:
        cursor.close()
