"""Content retention: archive, then prune, the raw bytes of old messages.

A message's row in ``messages`` (metadata, state, dedup key, and the id that
postings trace back to) is kept; only its bytes go. They live apart from the
row, in ``message_bodies``, so that pruning does not touch the row:

* On PostgreSQL ``message_bodies`` has one partition per calendar month
  (UTC). Pruning a month copies the bodies that must stay longer into
  ``retained_bodies`` and drops the partition. Dropping returns the space
  to the operating system at once, so no row is deleted or vacuumed.
* On SQLite body rows are deleted in batches. Freed pages go back to the
  file system by ``PRAGMA incremental_vacuum`` once the database is in
  ``auto_vacuum=INCREMENTAL`` mode; a database made without it is converted
  by one ``VACUUM`` when :func:`prune` is called with ``vacuum=True``.

Who stays longer: a message still ``received`` (not processed) is never
pruned, since it could not be processed any more. A ``failed`` message, and
any message an open work item refers to, keeps its bytes until
``errored_content_days``; everything else keeps them ``content_days``.
Pruning works in whole months: a month is pruned once all of it is older
than the cut-off, so content is kept at least as long as the policy says
and at most a month longer, the same on both backends.

Before anything is pruned, its bytes and metadata are written to a gzipped
JSON Lines archive per month, which is read back and checked (every id, and
the SHA-256 of every body) before the database is changed. A run that stops
part-way is finished by running again: bodies already in a verified archive
are not written twice, and each database step commits as a whole.
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    not_,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url

from carebridge.config.model import Configuration
from carebridge.engine.intake import FAILED, RECEIVED
from carebridge.errors import CarebridgeError, ConfigurationError
from carebridge.store.bodies import ensure_partitions, month_start, next_month
from carebridge.store.schema import message_bodies, messages, retained_bodies, work_items

log = logging.getLogger(__name__)

PARTITION_NAME = re.compile(r"^message_bodies_(\d{4})_(\d{2})$")
ARCHIVE_NAME = re.compile(r"^message-bodies-(\d{4})-(\d{2})\.part(\d{4})\.jsonl\.gz$")
_CHUNK = 500


class ArchiveError(CarebridgeError):
    """An archive could not be written or read back intact; nothing was pruned."""


# --- what may go -----------------------------------------------------------------


def _held() -> ColumnElement[bool]:
    """True for a message that keeps its bytes until ``errored_content_days``."""
    open_item = exists(
        select(work_items.c.id).where(
            work_items.c.message_id == messages.c.id, work_items.c.status == "open"
        )
    )
    return or_(messages.c.state == FAILED, open_item)


def _prunable(bodies: Any, content_cutoff: dt.datetime,
              errored_cutoff: dt.datetime) -> ColumnElement[bool]:
    return and_(
        bodies.c.received_at < content_cutoff,
        messages.c.state != RECEIVED,
        or_(bodies.c.received_at < errored_cutoff, not_(_held())),
    )


@dataclass(frozen=True, slots=True)
class _Cutoffs:
    content: dt.datetime
    errored: dt.datetime


def cutoffs(
    config: Configuration, now: dt.datetime, before: dt.datetime | dt.date | None = None
) -> tuple[dt.datetime, dt.datetime]:
    """Return the instants before which ordinary and held content is pruned.

    Both are month starts: content received before the first is pruned, and
    content of failed messages or messages with an open work item only
    before the second. ``before`` lowers both, never raises them.
    """
    policy = config.retention
    content = month_start(now - dt.timedelta(days=policy.content_days))
    errored = month_start(now - dt.timedelta(days=policy.errored_content_days))
    if before is not None:
        if not isinstance(before, dt.datetime):
            before = dt.datetime.combine(before, dt.time(), tzinfo=dt.UTC)
        limit = month_start(before)
        content, errored = min(content, limit), min(errored, limit)
    return content, errored


# --- the archive -----------------------------------------------------------------


def _archive_parts(archive_dir: Path, month: dt.datetime) -> list[Path]:
    prefix = f"message-bodies-{month.year:04d}-{month.month:02d}.part"
    return sorted(
        path for path in archive_dir.glob(f"{prefix}*.jsonl.gz") if ARCHIVE_NAME.match(path.name)
    )


def read_archive(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the records of one archive file, each with its ``raw`` decoded to bytes.

    Raises:
        ArchiveError: if a record's bytes do not match its ``sha256``.
    """
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            record = json.loads(line)
            record["raw"] = base64.b64decode(record.pop("raw_base64"))
            if hashlib.sha256(record["raw"]).hexdigest() != record["sha256"]:
                raise ArchiveError(
                    f"{path.name} line {number}: bytes do not match sha256; the file is "
                    "damaged, restore it from a copy before pruning again"
                )
            yield record


def _archived(archive_dir: Path, month: dt.datetime) -> dict[int, tuple[str, str]]:
    """Map each message id already archived for ``month`` to (sha256, file name)."""
    found: dict[int, tuple[str, str]] = {}
    for path in _archive_parts(archive_dir, month):
        for record in read_archive(path):
            found[record["message_id"]] = (record["sha256"], path.name)
    return found


def _record(row: Any, digest: str) -> dict[str, Any]:
    received = row.received_at
    if received.tzinfo is None:
        received = received.replace(tzinfo=dt.UTC)
    return {
        "message_id": row.message_id,
        "source": row.source,
        "origin": row.origin,
        "received_at": received.isoformat(),
        "format": row.format,
        "state": row.state,
        "dedup_key": row.dedup_key,
        "content_sha256": row.content_sha256,
        "sha256": digest,
        "raw_base64": base64.b64encode(row.raw).decode("ascii"),
    }


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_archive(
    archive_dir: Path, month: dt.datetime, records: list[dict[str, Any]]
) -> Path:
    """Write ``records`` as the next part of ``month``'s archive and verify it.

    The file is written under a temporary name, synced, read back and
    compared with ``records`` (ids and SHA-256), and only then renamed into
    place, so a visible part is always complete.
    """
    archive_dir.mkdir(parents=True, exist_ok=True)
    parts = _archive_parts(archive_dir, month)
    number = int(ARCHIVE_NAME.match(parts[-1].name).group(3)) + 1 if parts else 1
    final = archive_dir / (
        f"message-bodies-{month.year:04d}-{month.month:02d}.part{number:04d}.jsonl.gz"
    )
    partial = final.with_name(final.name + ".partial")
    try:
        with open(partial, "wb") as raw_handle:
            with gzip.GzipFile(fileobj=raw_handle, mode="wb") as handle:
                for record in records:
                    handle.write(json.dumps(record, sort_keys=True).encode("utf-8") + b"\n")
            raw_handle.flush()
            os.fsync(raw_handle.fileno())
    except OSError as exc:
        # A full or read-only archive disk: remove the half-written part so
        # the folder holds only complete, verified archives.
        partial.unlink(missing_ok=True)
        log.error("archive write failed", extra={"action": "archive_failed",
                                                  "file": partial.name,
                                                  "error_type": type(exc).__name__})
        raise ArchiveError(
            f"cannot write archive {partial.name} in {archive_dir}: {exc.strerror}; "
            "nothing was pruned, free space or fix permissions and run again"
        ) from exc
    expected = {record["message_id"]: record["sha256"] for record in records}
    try:
        found = {record["message_id"]: record["sha256"] for record in read_archive(partial)}
        count = sum(1 for _ in read_archive(partial))
    except (OSError, ValueError, KeyError) as exc:
        raise ArchiveError(f"{partial.name} cannot be read back: {exc}") from exc
    if count != len(records) or found != expected:
        raise ArchiveError(
            f"{partial.name} read back differs from the records written; nothing was "
            "pruned, check the archive disk and run again"
        )
    os.replace(partial, final)
    _fsync_dir(archive_dir)
    return final


def _export_month(
    engine: Engine, table: Any, month: dt.datetime, ids: list[int], archive_dir: Path
) -> dict[int, str]:
    """Make sure every body of ``ids`` is in a verified archive; map id to file name.

    Bodies an earlier run archived with the same bytes are not written again.
    Rows are read in short transactions so that SQLite's writer is not held
    while the file is written.
    """
    archived = _archived(archive_dir, month)
    files: dict[int, str] = {}
    pending: list[dict[str, Any]] = []
    columns = (
        table.c.message_id, table.c.received_at, table.c.raw, messages.c.source,
        messages.c.origin, messages.c.format, messages.c.state, messages.c.dedup_key,
        messages.c.content_sha256,
    )
    for chunk in _chunks(ids):
        with engine.connect() as conn:
            rows = conn.execute(
                select(*columns)
                .join(messages, messages.c.id == table.c.message_id)
                .where(table.c.message_id.in_(chunk))
            ).all()
        for row in rows:
            digest = hashlib.sha256(row.raw).hexdigest()
            earlier = archived.get(row.message_id)
            if earlier is not None and earlier[0] == digest:
                files[row.message_id] = earlier[1]
            else:
                pending.append(_record(row, digest))
    if pending:
        path = _write_archive(archive_dir, month, pending)
        files.update((record["message_id"], path.name) for record in pending)
        log.info(
            "archive written",
            extra={"action": "prune_archive", "archive": path.name, "messages": len(pending),
                   "first_id": pending[0]["message_id"], "last_id": pending[-1]["message_id"]},
        )
    return files


# --- pruning ---------------------------------------------------------------------


@dataclass(slots=True)
class PruneResult:
    """The outcome of one :func:`prune`, or with ``dry_run`` its forecast.

    ``size_before`` and ``size_after`` are bytes: on SQLite the database
    file with its WAL, on PostgreSQL the body tables with their indexes.
    ``retained`` counts bodies moved to ``retained_bodies`` to outlive
    their month's partition.
    """

    content_cutoff: dt.datetime
    errored_cutoff: dt.datetime
    dry_run: bool
    pruned: int = 0
    pruned_bytes: int = 0
    retained: int = 0
    months: list[str] = field(default_factory=list)
    partitions_dropped: list[str] = field(default_factory=list)
    archives: list[Path] = field(default_factory=list)
    space: str = "none"
    size_before: int | None = None
    size_after: int | None = None


def _chunks(values: Sequence[int], size: int = _CHUNK) -> Iterator[list[int]]:
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


def _month_label(month: dt.datetime) -> str:
    return f"{month.year:04d}-{month.month:02d}"


def _candidates(
    conn: Connection, table: Any, cut: _Cutoffs, month: dt.datetime | None = None
) -> dict[dt.datetime, list[int]]:
    """Map each month to the ids in ``table`` whose bodies may be pruned now."""
    query = (
        select(table.c.message_id, table.c.received_at)
        .join(messages, messages.c.id == table.c.message_id)
        .where(_prunable(table, cut.content, cut.errored))
        .order_by(table.c.message_id)
    )
    if month is not None:
        query = query.where(table.c.received_at >= month, table.c.received_at < next_month(month))
    by_month: dict[dt.datetime, list[int]] = {}
    for message_id, received_at in conn.execute(query):
        by_month.setdefault(month_start(received_at), []).append(message_id)
    return by_month


def _bytes_of(conn: Connection, table: Any, ids: list[int]) -> int:
    total = 0
    for chunk in _chunks(ids):
        total += conn.execute(
            select(func.coalesce(func.sum(func.length(table.c.raw)), 0))
            .where(table.c.message_id.in_(chunk))
        ).scalar_one()
    return int(total)


def _mark_pruned(conn: Connection, files: dict[int, str], ids: Iterable[int],
                 now: dt.datetime) -> None:
    rows = [{"mid": message_id, "archive": files[message_id]} for message_id in ids]
    if rows:
        conn.execute(
            update(messages)
            .where(messages.c.id == bindparam("mid"))
            .values(content_pruned_at=now, content_archive=bindparam("archive")),
            rows,
        )


def _delete_batch(conn: Connection, table: Any, batch: list[int], cut: _Cutoffs,
                  files: dict[int, str], now: dt.datetime) -> tuple[int, int]:
    """Delete one batch of archived bodies that are still prunable; mark their messages.

    Returns the number of bodies deleted and their total size in bytes.
    """
    still = exists(
        select(messages.c.id).where(
            messages.c.id == table.c.message_id, _prunable(table, cut.content, cut.errored)
        )
    )
    gone = conn.execute(
        delete(table)
        .where(table.c.message_id.in_(batch), still)
        .returning(table.c.message_id, func.length(table.c.raw))
    ).all()
    _mark_pruned(conn, files, [message_id for message_id, _ in gone], now)
    return len(gone), sum(size for _, size in gone)


def _prune_rows(engine: Engine, table: Any, cut: _Cutoffs, archive_dir: Path | None,
                now: dt.datetime, result: PruneResult, batch_size: int) -> None:
    """Archive then delete prunable rows of ``table``, month by month, in batches."""
    with engine.connect() as conn:
        by_month = _candidates(conn, table, cut)
    for month, ids in sorted(by_month.items()):
        label = _month_label(month)
        if label not in result.months:
            result.months.append(label)
        if result.dry_run or archive_dir is None:  # a dry run has no archive
            with engine.connect() as conn:
                result.pruned_bytes += _bytes_of(conn, table, ids)
            result.pruned += len(ids)
            continue
        files = _export_month(engine, table, month, ids, archive_dir)
        written = {archive_dir / file_name for file_name in files.values()}
        result.archives.extend(sorted(written - set(result.archives)))
        month_pruned = 0
        for batch in _chunks(ids, batch_size):
            with engine.begin() as conn:
                done, size = _delete_batch(conn, table, batch, cut, files, now)
            month_pruned += done
            result.pruned += done
            result.pruned_bytes += size
        log.info(
            "month pruned",
            extra={"action": "prune_month", "month": label, "table": table.name,
                   "messages": month_pruned},
        )


def _partitions(conn: Connection) -> list[tuple[str, dt.datetime]]:
    names = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'message_bodies'::regclass"
        )
    ).scalars()
    found = []
    for name in names:
        match = PARTITION_NAME.match(name)
        if match:
            found.append((name, dt.datetime(int(match[1]), int(match[2]), 1, tzinfo=dt.UTC)))
    return sorted(found, key=lambda item: item[1])


def _drop_partition(conn: Connection, name: str, month: dt.datetime, cut: _Cutoffs,
                    files: dict[int, str], now: dt.datetime) -> tuple[int, int]:
    """Keep what must stay, mark what goes, and drop one partition, in one transaction.

    Returns the number of messages pruned and of bodies kept in
    ``retained_bodies``. The prunable set is read again under the lock: a
    message that became held or was not archived since is kept.
    """
    # ACCESS EXCLUSIVE on the parent covers every partition, so no intake or
    # claim touches bodies between the decision and the drop. Taking it first
    # avoids a lock upgrade, which could deadlock with a reader.
    conn.execute(text("SET LOCAL lock_timeout = '30s'"))
    conn.execute(text("LOCK TABLE message_bodies IN ACCESS EXCLUSIVE MODE"))
    prunable = {
        message_id
        for ids in _candidates(conn, message_bodies, cut, month).values()
        for message_id in ids
        if message_id in files
    }
    everything = conn.execute(
        select(message_bodies.c.message_id).where(
            message_bodies.c.received_at >= month,
            message_bodies.c.received_at < next_month(month),
        )
    ).scalars().all()
    keep = [message_id for message_id in everything if message_id not in prunable]
    stamp = bindparam("now", now, type_=retained_bodies.c.retained_at.type)
    for chunk in _chunks(keep):
        kept = (
            select(message_bodies.c.message_id, message_bodies.c.received_at,
                   message_bodies.c.raw, stamp)
            .where(message_bodies.c.message_id.in_(chunk),
                   message_bodies.c.received_at >= month,
                   message_bodies.c.received_at < next_month(month))
        )
        conn.execute(
            insert(retained_bodies)
            .from_select(["message_id", "received_at", "raw", "retained_at"], kept)
        )
    _mark_pruned(conn, files, sorted(prunable), now)
    conn.execute(text(f"DROP TABLE {name}"))
    return len(prunable), len(keep)


def _prune_partitions(engine: Engine, cut: _Cutoffs, archive_dir: Path | None,
                      now: dt.datetime, result: PruneResult) -> None:
    """Archive and drop each whole month of ``message_bodies`` older than the cut-off."""
    with engine.connect() as conn:
        old = [(name, month) for name, month in _partitions(conn)
               if next_month(month) <= cut.content]
    for name, month in old:
        label = _month_label(month)
        with engine.connect() as conn:
            ids = _candidates(conn, message_bodies, cut, month).get(month, [])
            if result.dry_run or archive_dir is None:
                result.pruned_bytes += _bytes_of(conn, message_bodies, ids)
        result.months.append(label)
        if result.dry_run or archive_dir is None:
            result.pruned += len(ids)
            result.partitions_dropped.append(name)
            continue
        files = _export_month(engine, message_bodies, month, ids, archive_dir) if ids else {}
        written = {archive_dir / file_name for file_name in files.values()}
        result.archives.extend(sorted(written - set(result.archives)))
        with engine.connect() as conn:
            size = _bytes_of(conn, message_bodies, ids)
        with engine.begin() as conn:
            pruned, kept = _drop_partition(conn, name, month, cut, files, now)
        result.pruned += pruned
        result.pruned_bytes += size if pruned == len(ids) else 0
        result.retained += kept
        result.partitions_dropped.append(name)
        log.info(
            "partition dropped",
            extra={"action": "prune_partition", "partition": name, "messages": pruned,
                   "retained": kept},
        )


def storage_size(engine: Engine) -> int:
    """Return the bytes the bodies take: the SQLite file and WAL, or PostgreSQL's tables."""
    if engine.dialect.name == "sqlite":
        database = make_url(str(engine.url)).database
        if not database or database == ":memory:":
            return 0
        path = Path(database)
        wal = path.with_name(path.name + "-wal")
        return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    with engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) "
            "+ pg_total_relation_size('retained_bodies') "
            "FROM pg_inherits WHERE inhparent = 'message_bodies'::regclass"
        )).scalar_one())


def _checkpoint_sqlite(engine: Engine) -> None:
    """Copy the WAL into the database file and empty it, so sizes compare fairly."""
    raw = engine.raw_connection()
    try:
        raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        raw.close()


def _reclaim_sqlite(engine: Engine, vacuum: bool) -> str:
    """Give freed pages back to the file system; return how it was done.

    VACUUM and incremental_vacuum cannot run in a transaction, so they go
    through the driver connection, which carebridge keeps in autocommit
    mode on SQLite.
    """
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        mode = cursor.execute("PRAGMA auto_vacuum").fetchone()[0]
        if mode == 2:
            # executescript steps the pragma to the end; execute stops after
            # the first page, as the pragma returns no rows.
            cursor.executescript("PRAGMA incremental_vacuum;")
            how = "incremental_vacuum"
        elif vacuum:
            # Switching auto_vacuum on a database with tables takes effect at
            # the next VACUUM; from then on incremental_vacuum is enough.
            cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
            cursor.execute("VACUUM")
            how = "vacuum"
        else:
            how = "none"
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        cursor.close()
    finally:
        raw.close()
    return how


def prune(
    engine: Engine,
    config: Configuration,
    *,
    now: dt.datetime,
    archive_dir: Path | None = None,
    dry_run: bool = False,
    before: dt.datetime | dt.date | None = None,
    vacuum: bool = False,
    batch_size: int = 1000,
) -> PruneResult:
    """Archive, verify, then prune message bytes older than the retention policy.

    Args:
        engine: the carebridge database, at the newest schema.
        config: its configuration; ``config.retention`` is the policy.
        now: the instant the policy is measured from (aware).
        archive_dir: where archives go; defaults to ``retention.archive_dir``.
        dry_run: count what would be pruned, write and change nothing.
        before: prune nothing received on or after the start of this
            date's month, even if the policy would.
        vacuum: on SQLite, run one ``VACUUM`` to switch a database made
            without ``auto_vacuum=INCREMENTAL`` to it and give back its
            free space (rewrites the file; needs that much free disk).
        batch_size: bodies deleted per transaction on SQLite.

    Returns:
        What was pruned, the archive files, and the storage size before and after.

    Raises:
        ConfigurationError: no archive directory is configured or given.
        ArchiveError: an archive did not read back intact; nothing of its
            month was pruned.
    """
    content, errored = cutoffs(config, now, before)
    cut = _Cutoffs(content, errored)
    result = PruneResult(content_cutoff=content, errored_cutoff=errored, dry_run=dry_run)
    target = archive_dir if archive_dir is not None else config.retention.archive_dir
    if target is None and not dry_run:
        raise ConfigurationError(
            "no archive directory: set retention.archive_dir in carebridge.yaml or pass "
            "--archive; content is never pruned without an archive",
            field="retention.archive_dir",
        )
    target = Path(target) if target is not None else None
    postgresql = engine.dialect.name == "postgresql"
    log.info(
        "prune started",
        extra={"action": "prune_start", "content_cutoff": content.isoformat(),
               "errored_cutoff": errored.isoformat(), "dry_run": dry_run},
    )
    if not postgresql and not dry_run:
        _checkpoint_sqlite(engine)
    result.size_before = storage_size(engine)
    if postgresql and not dry_run:
        with engine.begin() as conn:
            ensure_partitions(conn, now, next_month(month_start(now)))
    if postgresql:
        _prune_partitions(engine, cut, target, now, result)
    else:
        _prune_rows(engine, message_bodies, cut, target, now, result, batch_size)
    _prune_rows(engine, retained_bodies, cut, target, now, result, batch_size)
    if postgresql:
        result.space = "drop_partition" if result.partitions_dropped and not dry_run else "none"
    elif not dry_run:
        result.space = _reclaim_sqlite(engine, vacuum)
    result.size_after = storage_size(engine)
    log.info(
        "prune finished",
        extra={"action": "prune_done", "pruned": result.pruned, "retained": result.retained,
               "partitions_dropped": len(result.partitions_dropped),
               "archives": [path.name for path in result.archives], "space": result.space,
               "size_before": result.size_before, "size_after": result.size_after},
    )
    return result
