"""Database engines: SQLite in WAL mode by default, any SQLAlchemy URL otherwise."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from carebridge.store.schema import metadata

log = logging.getLogger(__name__)

DEFAULT_DATABASE = Path("carebridge.db")


def sqlite_url(path: Path) -> str:
    """Return the SQLAlchemy URL of a SQLite file at ``path``."""
    return f"sqlite:///{path.resolve()}"


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the single writer; synchronous=FULL makes a
    # commit durable across power loss, which "durable before acknowledged"
    # depends on. busy_timeout waits for the writer lock instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def open_engine(url: str, *, create: bool = True) -> Engine:
    """Open the database at ``url`` and create missing tables when ``create``.

    Args:
        url: a SQLAlchemy URL, e.g. ``sqlite:///carebridge.db`` or
            ``postgresql+psycopg://user@host/db``.
        create: create any table of the schema that does not exist yet.
    """
    parsed = make_url(url)
    engine = create_engine(url, future=True)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _configure_sqlite)
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    if create:
        metadata.create_all(engine)
    log.info(
        "database opened",
        extra={"action": "db_open", "backend": parsed.get_backend_name()},
    )
    return engine
