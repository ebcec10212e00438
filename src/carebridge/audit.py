"""The hash-chained audit log: who read patient data and who changed what.

Each row's ``hash`` is the SHA-256 of the previous row's hash and the row's
own fields, so changing, inserting or deleting a row breaks the chain at
that row. NOTE: removing the newest rows leaves a valid, shorter chain, so
:func:`verify` reports the last hash for the operator to keep elsewhere
(a ticket, a log shipped off the host) and compare later. :func:`record` appends inside the caller's transaction, so a
change and its audit row commit together. Appends are serialised (an
advisory lock on PostgreSQL, the write lock on SQLite) so the chain never
forks under concurrent requests.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, select, text

from carebridge.store.schema import audit_events

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
"""The ``prev_hash`` of the first row."""

_AUDIT_LOCK = 0x61756474  # "audt": PostgreSQL advisory lock key for appends


def _digest(prev_hash: str, row: dict[str, Any]) -> str:
    at = row["at"]
    if at.tzinfo is None:  # SQLite returns naive UTC datetimes
        at = at.replace(tzinfo=dt.UTC)
    payload = json.dumps(
        [
            prev_hash,
            row["id"],
            at.astimezone(dt.UTC).isoformat(timespec="microseconds"),
            row["actor"],
            row["action"],
            row["object_type"],
            row["object_id"],
            row["detail"],
        ],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


def record(
    conn: Connection,
    actor: str,
    action: str,
    object_type: str,
    object_id: str | int | None = None,
    detail: dict[str, Any] | None = None,
) -> int:
    """Append one audit row in the caller's transaction and return its id.

    ``detail`` must hold ids and outcomes only, never patient data: the
    audit log is read by auditors who may not see the record itself.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _AUDIT_LOCK})
    last = conn.execute(
        select(audit_events.c.id, audit_events.c.hash)
        .order_by(audit_events.c.id.desc())
        .limit(1)
    ).first()
    prev_hash = last.hash if last is not None else GENESIS
    row = {
        "id": (last.id + 1) if last is not None else 1,
        "at": dt.datetime.now(dt.UTC),
        "actor": actor,
        "action": action,
        "object_type": object_type,
        "object_id": None if object_id is None else str(object_id),
        "detail": None if detail is None else json.dumps(detail, sort_keys=True, default=str),
    }
    conn.execute(
        audit_events.insert().values(**row, prev_hash=prev_hash, hash=_digest(prev_hash, row))
    )
    return row["id"]


@dataclass(frozen=True, slots=True)
class ChainCheck:
    """Result of :func:`verify`: rows checked, the first broken row, the last hash."""

    rows: int
    broken_id: int | None = None
    problem: str | None = None
    last_hash: str = GENESIS

    @property
    def ok(self) -> bool:
        return self.broken_id is None


def verify(engine: Engine, *, batch: int = 5000) -> ChainCheck:
    """Recompute the chain from the first row and report the first row that breaks it.

    A row breaks the chain when ids skip (a row was deleted), when its
    ``prev_hash`` is not the previous row's hash (a row was inserted), or
    when its ``hash`` does not match its fields (the row was edited).
    """
    prev_hash = GENESIS
    expected_id = 1
    checked = 0
    with engine.connect() as conn:
        after = 0
        while True:
            rows = conn.execute(
                select(audit_events)
                .where(audit_events.c.id > after)
                .order_by(audit_events.c.id)
                .limit(batch)
            ).mappings().all()
            if not rows:
                break
            for row in rows:
                if row["id"] != expected_id:
                    return ChainCheck(checked, expected_id, f"row {expected_id} is missing")
                if row["prev_hash"] != prev_hash:
                    return ChainCheck(
                        checked, row["id"],
                        f"row {row['id']} does not follow row {row['id'] - 1}",
                    )
                if _digest(prev_hash, dict(row)) != row["hash"]:
                    return ChainCheck(
                        checked, row["id"], f"row {row['id']} was changed after it was written"
                    )
                prev_hash = row["hash"]
                expected_id += 1
                checked += 1
            after = rows[-1]["id"]
    logger.info("audit chain verified: %d rows", checked)
    return ChainCheck(checked, last_hash=prev_hash)
