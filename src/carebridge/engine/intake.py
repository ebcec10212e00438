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

from sqlalchemy import Connection, Engine, insert, select

from carebridge.ingest.files.sources import RawInput
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

    def add(self, other: IntakeResult) -> None:
        """Add the counts of ``other`` to these."""
        self.read += other.read
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.failed += other.failed
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


def _store_one(
    conn: Connection, item: RawInput, source: str, run_id: int | None, result: IntakeResult
) -> None:
    now = dt.datetime.now(dt.UTC)
    message_id = conn.execute(
        insert(messages).values(
            source=source,
            origin=item.origin,
            format=item.format,
            received_at=now,
            content_sha256=item.content_sha256,
            dedup_key=item.dedup_key,
            occurrence=item.occurrence,
            raw=item.raw,
            state=RECEIVED,
            run_id=run_id,
        )
    ).inserted_primary_key[0]
    result.read += 1
    result.by_format[item.format] = result.by_format.get(item.format, 0) + 1

    owner = conn.execute(
        select(message_keys.c.message_id, message_keys.c.content_sha256).where(
            message_keys.c.dedup_key == item.dedup_key
        )
    ).first()
    if owner is None:
        conn.execute(
            insert(message_keys).values(
                dedup_key=item.dedup_key,
                message_id=message_id,
                content_sha256=item.dedup_digest,
            )
        )
    elif owner.content_sha256 == item.dedup_digest:
        _set_state(conn, message_id, DUPLICATE, duplicate_of=owner.message_id)
        result.duplicates += 1
        return
    elif (earlier := _identical_earlier(conn, item, message_id)) is not None:
        # A resend of a message that was itself failed for reusing the key:
        # it already has its work item, so it is only a duplicate.
        _set_state(conn, message_id, DUPLICATE, duplicate_of=earlier)
        result.duplicates += 1
        return
    else:
        rejection = Rejection(
            Reason.CONTROL_ID_REUSED,
            f"dedup key {item.dedup_key} already belongs to message "
            f"{owner.message_id} with different content; review both messages",
        )
        _fail(conn, message_id, rejection, result)
        return

    if item.problem:
        _fail(conn, message_id, Rejection(Reason.MALFORMED_INPUT, item.problem), result)
        return
    result.stored += 1


def _identical_earlier(conn: Connection, item: RawInput, message_id: int) -> int | None:
    return conn.execute(
        select(messages.c.id)
        .where(
            messages.c.dedup_key == item.dedup_key,
            messages.c.content_sha256 == item.content_sha256,
            messages.c.id < message_id,
        )
        .order_by(messages.c.id)
        .limit(1)
    ).scalar()


def _set_state(conn: Connection, message_id: int, state: str, **values: object) -> None:
    conn.execute(
        messages.update().where(messages.c.id == message_id).values(state=state, **values)
    )


def _fail(
    conn: Connection, message_id: int, rejection: Rejection, result: IntakeResult
) -> None:
    open_work_item(
        conn,
        subject_key=f"message:{message_id}",
        rejection=rejection,
        message_id=message_id,
    )
    _set_state(
        conn,
        message_id,
        FAILED,
        error=rejection.detail,
        summary=json.dumps({"reason": rejection.reason.value}),
        processed_at=dt.datetime.now(dt.UTC),
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
            for item in batch:
                _store_one(conn, item, source, run_id, result)
    log.info(
        "intake finished",
        extra={"action": "intake_done", "source": source, "read": result.read,
               "duplicates": result.duplicates, "failed": result.failed},
    )
    return result
