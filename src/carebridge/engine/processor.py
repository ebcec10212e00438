"""Process stored messages in batches: map, capture charges, issue supplies.

A worker claims a batch of received messages in id order and commits the
batch's outputs together with the messages' new state, so no charge exists
whose message still looks unprocessed, and the reverse. The batch is decided
in memory (one message at a time, in order, each seeing what the earlier ones
produced) and written with a few statements per table, which is what makes
thousands of messages a second possible.

A message that cannot be mapped becomes a failed message with a work item;
the messages behind it go on. If writing the batch fails, the batch is rolled
back and its messages are processed again one per transaction, so a single
poison message cannot hold the others back.
"""


from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Sequence

from sqlalchemy import Connection, Engine, Row, Subquery, bindparam, select, union_all
from sqlalchemy.exc import SQLAlchemyError

from carebridge.config.model import Configuration
from carebridge.engine.batch_write import flush
from carebridge.engine.intake import FAILED, RECEIVED
from carebridge.engine.lanes import LANE_COUNT, ensure_lanes
from carebridge.engine.staging import (
    BatchState,
    MessageApplier,
    ProcessResult,
    Writes,
)
from carebridge.engine.waits import resume_waits
from carebridge.errors import InputError
from carebridge.ingest.registry import map_raw
from carebridge.model import CanonicalBatch
from carebridge.store.bodies import raw_column, with_bodies
from carebridge.store.lookups import chunks
from carebridge.store.schema import lanes, messages
from carebridge.workflows.charge_capture import ChargeCapture
from carebridge.workflows.reasons import Reason, Rejection

log = logging.getLogger(__name__)


def _failed_message(message_id: int, exc: Exception) -> Writes:
    """Return the writes that fail a message and open its work item."""
    reason = getattr(exc, "reason", None)
    if not isinstance(reason, Reason):
        reason = Reason.MALFORMED_INPUT
    rejection = Rejection(reason, str(exc) or type(exc).__name__)
    writes = Writes()
    writes.work_items.append(
        {
            "subject_key": f"message:{message_id}",
            "reason": rejection.reason.value,
            "team": rejection.team.value,
            "message_id": message_id,
            "detail": rejection.detail,
            "status": "open",
            "created_at": dt.datetime.now(dt.UTC),
        }
    )
    writes.messages.append(
        {"b_id": message_id, "state": FAILED, "error": rejection.detail,
         "summary": json.dumps({"reason": rejection.reason.value}), "diagnoses_stored": 0}
    )
    return writes


def _map_one(row: Row) -> CanonicalBatch | Writes:
    """Map one message, or return the writes that fail it."""
    try:
        return map_raw(row.format, row.raw, row.id, row.occurrence)
    except InputError as exc:
        log.warning(
            "message rejected",
            extra={"action": "message_failed", "message_id": row.id,
                   "error_type": type(exc).__name__},
        )
        return _failed_message(row.id, exc)
    except Exception as exc:  # noqa: BLE001 - a poison message must not stop the batch
        # The exception text may quote message content, so the log names only
        # its type. The full text goes to the work item, which is access
        # controlled like the message itself.
        log.error(
            "message mapping raised",
            extra={"action": "message_error", "message_id": row.id,
                   "error_type": type(exc).__name__},
        )
        return _failed_message(
            row.id, Exception(f"processing failed: {type(exc).__name__}: {exc}")
        )


def _apply_one(state: BatchState, message_id: int, batch: CanonicalBatch,
               run_id: int | None) -> bool:
    """Stage one mapped message's outputs; return whether it was processed."""
    applier = MessageApplier(state, message_id, run_id)
    try:
        applier.apply(batch)
        applier.finish(batch)
    except InputError as exc:
        log.warning(
            "message rejected",
            extra={"action": "message_failed", "message_id": message_id,
                   "error_type": type(exc).__name__},
        )
        state.writes.merge(_failed_message(message_id, exc))
        return False
    except Exception as exc:  # noqa: BLE001 - same reason as in _map_one
        log.error(
            "message processing raised",
            extra={"action": "message_error", "message_id": message_id,
                   "error_type": type(exc).__name__},
        )
        state.writes.merge(_failed_message(
            message_id, Exception(f"processing failed: {type(exc).__name__}: {exc}")
        ))
        return False
    applier.commit_to_batch()
    return True


def _oldest_lane(conn: Connection) -> int | None:
    """Return the lane of the oldest received message, or None if there is none."""
    return conn.execute(
        select(messages.c.lane)
        .where(messages.c.state == RECEIVED)
        .order_by(messages.c.id)
        .limit(1)
    ).scalar()


def _claim_lanes(conn: Connection, start: int, *, with_messages: bool) -> list[int]:
    """Lock a quarter of the lanes from lane ``start`` on, with ``with_messages``
    only lanes that have received messages (PostgreSQL).

    ``SKIP LOCKED`` passes over lanes another worker holds, so a second
    worker that starts from the same lane takes the next quarter.
    """
    query = select(lanes.c.lane)
    if with_messages:
        query = query.where(
            select(messages.c.id)
            .where(messages.c.state == RECEIVED, messages.c.lane == lanes.c.lane)
            .exists()
        )
    return list(
        conn.execute(
            query
            .order_by((lanes.c.lane - start + LANE_COUNT) % LANE_COUNT)
            .limit(max(LANE_COUNT // 4, 1))
            .with_for_update(skip_locked=True)
        ).scalars()
    )


def _oldest_in_lanes(locked_lanes: Sequence[int], batch_size: int) -> Subquery:
    """Return the ids of the ``batch_size`` oldest received messages of ``locked_lanes``.

    Each lane is its own ``UNION ALL`` branch that reads the index on
    ``(state, lane, id)`` in id order, so PostgreSQL merges the branches and
    stops after ``batch_size`` rows. Filtering ``lane IN (...)`` while reading
    the whole table in id order instead passes over every message processed
    so far, which makes each claim slower as the table grows.
    """
    # The limit is written into the SQL text, so a prepared statement's
    # generic plan still expects few rows and looks bodies up by index.
    limit = bindparam("claim_limit", batch_size, literal_execute=True)
    branches = [
        select(messages.c.id)
        .where(messages.c.state == RECEIVED, messages.c.lane == lane)
        .order_by(messages.c.id)
        .limit(limit)
        for lane in locked_lanes
    ]
    if len(branches) == 1:
        # PostgreSQL rejects a second ORDER BY around a single parenthesised branch.
        return branches[0].subquery("oldest")
    oldest = union_all(*branches)
    return oldest.order_by(oldest.selected_columns.id).limit(limit).subquery("oldest")


def claim_batch(conn: Connection, batch_size: int) -> list[Row]:
    """Claim up to ``batch_size`` received messages, oldest first.

    On PostgreSQL the worker first locks a share of the lanes with
    ``FOR UPDATE SKIP LOCKED``, starting at the lane of the oldest received
    message, and takes messages of those lanes only. The locks last until the
    batch commits, so no other worker touches a message of the same patient
    meanwhile.

    Because the oldest message's lane comes first, one worker takes the
    oldest waiting message in every batch. Two messages that give one visit
    number to two patients are then decided in arrival order on every run.
    A worker may hold lanes that turned out empty until its batch commits,
    and other workers pass over them. SQLite has one writer at a time, so
    the batch takes messages of every lane.
    """
    columns = (messages.c.id, messages.c.format, raw_column(), messages.c.occurrence)
    if conn.dialect.name != "postgresql":
        return list(conn.execute(
            select(*columns)
            .select_from(with_bodies())
            .where(messages.c.state == RECEIVED)
            .order_by(messages.c.id)
            .limit(batch_size)
        ))
    # Under load nearly every lane has messages, so the worker locks lanes
    # without looking into each first. Asking every lane whether it has
    # received messages walks each lane's index entries of messages already
    # processed (until VACUUM removes them): about 20 ms a claim at 100,000
    # messages. Finding the one oldest message reads one index range.
    # Only when the lanes taken are empty does the worker look for lanes
    # with messages.
    start = _oldest_lane(conn)
    if start is None:
        return []
    for with_messages in (False, True):
        locked_lanes = _claim_lanes(conn, start, with_messages=with_messages)
        if not locked_lanes:
            return []
        oldest = _oldest_in_lanes(locked_lanes, batch_size)
        rows = list(conn.execute(
            select(*columns)
            .select_from(with_bodies(oldest.join(messages, messages.c.id == oldest.c.id)))
            .order_by(messages.c.id)
        ))
        if rows:
            return rows
    return []


def _process_rows(conn: Connection, rows: Sequence[Row], config: Configuration,
                  capture: ChargeCapture, run_id: int | None,
                  premapped: dict[int, CanonicalBatch | Writes] | None = None
                  ) -> tuple[int, int]:
    """Decide and write one batch inside the open transaction of ``conn``.

    ``premapped`` contains the messages already mapped, by message id.
    """
    state = BatchState(conn, config, capture)
    premapped = premapped or {}
    mapped = [(row.id, premapped[row.id] if row.id in premapped else _map_one(row))
              for row in rows]
    state.prefetch([result for _, result in mapped if isinstance(result, CanonicalBatch)])
    processed = failed = 0
    for message_id, result in mapped:
        if isinstance(result, Writes):
            state.writes.merge(result)
            failed += 1
        elif _apply_one(state, message_id, result, run_id):
            processed += 1
        else:
            failed += 1
    flush(state, run_id)
    return processed, failed


def _process_alone(engine: Engine, row: Row, config: Configuration,
                   capture: ChargeCapture, run_id: int | None) -> tuple[int, int]:
    """Process one message in its own transaction; fail it if writing raises."""
    try:
        with engine.begin() as conn:
            return _process_rows(conn, [row], config, capture, run_id)
    except SQLAlchemyError as exc:
        log.error(
            "message could not be written",
            extra={"action": "message_error", "message_id": row.id,
                   "error_type": type(exc).__name__},
        )
    with engine.begin() as conn:
        state = BatchState(conn, config, capture)
        state.writes = _failed_message(
            row.id, Exception("writing the message's results failed in the database; "
                              "check the values against column limits, then replay it")
        )
        flush(state, run_id)
    return 0, 1


def _process_mapped_first(engine: Engine, config: Configuration, capture: ChargeCapture,
                          batch_size: int, run_id: int | None) -> tuple[int, int]:
    """Read and map a batch, then take SQLite's write lock to decide and write it.

    Every SQLite transaction holds the one write lock. Mapping a batch of
    large FHIR Bundles inside it kept API requests and MLLP acknowledgements
    waiting. Messages that another process processed meanwhile are left
    out. The rest are still the oldest received messages, so each
    patient's messages stay in order.
    """
    with engine.begin() as conn:
        rows = claim_batch(conn, batch_size)
    if not rows:
        return 0, 0
    premapped = {row.id: _map_one(row) for row in rows}
    with engine.begin() as conn:
        waiting: set[int] = set()
        for chunk in chunks(premapped):
            waiting.update(conn.execute(
                select(messages.c.id)
                .where(messages.c.id.in_(chunk), messages.c.state == RECEIVED)
            ).scalars())
        rows = [row for row in rows if row.id in waiting]
        if not rows:
            return 0, 0
        return _process_rows(conn, rows, config, capture, run_id, premapped)


def process_batch(engine: Engine, config: Configuration, capture: ChargeCapture, *,
                  batch_size: int, run_id: int | None = None) -> tuple[int, int]:
    """Claim and process one batch; return (processed, failed), (0, 0) if idle."""
    try:
        if engine.dialect.name == "sqlite":
            return _process_mapped_first(engine, config, capture, batch_size, run_id)
        with engine.begin() as conn:
            rows = claim_batch(conn, batch_size)
            if not rows:
                return 0, 0
            return _process_rows(conn, rows, config, capture, run_id)
    except SQLAlchemyError as exc:
        # Something in the batch broke a database rule. Redo the batch one
        # message per transaction so that only the message at fault fails.
        log.warning(
            "batch write failed; processing its messages one at a time",
            extra={"action": "batch_isolate", "error_type": type(exc).__name__},
        )
    with engine.begin() as conn:
        rows = claim_batch(conn, batch_size)
    totals = [0, 0]
    for row in rows:
        processed, failed = _process_alone(engine, row, config, capture, run_id)
        totals[0] += processed
        totals[1] += failed
    return totals[0], totals[1]


def process_pending(
    engine: Engine,
    config: Configuration,
    *,
    as_of: dt.date | None = None,
    batch_size: int = 500,
    run_id: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> ProcessResult:
    """Process every received message, oldest first, ``batch_size`` per commit.

    Args:
        engine: the database.
        config: master data and rules to price and post with.
        as_of: the date that bounds service dates from above when the rules
            set no latest date; today when ``None``.
        batch_size: messages per transaction.
        run_id: the run recorded as having processed each message.
        progress: called with the number of messages finished in each batch.
    """
    capture = ChargeCapture(config, as_of or dt.date.today())
    result = ProcessResult()
    with engine.begin() as conn:
        ensure_lanes(conn)
    while True:
        processed, failed = process_batch(
            engine, config, capture, batch_size=batch_size, run_id=run_id
        )
        if processed + failed == 0:
            break
        result.processed += processed
        result.failed += failed
        result.batches += 1
        if progress:
            progress(processed + failed)
    resume_waits(engine, config, as_of=as_of)
    log.info(
        "processing finished",
        extra={"action": "process_done", "processed": result.processed,
               "failed": result.failed, "batches": result.batches},
    )
    return result
