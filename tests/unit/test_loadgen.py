"""The load generator: exact counts, fresh ids, real content, repeatable output."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import pytest

from carebridge.demo.loadgen import DATA, generate
from carebridge.ingest.files.sources import discover, split_path


def read_all(folder: Path) -> list:
    found = discover([folder])
    return [item for path in found.files for item in split_path(path)]


def digest(folder: Path) -> str:
    total = hashlib.sha256()
    # .loadgen.json is left out: it records the folder and the time taken.
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name[0] != "."):
        total.update(str(path.relative_to(folder)).encode())
        total.update(path.read_bytes())
    return total.hexdigest()


def bundled() -> list:
    return read_all(DATA / "synthea" / "csv") + read_all(DATA / "hl7v2")


@pytest.mark.parametrize("messages", [1, 700, 1548, 1549, 3100])
def test_message_count_is_exact(tmp_path: Path, messages: int) -> None:
    summary = generate(tmp_path / "load", messages, seed=3)
    assert not discover([tmp_path / "load"]).skipped
    items = read_all(tmp_path / "load")
    assert len(items) == messages == summary.messages
    assert Counter(item.format for item in items) == Counter(summary.by_format)


def test_seed_decides_bytes_and_ids(tmp_path: Path) -> None:
    generate(tmp_path / "a", 2000, seed=7)
    generate(tmp_path / "b", 2000, seed=7)
    generate(tmp_path / "c", 2000, seed=8)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    keys_a = {item.dedup_key for item in read_all(tmp_path / "a")}
    keys_c = {item.dedup_key for item in read_all(tmp_path / "c")}
    assert not keys_a & keys_c


def test_clone_has_fresh_ids(tmp_path: Path) -> None:
    original = bundled()
    generate(tmp_path / "load", 2 * len(original), seed=1)
    items = read_all(tmp_path / "load")
    assert len(items) == 2 * len(original)
    by_clone: dict[str, list] = {}
    for item in items:
        by_clone.setdefault(item.origin.split("/c0000")[1][0], []).append(item)
    first, second = by_clone["0"], by_clone["1"]
    # The same messages, so the same formats and sizes, but no shared event.
    assert Counter(i.format for i in first) == Counter(i.format for i in original)
    assert not {i.dedup_key for i in first} & {i.dedup_key for i in second}
    assert not {i.ordering_key for i in first} & {i.ordering_key for i in second} - {None}
    # Reused control ids stay reused within a clone, as in the bundled data.
    assert len({i.dedup_key for i in first}) == len({i.dedup_key for i in original})


def test_codes_dates_and_amounts_are_kept(tmp_path: Path) -> None:
    generate(tmp_path / "load", 1548, seed=1)
    clone = (tmp_path / "load" / "csv" / "c00000" / "procedures.csv").read_text().splitlines()
    real = (DATA / "synthea" / "csv" / "procedures.csv").read_text().splitlines()
    assert clone[0] == real[0]
    for cloned_row, real_row in zip(clone[1:], real[1:], strict=True):
        cloned, original = cloned_row.split(","), real_row.split(",")
        assert cloned[2] != original[2]  # patient
        assert cloned[3] != original[3]  # encounter
        assert cloned[:2] + cloned[4:] == original[:2] + original[4:]
    dft = next((tmp_path / "load" / "hl7v2" / "c00000").glob("*DFT-P03-02.hl7")).read_bytes()
    real_dft = next((DATA / "hl7v2").rglob("DFT-P03-02.hl7")).read_bytes()
    ft1 = [s for s in dft.splitlines() if s.startswith(b"FT1|")]
    real_ft1 = [s for s in real_dft.splitlines() if s.startswith(b"FT1|")]
    assert len(ft1) == len(real_ft1) > 0
    for cloned_segment, real_segment in zip(ft1, real_ft1, strict=True):
        cloned, original = cloned_segment.split(b"|"), real_segment.split(b"|")
        # FT1-2, the transaction id, is new where the sample has one.
        assert cloned[2] != original[2] if original[2] else cloned[2] == original[2]
        assert cloned[3:] == original[3:]  # dates, codes, quantities, amounts


def test_hundred_thousand_messages_take_seconds(tmp_path: Path) -> None:
    started = time.perf_counter()
    summary = generate(tmp_path / "load", 100_000, seed=1)
    assert time.perf_counter() - started < 10
    assert sum(summary.by_format.values()) == 100_000
