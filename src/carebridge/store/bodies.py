"""Storage of the raw bytes of messages, apart from their rows, and reading them back.

A message's bytes live in ``message_bodies`` (partitioned by month on
PostgreSQL) while the row in ``messages`` keeps its metadata, so that
retention (:mod:`carebridge.engine.retention`) can drop the bytes of a
whole month and keep the rows. Bodies that must outlive their month are
moved to ``retained_bodies``; a message in neither table has been pruned.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, FromClause, and_, func, insert, select, text

from carebridge.store.schema import message_bodies, messages, retained_bodies

log = logging.getLogger(__name__)

PARTITION_PREFIX = "message_bodies_"

# Any constant works; every process creating partitions must use the same.
_PG_PARTITION_LOCK = 0x62646973


def month_start(moment: dt.datetime) -> dt.datetime:
    """Return the first instant (UTC) of the calendar month of ``moment``.

    A naive ``moment`` is taken as UTC, which is how SQLite returns stored times.
    """
    moment = moment.astimezone(dt.UTC) if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month(month: dt.datetime) -> dt.datetime:
    """Return the first instant of the month after ``month`` (a month start)."""
    return (month + dt.timedelta(days=32)).replace(day=1)


def partition_name(month: dt.datetime) -> str:
    """Return the name of the ``message_bodies`` partition of ``month``."""
    return f"{PARTITION_PREFIX}{month.year:04d}_{month.month:02d}"


def raw_column() -> ColumnElement[Any]:
    """Return a column of a message's raw bytes, ``None`` once pruned.

    Select it from :func:`with_bodies`.
    """
    return func.coalesce(message_bodies.c.raw, retained_bodies.c.raw).label("raw")


def with_bodies(base: FromClause = messages) -> FromClause:
    """Join ``messages`` (or a join starting at it) to the tables that hold bodies.

    The join names ``received_at`` as well as the id so that PostgreSQL
    looks in one partition only.
    """
    return base.outerjoin(
        message_bodies,
        and_(
            message_bodies.c.message_id == messages.c.id,
            message_bodies.c.received_at == messages.c.received_at,
        ),
    ).outerjoin(retained_bodies, retained_bodies.c.message_id == messages.c.id)


def read_raw(conn: Connection, message_id: int) -> bytes | None:
    """Return the stored bytes of a message, or ``None`` if pruned or unknown."""
    return conn.execute(
        select(raw_column()).select_from(with_bodies()).where(messages.c.id == message_id)
    ).scalar()


def ensure_partitions(conn: Connection, *moments: dt.datetime) -> list[str]:
    """Create the ``message_bodies`` partitions of the months of ``moments`` if missing.

    Does nothing on databases other than PostgreSQL. An advisory lock keeps
    two processes from creating the same partition at once. Returns the
    names of the partitions created.
    """
    if conn.dialect.name != "postgresql":
        return []
    created: list[str] = []
    for month in sorted({month_start(moment) for moment in moments}):
        name = partition_name(month)
        if conn.execute(text("SELECT to_regclass(:name)"), {"name": name}).scalar():
            continue
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_PARTITION_LOCK})
        if conn.execute(text("SELECT to_regclass(:name)"), {"name": name}).scalar():
            continue
        conn.execute(
            text(
                f"CREATE TABLE {name} PARTITION OF message_bodies FOR VALUES "
                f"FROM ('{month.isoformat()}') TO ('{next_month(month).isoformat()}')"
            )
        )
        created.append(name)
        log.info("partition created", extra={"action": "partition_create", "partition": name})
    return created


def insert_bodies(
    conn: Connection, ids: Sequence[int], received_at: dt.datetime, raws: Sequence[bytes]
) -> None:
    """Store the bytes of messages just inserted, in the caller's transaction.

    Args:
        conn: the connection whose transaction inserted the ``messages`` rows.
        ids: their ids, in the order of ``raws``.
        received_at: the ``received_at`` they were stored with.
        raws: their bytes.
    """
    if not ids:
        return
    ensure_partitions(conn, received_at)
    conn.execute(
        insert(message_bodies),
        [
            {"message_id": message_id, "received_at": received_at, "raw": raw}
            for message_id, raw in zip(ids, raws, strict=True)
        ],
    )


