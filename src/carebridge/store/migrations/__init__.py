"""Alembic migrations of the carebridge schema; how to add one: ``versions/README.md``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column
from sqlalchemy.types import TypeEngine


def compare_type(
    context: Any,
    inspected_column: Column[Any],
    metadata_column: Column[Any],
    inspected_type: TypeEngine[Any],
    metadata_type: TypeEngine[Any],
) -> bool | None:
    """Tell Alembic whether a NUMERIC column's precision or scale changed.

    Alembic ignores a type argument that only one side sets, so ``NUMERIC(20,
    4)`` in schema.py against an unscaled ``NUMERIC`` in the database would
    pass unnoticed, although it changes how amounts read back. Other types
    are left to Alembic's own comparison (``None``).
    """
    dialect = context.dialect
    database = inspected_type.compile(dialect=dialect).replace(" ", "").upper()
    models = metadata_type.compile(dialect=dialect).replace(" ", "").upper()
    if not any(name.startswith(("NUMERIC", "DECIMAL")) for name in (database, models)):
        return None
    return database != models
