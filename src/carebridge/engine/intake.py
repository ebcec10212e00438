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

from sqlalchemy import Connection, Engine, bindparam, insert, select

from carebridge.engine.lanes import lane_of
from carebridge.ingest.files.sources import RawInput
from carebridge.store.bodies import insert_bodies
from carebridge.store.schema import message_keys, messages, work_items
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


@dataclass(slots=True)
class _Decision:
    """The state one raw input is stored in, decided before the insert."""

    state: str
    duplicate_of: int | None = None
    rejection: Rejection | None = None
    owns_key: bool = False


def _chunks(values: list[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _key_owners(conn: Connection, keys: list[str]) -> dict[str, tuple[int, str]]:
    owners: dict[str, tuple[int, str]] = {}
    for chunk in _chunks(keys):
        rows = conn.execute(
            select(
                message_keys.c.dedup_key,
                message_keys.c.message_id,
                message_keys.c.content_sha256,
            ).where(message_keys.c.dedup_key.in_(chunk))
        )
        for row in rows:
            owners[row.dedup_key] = (row.message_id, row.content_sha256)
    return owners


def _identical_earlier(conn: Connection, item: RawInput) -> int | None:
    return conn.execute(
        select(messages.c.id)
        .where(
            messages.c.dedup_key == item.dedup_key,
            messages.c.content_sha256 == item.content_sha256,
        )
        .order_by(messages.c.id)
        .limit(1)
    ).scalar()


def _decide(
    conn: Connection,
    item: RawInput,
    owners: dict[str, tuple[int, str] | None],
    in_batch: dict[tuple[str, str], int],
) -> _Decision:
    """Decide the state of ``item`` from the key's owner and earlier inputs.

    ``owners`` maps a dedup key to its owning message (id and digest), or to
    ``None`` when an earlier input of this batch claimed it and has no id yet.
    ``in_batch`` maps (dedup key, raw digest) to the position of the first
    input of this batch with exactly those bytes.
    """
    owner = owners.get(item.dedup_key, ...)
    if owner is ...:
        if item.problem:
            return _Decision(FAILED, rejection=Rejection(Reason.MALFORMED_INPUT, item.problem),
                             owns_key=True)
        return _Decision(RECEIVED, owns_key=True)
    if owner is not None and owner[1] == item.dedup_digest:
        return _Decision(DUPLICATE, duplicate_of=owner[0])
    if owner is None:
        # The owner is earlier in this batch; its id is filled in after insert.
        return _Decision(DUPLICATE)
    earlier = _identical_earlier(conn, item)
    if earlier is not None:
        # A resend of a message that was itself failed for reusing the key:
        # it already has its work item, so it is only a duplicate.
        return _Decision(DUPLICATE, duplicate_of=earlier)
    return _Decision(
        FAILED,
        rejection=Rejection(
            Reason.CONTROL_ID_REUSED,
            f"dedup key {item.dedup_key} already belongs to message {owner[0]} "
            "with different content; review both messages",
        ),
    )


def _store_batch(
    conn: Connection,
    batch: list[RawInput],
    source: str,
    run_id: int | None,
    result: IntakeResult,
) -> list[int]:
    """Store one batch with a few statements; return the new message ids."""
    owners: dict[str, tuple[int, str] | None] = dict(
        _key_owners(conn, sorted({item.dedup_key for item in batch}))
    )
    first_by_key: dict[str, int] = {}
    identical: dict[tuple[str, str], int] = {}
    decisions: list[_Decision] = []
    for position, item in enumerate(batch):
        earlier = identical.get((item.dedup_key, item.content_sha256))
        pending_owner = first_by_key.get(item.dedup_key)
        if pending_owner is not None and (
            earlier is not None or batch[pending_owner].dedup_digest == item.dedup_digest
        ):
            decision = _Decision(DUPLICATE)
        elif pending_owner is not None:
            decision = _Decision(
                FAILED,
                rejection=Rejection(
                    Reason.CONTROL_ID_REUSED,
                    f"dedup key {item.dedup_key} already belongs to an earlier "
                    "message with different content; review both messages",
                ),
            )
        else:
            decision = _decide(conn, item, owners, identical)
            if decision.owns_key:
                first_by_key[item.dedup_key] = position
        identical.setdefault((item.dedup_key, item.content_sha256), position)
        decisions.append(decision)

    now = dt.datetime.now(dt.UTC)
    rows = [
        {
            "source": source,
            "origin": item.origin,
            "format": item.format,
            "received_at": now,
            "content_sha256": item.content_sha256,
            "dedup_key": item.dedup_key,
            "occurrence": item.occurrence,
            "ordering_key": item.ordering_key,
            "lane": lane_of(item.ordering_key),
            "state": decision.state,
            "duplicate_of": decision.duplicate_of,
            "run_id": run_id,
            "error": decision.rejection.detail if decision.rejection else None,
            "summary": (
                json.dumps({"reason": decision.rejection.reason.value})
                if decision.rejection
                else None
            ),
            "processed_at": now if decision.state != RECEIVED else None,
            "processed_run_id": run_id if decision.state != RECEIVED else None,
        }
        for item, decision in zip(batch, decisions, strict=True)
    ]
    ids = list(
        conn.execute(
            insert(messages).returning(messages.c.id, sort_by_parameter_order=True), rows
        ).scalars()
    )
    insert_bodies(conn, ids, now, [item.raw for item in batch])
    _link_in_batch_duplicates(conn, batch, decisions, ids, first_by_key, identical)
    new_keys = [
        {"dedup_key": item.dedup_key, "message_id": ids[position],
         "content_sha256": item.dedup_digest}
        for position, (item, decision) in enumerate(zip(batch, decisions, strict=True))
        if decision.owns_key
    ]
    if new_keys:
        conn.execute(insert(message_keys), new_keys)
    for item, decision, message_id in zip(batch, decisions, ids, strict=True):
        result.read += 1
        result.by_format[item.format] = result.by_format.get(item.format, 0) + 1
        if decision.state == DUPLICATE:
            result.duplicates += 1
        elif decision.state == FAILED:
            assert decision.rejection is not None
            _record_failure(conn, message_id, decision.rejection, result)
        else:
            result.stored += 1
    return ids


def _link_in_batch_duplicates(
    conn: Connection,
    batch: list[RawInput],
    decisions: list[_Decision],
    ids: list[int],
    first_by_key: dict[str, int],
    identical: dict[tuple[str, str], int],
) -> None:
    links = []
    for position, (item, decision) in enumerate(zip(batch, decisions, strict=True)):
        if decision.state == DUPLICATE and decision.duplicate_of is None:
            first = identical.get((item.dedup_key, item.content_sha256))
            if first is None or first == position:
                first = first_by_key[item.dedup_key]
            decision.duplicate_of = ids[first]
            links.append({"message_id": ids[position], "first": ids[first]})
    if links:
        conn.execute(
            messages.update()
            .where(messages.c.id == bindparam("message_id"))
            .values(duplicate_of=bindparam("first")),
            links,
        )


def _record_failure(
    conn: Connection, message_id: int, rejection: Rejection, result: IntakeResult
) -> None:
    open_work_item(
        conn,
        subject_key=f"message:{message_id}",
        rejection=rejection,
        message_id=message_id,
    )
    result.failed += 1
    log.warning(
        "message failed at intake",
        extra={"action": "intake_failed", "message_id": message_id,
               "reason": rejection.reason.value},
    )


def store_inputs(
    engine: Engine,
    inputs: Iterable[RawInput],
    *,
    source: str,
    run_id: int | None = None,
    batch_size: int = 500,
) -> IntakeResult:
    """Store ``inputs`` verbatim, ``batch_size`` per transaction.

    A batch is committed before the next is read, so a crash loses at most
    the batch in hand, none of which was acknowledged.
    """
    result = IntakeResult()
    for batch in _batches(inputs, batch_size):
        with engine.begin() as conn:
            _store_batch(conn, batch, source, run_id, result)
    log.info(
        "intake finished",
        extra={"action": "intake_done", "source": source, "read": result.read,
               "duplicates": result.duplicates, "failed": result.failed},
    )
    return result
