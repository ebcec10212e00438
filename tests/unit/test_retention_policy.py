"""Retention policy: the ``retention:`` section, the cut-offs and the archive format."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import gzip
import hashlib
import shutil
from pathlib import Path

import pytest

from carebridge.config import load_configuration
from carebridge.config.model import Configuration, RetentionPolicy
from carebridge.engine import retention
from carebridge.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src/carebridge/demo/config"


@pytest.fixture(scope="module")
def demo() -> Configuration:
    return load_configuration(DEMO)


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    target = tmp_path / "demo" / "config"
    shutil.copytree(DEMO, target)
    (tmp_path / "demo" / "data").symlink_to(DEMO.parent / "data")
    return target


def _add_retention(config_dir: Path, body: str) -> Path:
    """Replace the file's ``retention:`` section (the last one) with ``body``."""
    path = config_dir / "carebridge.yaml"
    text = path.read_text()
    if "\nretention:\n" in text:
        text = text[: text.index("\nretention:\n")]
    path.write_text(text + "\nretention:\n" + body)
    return path


def _line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(needle)


def test_demo_retention_policy(demo: Configuration) -> None:
    assert demo.retention == RetentionPolicy(90, 365, None)


def test_config_without_retention_gets_the_defaults(config_copy: Path) -> None:
    path = config_copy / "carebridge.yaml"
    text = path.read_text()
    path.write_text(text[: text.index("\nretention:\n")] + "\n")
    assert load_configuration(config_copy).retention == RetentionPolicy(90, 365, None)


def test_retention_section_is_read(config_copy: Path) -> None:
    _add_retention(
        config_copy, "  content_days: 30\n  errored_content_days: 400\n  archive_dir: archive\n"
    )
    policy = load_configuration(config_copy).retention
    assert policy == RetentionPolicy(30, 400, (config_copy / "archive").resolve())


@pytest.mark.parametrize(
    ("body", "needle", "field"),
    [
        ("  content_days: 0\n", "content_days", "retention.content_days"),
        ("  content_days: ninety\n", "content_days", "retention.content_days"),
        ("  content_days: 100\n  errored_content_days: 30\n", "errored_content_days",
         "retention.errored_content_days"),
        ("  keep_days: 5\n", "keep_days", "retention.keep_days"),
    ],
)
def test_invalid_retention_names_file_line_and_field(
    config_copy: Path, body: str, needle: str, field: str
) -> None:
    path = _add_retention(config_copy, body)
    with pytest.raises(ConfigurationError) as caught:
        load_configuration(config_copy)
    error = caught.value
    assert (Path(error.path).name, error.line, error.field) == (
        "carebridge.yaml", _line_of(path, needle), field
    ), str(error)


def _policy(content: int, errored: int) -> Configuration:
    config = load_configuration(DEMO)
    return dataclasses.replace(config, retention=RetentionPolicy(content, errored, None))


def test_cutoffs_are_whole_months() -> None:
    config = _policy(90, 365)
    now = dt.datetime(2024, 6, 15, 10, 30, tzinfo=dt.UTC)
    content, errored = retention.cutoffs(config, now)
    # 90 days before is 2024-03-17: March is not over, so February is the last month pruned.
    assert content == dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
    assert errored == dt.datetime(2023, 6, 1, tzinfo=dt.UTC)


def test_before_only_lowers_cutoffs() -> None:
    config = _policy(90, 365)
    now = dt.datetime(2024, 6, 15, tzinfo=dt.UTC)
    assert retention.cutoffs(config, now, dt.date(2024, 1, 20)) == (
        dt.datetime(2024, 1, 1, tzinfo=dt.UTC), dt.datetime(2023, 6, 1, tzinfo=dt.UTC)
    )
    assert retention.cutoffs(config, now, dt.date(2030, 1, 1)) == retention.cutoffs(config, now)


def _records(count: int) -> list[dict]:
    rows = []
    for number in range(1, count + 1):
        raw = f"MSH|^~\\&|{number}\r".encode()
        rows.append({
            "message_id": number, "source": "test", "origin": None,
            "received_at": "2024-01-02T00:00:00+00:00", "format": "hl7v2",
            "state": "processed", "dedup_key": f"k{number}", "content_sha256": "x",
            "sha256": hashlib.sha256(raw).hexdigest(),
            "raw_base64": base64.b64encode(raw).decode(),
        })
    return rows


def test_archive_parts_are_numbered_and_read_back(tmp_path: Path) -> None:
    month = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    first = retention._write_archive(tmp_path, month, _records(3))
    second = retention._write_archive(tmp_path, month, _records(1))
    assert [first.name, second.name] == [
        "message-bodies-2024-01.part0001.jsonl.gz", "message-bodies-2024-01.part0002.jsonl.gz"
    ]
    read = list(retention.read_archive(first))
    assert [record["message_id"] for record in read] == [1, 2, 3]
    assert read[0]["raw"] == b"MSH|^~\\&|1\r"
    assert not list(tmp_path.glob("*.partial"))


def test_archive_with_altered_bytes_rejected(tmp_path: Path) -> None:
    path = retention._write_archive(
        tmp_path, dt.datetime(2024, 1, 1, tzinfo=dt.UTC), _records(2)
    )
    text = gzip.decompress(path.read_bytes()).decode()
    good = _records(1)[0]["raw_base64"]
    path.write_bytes(gzip.compress(text.replace(good, good[:-4] + "AAAA").encode()))
    with pytest.raises(retention.ArchiveError, match="line 1"):
        list(retention.read_archive(path))


def test_unwritable_archive_leaves_no_partial(tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(".partial") and "w" in mode:
            handle = real_open(file, mode, *args, **kwargs)
            handle.close()
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    records = [{"message_id": 1, "sha256": "0" * 64, "raw": ""}]
    with pytest.raises(retention.ArchiveError) as caught:
        retention._write_archive(tmp_path, dt.datetime(2024, 1, 1, tzinfo=dt.UTC), records)
    assert "No space left" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
