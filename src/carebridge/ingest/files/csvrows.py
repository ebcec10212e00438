"""Read a CSV file as a sequence of self-describing row messages.

Each data row becomes one :class:`CsvRecord` whose ``raw`` bytes are the
header line, ``b"\\n"`` and the row exactly as it appears in the file, so that
a stored row can be re-read on its own. Quoting follows RFC 4180 (quoted
commas, doubled quotes, line breaks inside quoted fields). A row that cannot be
read is kept with an ``error`` and never dropped.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from carebridge.errors import ParseError

logger = logging.getLogger(__name__)

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class CsvRecord:
    """One data row of a CSV file.

    Attributes:
        line: 1-based physical line on which the row starts (the header is 1).
        raw: header line + ``b"\\n"`` + the row's bytes as in the file, without
            the row's final line terminator.
        fields: column name to value, or ``None`` when ``error`` is set.
        error: why the row cannot be read, starting with ``"line N: "``.
    """

    line: int
    raw: bytes
    fields: dict[str, str] | None
    error: str | None = None


@dataclass(slots=True)
class CsvFile:
    """The rows of one CSV file, in file order; iterating yields the records."""

    source: str
    header: tuple[str, ...]
    records: list[CsvRecord] = field(default_factory=list)
    blank_lines: int = 0

    def __iter__(self) -> Iterator[CsvRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def accepted(self) -> int:
        """Number of rows that were read into fields."""
        return sum(1 for record in self.records if record.error is None)

    @property
    def rejected(self) -> int:
        """Number of rows kept with an error."""
        return len(self.records) - self.accepted


class _LineFeeder:
    """Feed decoded physical lines to :func:`csv.reader`, counting how many it took.

    ``csv.reader`` pulls one line at a time and only as many as the current
    record needs, so the count after each record gives the lines it spans.
    """

    def __init__(self, lines: list[bytes], start: int) -> None:
        self._lines = lines
        self.consumed = start
        self.undecodable: set[int] = set()

    def __iter__(self) -> Iterator[str]:
        while self.consumed < len(self._lines):
            index = self.consumed
            self.consumed += 1
            try:
                yield self._lines[index].decode("utf-8")
            except UnicodeDecodeError:
                self.undecodable.add(index)
                yield self._lines[index].decode("utf-8", errors="replace")


def _split_lines(data: bytes) -> list[bytes]:
    """Split ``data`` after each LF, keeping the terminators (CRLF stays intact).

    ``bytes.splitlines`` is not used because it also splits on a lone CR and
    on other control characters that may occur inside a quoted field.
    """
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _strip_terminator(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


def _read_header(lines: list[bytes], source: str) -> tuple[str, ...]:
    if not lines:
        raise ParseError("empty CSV file: no header line", location=source)
    try:
        text = lines[0].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError(f"header is not valid UTF-8: {exc}", location=source) from exc
    header = tuple(next(csv.reader([text], strict=True), []))
    if not header:
        raise ParseError("empty header line", location=f"{source}:1")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise ParseError(
            f"duplicate column names in header: {', '.join(duplicates)}",
            location=f"{source}:1",
        )
    return header


def read_csv_records(data: bytes, *, source: str) -> CsvFile:
    """Read CSV bytes into one record per data row.

    The first line is the header. LF and CRLF line ends are accepted and a
    UTF-8 byte-order mark is skipped. Blank lines are skipped but counted in
    line numbers and in ``CsvFile.blank_lines``. A row with the wrong number of
    fields, broken quoting or invalid UTF-8 is kept with ``error`` set.

    Args:
        data: the whole file.
        source: file name or other label used in error locations.

    Returns:
        The header and the records in file order.

    Raises:
        ParseError: the file is empty or its header cannot be read.
    """
    lines = _split_lines(data)
    header = _read_header(lines, source)
    header_raw = _strip_terminator(lines[0])
    result = CsvFile(source=source, header=header)
    feeder = _LineFeeder(lines, start=1)
    reader = csv.reader(feeder, strict=True)
    while True:
        first = feeder.consumed
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            values, failure = None, str(exc)
        else:
            failure = None
        if values == []:
            result.blank_lines += 1
            continue
        row_lines = lines[first : feeder.consumed]
        raw = header_raw + b"\n" + _strip_terminator(b"".join(row_lines))
        if any(index in feeder.undecodable for index in range(first, feeder.consumed)):
            failure = "invalid UTF-8"
        result.records.append(_make_record(first + 1, raw, header, values, failure))
    logger.debug(
        "read CSV %s: %d rows accepted, %d rejected, %d blank lines",
        source,
        result.accepted,
        result.rejected,
        result.blank_lines,
    )
    return result


def _make_record(
    line: int,
    raw: bytes,
    header: tuple[str, ...],
    values: list[str] | None,
    failure: str | None,
) -> CsvRecord:
    if failure is None and values is not None and len(values) != len(header):
        failure = f"expected {len(header)} fields, got {len(values)}"
    if failure is not None or values is None:
        return CsvRecord(
            line=line, raw=raw, fields=None, error=f"line {line}: {failure}"
        )
    return CsvRecord(line=line, raw=raw, fields=dict(zip(header, values, strict=True)))
