"""Look-ups of many keys at once: chunks of keys, and the matching condition."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from sqlalchemy import ARRAY, ColumnElement, Connection, any_, bindparam

Key = TypeVar("Key")

CHUNK = 500
"""Keys per statement."""


def chunks(values: Iterable[Key], size: int = CHUNK) -> Iterator[list[Key]]:
    """Yield the distinct ``values`` in sorted order, ``size`` at a time."""
    ordered = sorted(set(values))  # type: ignore[type-var]
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]


def among(conn: Connection, column: ColumnElement[Any], values: list[Any]) -> ColumnElement[bool]:
    """Return ``column IN values``, written as ``= ANY(array)`` on PostgreSQL.

    An IN list of 500 keys is a statement of 500 parameters, which the
    driver rewrites and the server parses again for every batch.
    """
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam(None, values, type_=ARRAY(column.type)))
    return column.in_(values)
