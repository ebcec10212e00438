"""Alembic environment: runs the revisions in ``versions/`` against a database.

carebridge builds the Alembic configuration in code
(:func:`carebridge.store.db.alembic_config`) and passes an open connection,
so no ``alembic.ini`` is needed. How to add a revision: ``versions/README.md``.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection

from carebridge.store.db import open_engine
from carebridge.store.migrations import compare_type
from carebridge.store.schema import DecimalText, metadata


def render_item(kind: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    """Write ``DecimalText`` columns into new revisions as plain SQLAlchemy types.

    A revision must keep describing the schema it created even after
    ``schema.py`` changes, so it should not import carebridge's types.
    """
    if kind == "type" and isinstance(obj, DecimalText):
        return 'sa.Numeric().with_variant(sa.String(length=40), "sqlite")'
    return False


def run(connection: Connection) -> None:
    """Run the pending revisions on ``connection`` in its transaction."""
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_item=render_item,
        # SQLite cannot ALTER most things; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=compare_type,
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    """Use the caller's connection, or open the configured URL."""
    if context.is_offline_mode():
        raise SystemExit("carebridge migrations run online only: pass a database URL")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database: build the configuration with alembic_config(url=...)")
    engine = open_engine(url, create=False)
    try:
        with engine.begin() as conn:
            run(conn)
    finally:
        engine.dispose()


main()
