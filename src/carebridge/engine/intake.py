"""Store raw inputs durably before anything else happens to them.

Each raw message gets a row in ``messages`` with its source, arrival time,
content hash and dedup key, committed in batches. The first message to claim
a dedup key owns it; a later one with the same content is a duplicate, and a
later one with different content under the same key (an HL7 control id
reused) is failed with a work item, never silently dropped or overwritten.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from sqlalchemy import Column, Connection, Engine, Table, insert, select

from carebridge.engine.lanes import lane_of
from carebridge.ingest.files.sources import RawInput
from carebridge.store.bodies import ensure_partitions
from carebridge.store.copy import copy_rows
from carebridge.store.lookups import among
from carebridge.store.schema import message_bodies, message_keys, messages, work_items
from carebridge.workflows.reasons import Reason, Rejection

log = logging.getLogger(__name__)

RECEIVED = "received"
PROCESSED = "processed"
FAILED = "failed"
DUPLICATE = "duplicate"


@dataclass(slots=True)
class IntakeResult:
    """Counts of one intake, by what happened to each raw message."""

    read: int = 0
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    by_format: dict[str, int] = field(default_factory=dict)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)

    def add(self, other: IntakeResult) -> None:
        """Add the counts of ``other`` to these."""
        self.read += other.read
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.failed += other.failed
        self.skipped_files.extend(other.skipped_files)
        for fmt, count in other.by_format.items():
            self.by_format[fmt] = self.by_format.get(fmt, 0) + count


def _batches(items: Iterable[RawInput], size: int) -> Iterator[list[RawInput]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def open_work_item(
    conn: Connection, *, subject_key: str, rejection: Rejection, message_id: int
) -> int:
    """Insert a work item, or return the open one for the same subject and reason."""
    existing = conn.execute(
        select(work_items.c.id).where(
            work_items.c.subject_key == subject_key,
            work_items.c.reason == rejection.reason.value,
        )
    ).scalar()
    if existing is not None:
        return existing
    return conn.execute(
        insert(work_items).values(
            subject_key=subject_key,
            reason=rejection.reason.value,
            team=rejection.team.value,
            message_id=message_id,
            detail=rejection.detail,
            status="open",
            created_at=dt.datetime.now(dt.UTC),
        )
    ).inserted_primary_key[0]


@dataclass(frozen=True, slots=True)
class Receipt:
    """What intake did with one raw input, known when its transaction commits.

    Attributes:
        message_id: The id of the input's row in ``messages``.
        state: ``received``, ``failed`` or ``duplicate``.
        duplicate_of: For a duplicate, the id of the first copy.
        reason: The reason the input was failed with (``Reason`` value). For
            a duplicate, the reason its first copy was failed with, so that a
            resend gets the acknowledgement the first copy got. ``None`` otherwise.
        received_at: The arrival time of the input, or of its first copy.
    """

    message_id: int
    state: str
    duplicate_of: int | None
    reason: str | None
    received_at: dt.datetime


@dataclass(slots=True)
class _Decision:
    """The state one raw input is stored in, decided before the insert.

    ``first`` is the position in the batch of the first copy of a duplicate
    whose first copy is in the same batch; ``first_reason`` and
    ``first_at`` describe a first copy stored earlier.
    """

    state: str
    duplicate_of: int | None = None
    rejection: Rejection | None = None
    owns_key: bool = False
    first: int | None = None
    first_reason: str | None = None
    first_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class _Earlier:
    """A message stored before this batch: its id, digest, arrival and reason."""

    message_id: int
    digest: str
    received_at: dt.datetime
    reason: str | None


def _chunks(values: list[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _summary_reason(summary: str | None) -> str | None:
    if not summary:
        return None
    try:
        reason = json.loads(summary).get("reason")
    except (ValueError, AttributeError):
        return None
    return reason if isinstance(reason, str) else None


def _key_owners(conn: Connection, keys: list[str]) -> dict[str, _Earlier]:
    owners: dict[str, _Earlier] = {}
    for chunk in _chunks(keys):
        rows = conn.execute(
            select(
                message_keys.c.dedup_key,
                message_keys.c.message_id,
                message_keys.c.content_sha256,
                messages.c.received_at,
                messages.c.summary,
            )
            .join(messages, messages.c.id == message_keys.c.message_id)
            .where(among(conn, message_keys.c.dedup_key, chunk))
        )
        for row in rows:
            owners[row.dedup_key] = _Earlier(
                row.message_id, row.content_sha256, row.received_at, _summary_reason(row.summary)
            )
    return owners


def _identical_earlier(conn: Connection, item: RawInput) -> _Earlier | None:
    row = conn.execute(
        select(messages.c.id, messages.c.received_at, messages.c.summary)
        .where(
            messages.c.dedup_key == item.dedup_key,
            messages.c.content_sha256 == item.content_sha256,
        )
        .order_by(messages.c.id)
        .limit(1)
    ).first()
    if row is None:
        return None
    return _Earlier(row.id, item.content_sha256, row.received_at, _summary_reason(row.summary))


def _reused(detail: str) -> Rejection:
    return Rejection(Reason.CONTROL_ID_REUSED, detail)


def _decide_all(conn: Connection, batch: list[RawInput]) -> list[_Decision]:
    """Decide the state of each input of ``batch`` from earlier messages and inputs."""
    owners = _key_owners(conn, sorted({item.dedup_key for item in batch}))
    first_by_key: dict[str, int] = {}
    identical: dict[tuple[str, str], int] = {}
    decisions: list[_Decision] = []
    for position, item in enumerate(batch):
        key = item.dedup_key
        earlier = identical.get((key, item.content_sha256))
        pending_owner = first_by_key.get(key)
        if pending_owner is not None:
            if earlier is not None:
                decision = _Decision(DUPLICATE, first=earlier)
            elif batch[pending_owner].dedup_digest == item.dedup_digest:
                decision = _Decision(DUPLICATE, first=pending_owner)
            else:
                decision = _Decision(FAILED, rejection=_reused(
                    f"dedup key {key} already belongs to an earlier "
                    "message with different content; review both messages"))
        else:
            owner = owners.get(key)
            if owner is None:
                rejection = (
                    Rejection(Reason.MALFORMED_INPUT, item.problem) if item.problem else None
                )
                decision = _Decision(FAILED if rejection else RECEIVED, rejection=rejection,
                                     owns_key=True)
                first_by_key[key] = position
            elif owner.digest == item.dedup_digest:
                decision = _Decision(DUPLICATE, duplicate_of=owner.message_id,
                                     first_reason=owner.reason, first_at=owner.received_at)
            elif earlier is not None:
                decision = _Decision(DUPLICATE, first=earlier)
            elif (resent := _identical_earlier(conn, item)) is not None:
                # A resend of a message that was itself failed for reusing the
                # key: it already has its work item, so it is only a duplicate.
                decision = _Decision(DUPLICATE, duplicate_of=resent.message_id,
                                     first_reason=resent.reason, first_at=resent.received_at)
            else:
                decision = _Decision(FAILED, rejection=_reused(
                    f"dedup key {key} already belongs to message {owner.message_id} "
                    "with different content; review both messages"))
        identical.setdefault((key, item.content_sha256), position)
        decisions.append(decision)
    return decisions


_MESSAGE_COLUMNS = (
    "id", "source", "origin", "format", "received_at", "content_sha256", "dedup_key",
    "occurrence", "ordering_key", "lane", "state", "duplicate_of", "error", "summary",
    "processed_at", "run_id", "processed_run_id",
)
_BODY_COLUMNS = ("message_id", "received_at", "raw")
_KEY_COLUMNS = ("dedup_key", "message_id", "content_sha256")


@dataclass(frozen=True, slots=True)
class _Statement:
    """An INSERT compiled once per dialect, run through the driver's executemany
    (``COPY`` on PostgreSQL)."""

    sql: str
    names: tuple[str, ...] | None

    table: Table

    def run(self, conn: Connection, rows: list[tuple[Any, ...]], columns: tuple[str, ...]) -> None:
        """Insert ``rows``, each a tuple of values in the order of ``columns``.

        PostgreSQL gets them with ``COPY``, which costs the client and the
        server less than a pipelined executemany of the same rows.
        """
        if conn.dialect.name == "postgresql":
            copy_rows(conn, self.table, columns, rows)
        elif self.names is None:
            conn.exec_driver_sql(self.sql, [dict(zip(columns, row)) for row in rows])
        else:
            conn.exec_driver_sql(self.sql, rows)


_STATEMENTS: dict[tuple[type, str, str], _Statement] = {}


def _statement(conn: Connection, table: Table, columns: tuple[str, ...]) -> _Statement:
    """Return the plain INSERT of ``columns`` into ``table`` for this connection's dialect.

    SQLAlchemy's executemany builds and processes parameters row by row, and
    with RETURNING on SQLite runs one statement per row; the driver's own
    executemany of a precompiled statement does neither.
    """
    dialect = conn.dialect
    cache_key = (type(dialect), dialect.paramstyle, table.name)
    statement = _STATEMENTS.get(cache_key)
    if statement is None:
        compiled = insert(table).compile(dialect=dialect, column_keys=list(columns))
        names = tuple(compiled.positiontup) if compiled.positional else None
        if names is not None and names != columns:
            raise RuntimeError(f"unexpected parameter order for {table.name}: {names}")
        statement = _Statement(str(compiled), names, table)
        _STATEMENTS[cache_key] = statement
    return statement


def _new_ids(conn: Connection, count: int) -> list[int]:
    """Reserve ``count`` ascending ids for new ``messages`` rows.

    Knowing the ids before the insert lets every row, its body and its key
    go in with one executemany each, with no RETURNING and no update for
    duplicates of an earlier input of the batch.
    """
    name = conn.dialect.name
    if name == "sqlite":
        # Intake runs in a BEGIN IMMEDIATE transaction, so no other writer can
        # take these ids; without AUTOINCREMENT SQLite would pick the same ones.
        last = conn.exec_driver_sql("SELECT coalesce(max(id), 0) FROM messages").scalar()
        return list(range(last + 1, last + 1 + count))
    if name == "postgresql":
        return sorted(conn.exec_driver_sql(
            "SELECT nextval(pg_get_serial_sequence('messages', 'id')) "
            f"FROM generate_series(1, {int(count)})"
        ).scalars())
    raise NotImplementedError(f"intake does not support the {name} dialect")


def _bound(conn: Connection, column: Column[Any], value: Any) -> Any:
    """Return ``value`` as the driver receives it for ``column`` (e.g. SQLite's datetime text)."""
    processor = column.type._cached_bind_processor(conn.dialect)  # noqa: SLF001
    return processor(value) if processor is not None else value


def store_batch(
    conn: Connection, inputs: list[RawInput], *, source: str, run_id: int | None = None
) -> list[Receipt]:
    """Store ``inputs`` in the transaction of ``conn`` and return their receipts.

    Each input becomes a ``messages`` row with its body; the first claim of a
    dedup key is recorded in ``message_keys``; a failed input gets its work
    item. Nothing is committed here.

    Args:
        conn: A connection inside a transaction (on SQLite, ``BEGIN IMMEDIATE``
            as :func:`carebridge.store.db.open_engine` sets up).
        inputs: The raw inputs, in arrival order; ids ascend in this order.
        source: The ``source`` of every row.
        run_id: The run that read them, if any.

    Returns:
        One receipt per input, in the order of ``inputs``.
    """
    if not inputs:
        return []
    decisions = _decide_all(conn, inputs)
    ids = _new_ids(conn, len(inputs))
    now = dt.datetime.now(dt.UTC)
    stored_now = _bound(conn, messages.c.received_at, now)
    message_rows: list[tuple[Any, ...]] = []
    key_rows: list[tuple[Any, ...]] = []
    receipts: list[Receipt] = []
    for item, decision, message_id in zip(inputs, decisions, ids, strict=True):
        state = decision.state
        rejection = decision.rejection
        if decision.first is not None:
            first = decisions[decision.first]
            decision.duplicate_of = ids[decision.first]
            decision.first_reason = first.rejection.reason.value if first.rejection else None
            decision.first_at = now
        if state == RECEIVED:
            error = summary = processed_at = processed_run = None
            receipt = Receipt(message_id, state, None, None, now)
        else:
            processed_at, processed_run = stored_now, run_id
            if rejection is not None:
                error = rejection.detail
                summary = json.dumps({"reason": rejection.reason.value})
                receipt = Receipt(message_id, state, None, rejection.reason.value, now)
            else:
                error = summary = None
                receipt = Receipt(message_id, state, decision.duplicate_of,
                                  decision.first_reason, decision.first_at or now)
        message_rows.append((
            message_id, source, item.origin, item.format, stored_now, item.content_sha256,
            item.dedup_key, item.occurrence, item.ordering_key, lane_of(item.ordering_key),
            state, decision.duplicate_of, error, summary, processed_at, run_id, processed_run,
        ))
        if decision.owns_key:
            key_rows.append((item.dedup_key, message_id, item.dedup_digest))
        receipts.append(receipt)
    _statement(conn, messages, _MESSAGE_COLUMNS).run(conn, message_rows, _MESSAGE_COLUMNS)
    ensure_partitions(conn, now)
    _statement(conn, message_bodies, _BODY_COLUMNS).run(
        conn, [(message_id, stored_now, item.raw) for message_id, item in zip(ids, inputs)],
        _BODY_COLUMNS,
    )
    if key_rows:
        _statement(conn, message_keys, _KEY_COLUMNS).run(conn, key_rows, _KEY_COLUMNS)
    for message_id, decision in zip(ids, decisions, strict=True):
        if decision.state == FAILED:
            assert decision.rejection is not None
            _record_failure(conn, message_id, decision.rejection)
    return receipts


def _record_failure(conn: Connection, message_id: int, rejection: Rejection) -> None:
    open_work_item(
        conn,
        subject_key=f"message:{message_id}",
        rejection=rejection,
        message_id=message_id,
    )
    log.warning(
        "message failed at intake",
        extra={"action": "intake_failed", "message_id": message_id,
               "reason": rejection.reason.value},
    )


def _count(result: IntakeResult, batch: list[RawInput], receipts: list[Receipt]) -> None:
    by_format = result.by_format
    for item, receipt in zip(batch, receipts, strict=True):
        by_format[item.format] = by_format.get(item.format, 0) + 1
        if receipt.state == DUPLICATE:
            result.duplicates += 1
        elif receipt.state == FAILED:
            result.failed += 1
        else:
            result.stored += 1
    result.read += len(batch)


def store_inputs(
    engine: Engine,
    inputs: Iterable[RawInput],
    *,
    source: str,
    run_id: int | None = None,
    batch_size: int = 500,
    receipts: list[Receipt] | None = None,
) -> IntakeResult:
    """Store ``inputs`` verbatim, ``batch_size`` per transaction.

    A batch is committed before the next is read, so a crash loses at most
    the batch in hand, none of which was acknowledged.

    Args:
        engine: The carebridge database.
        inputs: The raw inputs, in arrival order.
        source: The ``source`` of every stored row.
        run_id: The run that read them, if any.
        batch_size: Inputs per transaction.
        receipts: When given, the receipt of each input is appended to it,
            in input order, once its batch is committed.
    """
    result = IntakeResult()
    for batch in _batches(inputs, batch_size):
        with engine.begin() as conn:
            batch_receipts = store_batch(conn, batch, source=source, run_id=run_id)
        _count(result, batch, batch_receipts)
        if receipts is not None:
            receipts.extend(batch_receipts)
    log.info(
        "intake finished",
        extra={"action": "intake_done", "source": source, "read": result.read,
               "duplicates": result.duplicates, "failed": result.failed},
    )
    return result
