"""Retention on SQLite and PostgreSQL: archive, verify, prune, and get the space back."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select, text

from carebridge.config.model import Configuration, RetentionPolicy
from carebridge.engine import retention
from carebridge.engine.intake import store_inputs
from carebridge.engine.processor import process_pending
from carebridge.ingest.files.sources import split_path
from carebridge.store.bodies import insert_bodies, raw_column, read_raw, with_bodies
from carebridge.store.db import open_engine, sqlite_url
from carebridge.store.schema import (
    charge_lines,
    message_bodies,
    messages,
    retained_bodies,
    work_items,
)

from .conftest import hl7

JAN = dt.datetime(2024, 1, 10, 8, 0, tzinfo=dt.UTC)
JUN = dt.datetime(2024, 6, 3, 8, 0, tzinfo=dt.UTC)
# 90 days before mid-June is mid-March: January goes, June stays.
NOW = dt.datetime(2024, 6, 15, 12, 0, tzinfo=dt.UTC)
# 365 days after January has ended: failed January messages go too.
LATER = dt.datetime(2025, 2, 15, 12, 0, tzinfo=dt.UTC)


@pytest.fixture()
def policy(config: Configuration) -> Configuration:
    return dataclasses.replace(config, retention=RetentionPolicy(90, 365, None))


def store(engine: Engine, received_at: dt.datetime, states: Iterable[str],
          size: int = 64, tag: str = "") -> list[int]:
    """Store one message per state received at ``received_at``; return their ids.

    Bodies go through :func:`insert_bodies`, as intake stores them, so that on
    PostgreSQL the month's partition is made on demand.
    """
    states = list(states)
    raws = [
        f"MSH|^~\\&|T|{received_at:%Y%m}|{tag}{number}|".encode() + os.urandom(size)
        for number in range(len(states))
    ]
    rows = [
        {"source": "test", "format": "hl7v2", "received_at": received_at,
         "content_sha256": hashlib.sha256(raw).hexdigest(),
         "dedup_key": f"{received_at:%Y%m%d%H%M}:{tag}{number}", "occurrence": 1, "lane": 0,
         "state": state}
        for number, (raw, state) in enumerate(zip(raws, states, strict=True))
    ]
    with engine.begin() as conn:
        ids = list(conn.execute(
            insert(messages).returning(messages.c.id, sort_by_parameter_order=True), rows
        ).scalars())
        insert_bodies(conn, ids, received_at, raws)
    return ids


def open_item(engine: Engine, message_id: int, status: str = "open") -> None:
    with engine.begin() as conn:
        conn.execute(insert(work_items).values(
            subject_key=f"message:{message_id}", reason="unknown_code", team="revenue",
            message_id=message_id, detail="test", status=status,
            created_at=dt.datetime(2024, 1, 10, tzinfo=dt.UTC),
        ))


def archived(archive: Path) -> dict[int, str]:
    """Every message id in the archive folder with the SHA-256 of its bytes."""
    found: dict[int, str] = {}
    for path in sorted(archive.glob("*.jsonl.gz")):
        for record in retention.read_archive(path):
            assert record["message_id"] not in found, "a message is archived twice"
            found[record["message_id"]] = hashlib.sha256(record["raw"]).hexdigest()
    return found


def raws(engine: Engine, ids: Iterable[int]) -> dict[int, bytes | None]:
    with engine.connect() as conn:
        return {message_id: read_raw(conn, message_id) for message_id in ids}


def partitions(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'message_bodies'::regclass"
        )).scalars())


def assert_consistent(engine: Engine) -> None:
    """Every message has exactly one of: a body, or the mark that it was pruned."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(messages.c.id, messages.c.content_pruned_at,
                   messages.c.content_archive, raw_column())
            .select_from(with_bodies())
        ).all()
        bodies = conn.execute(select(func.count()).select_from(message_bodies)).scalar_one()
        kept = conn.execute(select(func.count()).select_from(retained_bodies)).scalar_one()
    for row in rows:
        assert (row.raw is None) == (row.content_pruned_at is not None), row.id
        assert (row.raw is None) == (row.content_archive is not None), row.id
    assert bodies + kept == sum(1 for row in rows if row.raw is not None)


@pytest.fixture()
def january(engine: Engine) -> dict[str, list[int]]:
    """January: ordinary, unprocessed, failed and work-item messages; June: ordinary."""
    plain = store(engine, JAN, ["processed"] * 3 + ["duplicate"], tag="p")
    received = store(engine, JAN, ["received"], tag="r")
    failed = store(engine, JAN, ["failed"], tag="f")
    flagged = store(engine, JAN, ["processed", "processed"], tag="w")
    open_item(engine, flagged[0])
    open_item(engine, flagged[1], status="closed")
    june = store(engine, JUN, ["processed"] * 2, tag="j")
    return {"plain": plain + flagged[1:], "received": received, "failed": failed,
            "open": flagged[:1], "june": june}


def test_old_content_archived_then_pruned(
    engine: Engine, policy: Configuration, january: dict[str, list[int]], tmp_path: Path
) -> None:
    everything = [message_id for ids in january.values() for message_id in ids]
    before = raws(engine, everything)

    result = retention.prune(engine, policy, now=NOW, archive_dir=tmp_path / "archive")

    gone = january["plain"]
    assert result.pruned == len(gone)
    assert result.months == ["2024-01"]
    assert archived(tmp_path / "archive") == {
        message_id: hashlib.sha256(before[message_id]).hexdigest() for message_id in gone
    }
    after = raws(engine, everything)
    assert {message_id for message_id, raw in after.items() if raw is None} == set(gone)
    kept = set(everything) - set(gone)
    assert {message_id: after[message_id] for message_id in kept} == {
        message_id: before[message_id] for message_id in kept
    }
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(messages)).scalar_one() == len(
            everything
        )
        names = set(conn.execute(
            select(messages.c.content_archive).where(messages.c.id.in_(gone))
        ).scalars())
    assert names == {"message-bodies-2024-01.part0001.jsonl.gz"}
    assert_consistent(engine)
    if engine.dialect.name == "postgresql":
        assert "message_bodies_2024_01" not in partitions(engine)
        assert "message_bodies_2024_06" in partitions(engine)
        assert result.partitions_dropped == ["message_bodies_2024_01"]
        assert result.retained == 3  # received, failed, open work item


def test_errored_content_kept_longer(
    engine: Engine, policy: Configuration, january: dict[str, list[int]], tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    retention.prune(engine, policy, now=NOW, archive_dir=archive)
    held = january["failed"] + january["open"]
    assert all(raw is not None for raw in raws(engine, held).values())

    just_before = dt.datetime(2025, 1, 15, tzinfo=dt.UTC)
    retention.prune(engine, policy, now=just_before, archive_dir=archive)
    assert all(raw is not None for raw in raws(engine, held).values())

    result = retention.prune(engine, policy, now=LATER, archive_dir=archive)
    after = raws(engine, held + january["received"] + january["june"])
    assert [after[message_id] for message_id in held] == [None, None]
    assert [after[message_id] for message_id in january["june"]] == [None, None]
    # Never processed, so never pruned: it could not be processed any more.
    assert after[january["received"][0]] is not None
    assert result.pruned == len(held)  # June went at the run before
    assert set(archived(archive)) == set(january["plain"] + held + january["june"])
    assert_consistent(engine)


def test_dry_run_counts_and_changes_nothing(
    engine: Engine, policy: Configuration, january: dict[str, list[int]], tmp_path: Path
) -> None:
    result = retention.prune(engine, policy, now=NOW, dry_run=True)
    assert result.pruned == len(january["plain"])
    assert result.pruned_bytes > 0
    assert not list(tmp_path.rglob("*.jsonl.gz"))
    assert all(raw is not None for raw in raws(engine, january["plain"]).values())
    if engine.dialect.name == "postgresql":
        assert "message_bodies_2024_01" in partitions(engine)


def test_without_an_archive_nothing_is_pruned(
    engine: Engine, policy: Configuration, january: dict[str, list[int]]
) -> None:
    with pytest.raises(retention.ConfigurationError, match="archive"):
        retention.prune(engine, policy, now=NOW)
    assert all(raw is not None for raw in raws(engine, january["plain"]).values())


def test_prune_is_idempotent(
    engine: Engine, policy: Configuration, january: dict[str, list[int]], tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    first = retention.prune(engine, policy, now=NOW, archive_dir=archive)
    files = sorted(archive.iterdir())
    second = retention.prune(engine, policy, now=NOW, archive_dir=archive)
    assert (first.pruned, second.pruned) == (len(january["plain"]), 0)
    assert second.archives == []
    assert second.partitions_dropped == []
    assert sorted(archive.iterdir()) == files
    assert_consistent(engine)


def test_crash_after_archive_rerun_finishes(
    engine: Engine, policy: Configuration, january: dict[str, list[int]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    archive = tmp_path / "archive"
    write = retention._write_archive

    def write_then_crash(*args, **kwargs):
        write(*args, **kwargs)
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(retention, "_write_archive", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        retention.prune(engine, policy, now=NOW, archive_dir=archive)
    assert all(raw is not None for raw in raws(engine, january["plain"]).values())
    assert_consistent(engine)
    if engine.dialect.name == "postgresql":
        assert "message_bodies_2024_01" in partitions(engine)

    monkeypatch.setattr(retention, "_write_archive", write)
    result = retention.prune(engine, policy, now=NOW, archive_dir=archive)
    assert result.pruned == len(january["plain"])
    # The archive of the stopped run was reused, not written again.
    assert [path.name for path in archive.iterdir()] == [
        "message-bodies-2024-01.part0001.jsonl.gz"
    ]
    assert set(archived(archive)) == set(january["plain"])
    assert_consistent(engine)


def test_crash_between_batches_rerun_finishes(
    engine: Engine, policy: Configuration, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL prunes a month in one transaction, not in batches")
    ids = store(engine, JAN, ["processed"] * 7)
    archive = tmp_path / "archive"
    delete = retention._delete_batch
    calls = []

    def delete_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut")
        return delete(*args, **kwargs)

    monkeypatch.setattr(retention, "_delete_batch", delete_then_crash)
    with pytest.raises(KeyboardInterrupt):
        retention.prune(engine, policy, now=NOW, archive_dir=archive, batch_size=3)
    left = [message_id for message_id, raw in raws(engine, ids).items() if raw is not None]
    assert len(left) == 4
    assert_consistent(engine)

    monkeypatch.setattr(retention, "_delete_batch", delete)
    result = retention.prune(engine, policy, now=NOW, archive_dir=archive, batch_size=3)
    assert result.pruned == 4
    assert result.archives == [archive / "message-bodies-2024-01.part0001.jsonl.gz"]
    assert all(raw is None for raw in raws(engine, ids).values())
    assert set(archived(archive)) == set(ids)
    assert_consistent(engine)


def test_processing_after_pruning(
    engine: Engine, policy: Configuration, tmp_path: Path
) -> None:
    visit = hl7(
        "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|CTL0091|P|2.5",
        "EVN|P03|20240501120000",
        "PID|1||MRN0091^^^SENDFAC^MR||TESTPATIENT^IOTA",
        "PV1|1|O|CLINIC1||||||||||||||||VIS0091",
        "FT1|1|TXN0091||20240501|20240501|CG|99213^OFFICE VISIT EST^CPT|||1|135.50&USD|135.50&USD",
    )
    first = tmp_path / "first.hl7"
    first.write_bytes(visit)
    store_inputs(engine, split_path(first), source="test")
    process_pending(engine, policy, as_of=dt.date(2024, 6, 1))

    # A year on, the month the message came in is pruned: on PostgreSQL its
    # partition is dropped, so the next intake must make one again.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    result = retention.prune(engine, policy, now=later, archive_dir=tmp_path / "archive")
    assert result.pruned == 1
    with engine.connect() as conn:
        assert read_raw(conn, 1) is None
        assert conn.execute(select(charge_lines.c.source_message_id)).scalars().all() == [1]

    again = tmp_path / "again.hl7"
    again.write_bytes(visit.replace(b"CTL0091", b"CTL0092").replace(b"TXN0091", b"TXN0092"))
    store_inputs(engine, split_path(again), source="test")
    processed = process_pending(engine, policy, as_of=dt.date(2024, 6, 1))
    assert processed.processed == 1
    with engine.connect() as conn:
        assert read_raw(conn, 2).startswith(b"MSH|")
        assert len(conn.execute(select(charge_lines.c.id)).all()) == 2


def test_space_is_given_back(
    engine: Engine, policy: Configuration, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # 5,000 messages of 8 KiB: 3,000 in January, 2,000 in February.
    for _ in range(6):
        store(engine, JAN, ["processed"] * 500, size=8192, tag=f"{_}-")
    for _ in range(4):
        store(engine, dt.datetime(2024, 2, 5, tzinfo=dt.UTC), ["processed"] * 500, size=8192,
              tag=f"{_}-")
    archive = tmp_path / "archive"
    feb = dt.datetime(2024, 5, 20, tzinfo=dt.UTC)  # January is over 90 days old, February not
    first = retention.prune(engine, policy, now=feb, archive_dir=archive, vacuum=True)
    second = retention.prune(engine, policy, now=NOW, archive_dir=archive)
    assert (first.pruned, second.pruned) == (3000, 2000)
    with capsys.disabled():
        print(f"\n[{engine.dialect.name}] bytes before/after: first prune "
              f"{first.size_before:,} -> {first.size_after:,} ({first.space}); second "
              f"{second.size_before:,} -> {second.size_after:,} ({second.space})")
    # Each prune returns at least 80% of the bytes it pruned.
    assert first.size_before - first.size_after > 0.8 * 3000 * 8192
    assert second.size_before - second.size_after > 0.8 * 2000 * 8192
    if engine.dialect.name == "postgresql":
        assert first.space == second.space == "drop_partition"
        assert not {"message_bodies_2024_01", "message_bodies_2024_02"} & partitions(engine)
    else:
        # The first prune switched the file to incremental auto-vacuum with one
        # VACUUM; after that, pruning alone gives space back.
        assert (first.space, second.space) == ("vacuum", "incremental_vacuum")


def test_sqlite_without_vacuum_keeps_the_file_size(
    tmp_path: Path, policy: Configuration
) -> None:
    # Control for the test above: deleting rows alone frees pages inside the
    # file, but the file stays as large until a VACUUM.
    path = tmp_path / "plain.db"
    engine = open_engine(sqlite_url(path))
    try:
        for _ in range(4):
            store(engine, JAN, ["processed"] * 500, size=8192, tag=f"{_}-")
        result = retention.prune(engine, policy, now=NOW, archive_dir=tmp_path / "archive")
        assert result.pruned == 2000
        assert result.space == "none"
        assert result.size_after == result.size_before == path.stat().st_size
        with engine.connect() as conn:
            free = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
            page = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
        assert free * page > 0.8 * 2000 * 8192
    finally:
        engine.dispose()
