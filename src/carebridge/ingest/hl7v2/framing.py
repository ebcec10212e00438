"""Split an HL7 v2 file into messages, working on raw bytes only.

A file may hold one message or many, separated by CR, LF or CRLF (with blank
lines between them), wrapped in MLLP frames (``0x0B`` ... ``0x1C 0x0D``) or in
FHS/BHS ... BTS/FTS batch envelopes (HL7 v2.5 chapter 2, section 2.10.3).
Nothing is decoded here: the character set is only known once MSH-18 of each
message has been read, which is the parser's job.

Problems found at file level (bytes outside any message or frame, envelope
counts that do not match) never raise: they are listed in
:attr:`FileSplit.problems` so that the caller can keep the file for review and
still process the messages that were found.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

BOM = b"\xef\xbb\xbf"
MLLP_START = 0x0B
MLLP_END = 0x1C
_CR = 0x0D
_FILLER = b" \t\r\n\x00"
_LINE_END = b"\r\n"

# MSH/FHS/BHS are followed by their field separator, BTS/FTS by the
# separator or by the end of the line. Only matches that start a line count.
_MARKER = re.compile(rb"(MSH|FHS|BHS|BTS|FTS)(?![A-Za-z0-9])")


@dataclass(frozen=True, slots=True)
class RawHl7:
    """One message as it appeared in the file.

    Attributes:
        payload: The message bytes exactly as found, without MLLP framing,
            byte order mark or the blank lines that followed it.
        offset: Byte offset of the first payload byte in the file.
        warnings: Facts about how the message was framed, for the audit.
    """

    payload: bytes
    offset: int
    warnings: tuple[str, ...] = ()


@dataclass(slots=True)
class FileSplit:
    """The messages found in a file and the problems seen around them."""

    messages: list[RawHl7] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Envelope:
    """State of the FHS/BHS envelopes while a region is scanned."""

    separator: bytes = b"|"
    file_offset: int | None = None
    batches_in_file: int = 0
    batch_offset: int | None = None
    messages_in_batch: int = 0
    seen_message: bool = False


def split_file(data: bytes) -> FileSplit:
    """Split the bytes of an HL7 v2 file into messages.

    Args:
        data: The whole file, undecoded.

    Returns:
        The messages in file order and the file-level problems. An empty
        ``messages`` list always comes with at least one problem.
    """
    split = FileSplit()
    start = 0
    first_warnings: tuple[str, ...] = ()
    if data.startswith(BOM):
        start = len(BOM)
        first_warnings = ("UTF-8 BOM removed",)
    if not data[start:].strip(_FILLER):
        split.problems.append("empty file")
        return split
    if bytes([MLLP_START]) in data and bytes([MLLP_END]) in data:
        _split_frames(data, start, split, first_warnings)
    else:
        _split_region(data, start, len(data), split, first_warnings)
    if not split.messages:
        split.problems.append("no MSH segment found")
    return split


def _split_frames(
    data: bytes, start: int, split: FileSplit, first_warnings: tuple[str, ...]
) -> None:
    """Find the MLLP frames of ``data`` and split each one's content."""
    pos = start
    warnings = first_warnings
    while True:
        begin = data.find(MLLP_START, pos)
        gap_end = len(data) if begin < 0 else begin
        _report_gap(data, pos, gap_end, split, "outside MLLP frames")
        if begin < 0:
            return
        end = data.find(MLLP_END, begin + 1)
        restart = data.find(MLLP_START, begin + 1, len(data) if end < 0 else end)
        if restart >= 0:
            split.problems.append(
                f"MLLP frame at offset {begin} has no end block before the next "
                f"start block at offset {restart}; frame dropped"
            )
            pos = restart
            continue
        if end < 0:
            split.problems.append(
                f"MLLP frame at offset {begin} is not terminated (no 0x1C); "
                f"{len(data) - begin} bytes dropped"
            )
            return
        frame_warnings = list(warnings)
        content = begin + 1
        if data.startswith(BOM, content):
            content += len(BOM)
            frame_warnings.append("UTF-8 BOM removed")
        pos = end + 1
        if pos < len(data) and data[pos] == _CR:
            pos += 1
        else:
            frame_warnings.append("MLLP end block 0x1C not followed by 0x0D")
        _split_region(data, content, end, split, tuple(frame_warnings))
        warnings = ()


def _report_gap(
    data: bytes, start: int, end: int, split: FileSplit, where: str
) -> None:
    """Record a problem when ``data[start:end]`` contains more than filler."""
    gap = data[start:end]
    if not gap:
        return
    if gap.strip(_FILLER):
        split.problems.append(f"{len(gap)} bytes {where} at offset {start}")
    elif b"\x00" in gap:
        logger.debug("skipped %d filler bytes at offset %d", len(gap), start)


def _split_region(
    data: bytes,
    start: int,
    end: int,
    split: FileSplit,
    warnings: tuple[str, ...],
) -> None:
    """Split ``data[start:end]`` (no MLLP framing) at MSH and envelope lines."""
    env = _Envelope()
    cursor = start
    message_start: int | None = None
    for match in _MARKER.finditer(data, start, end):
        pos = match.start()
        if pos > start and data[pos - 1] not in _LINE_END:
            continue
        if message_start is not None:
            _emit(data, message_start, pos, split, warnings)
            warnings = ()
            message_start = None
        else:
            where = "outside any message" if env.seen_message else "before first MSH"
            _report_gap(data, cursor, pos, split, where)
        kind = match.group(1)
        if kind == b"MSH":
            message_start = pos
            env.seen_message = True
            env.messages_in_batch += 1
            continue
        line_end = _line_end(data, pos, end)
        _envelope_segment(kind, data[pos:line_end], pos, env, split)
        cursor = line_end
    if message_start is not None:
        _emit(data, message_start, end, split, warnings)
    else:
        where = "outside any message" if env.seen_message else "before first MSH"
        _report_gap(data, cursor, end, split, where)
    _close_envelopes(env, split)


def _line_end(data: bytes, pos: int, end: int) -> int:
    """Return the offset just after the line that starts at ``pos``."""
    cr = data.find(b"\r", pos, end)
    lf = data.find(b"\n", pos, end)
    stops = [i for i in (cr, lf) if i >= 0]
    return min(stops) + 1 if stops else end


def _emit(
    data: bytes, start: int, end: int, split: FileSplit, warnings: tuple[str, ...]
) -> None:
    """Add ``data[start:end]`` as a message, without the trailing blank lines."""
    stop = end
    while stop > start and data[stop - 1] in _LINE_END:
        stop -= 1
    # Keep the last segment's own terminator: it is part of the message.
    if data[stop : stop + 2] == b"\r\n":
        stop += 2
    elif stop < end:
        stop += 1
    split.messages.append(RawHl7(data[start:stop], start, warnings))


def _envelope_segment(
    kind: bytes, line: bytes, pos: int, env: _Envelope, split: FileSplit
) -> None:
    """Update the envelope state for one FHS, BHS, BTS or FTS line."""
    if kind == b"FHS":
        if env.file_offset is not None:
            split.problems.append(f"second FHS at offset {pos}")
        env.file_offset = pos
        env.batches_in_file = 0
        env.separator = line[3:4] or b"|"
    elif kind == b"BHS":
        if env.batch_offset is not None:
            split.problems.append(
                f"BHS at offset {pos} opens a batch before BTS closed the batch "
                f"at offset {env.batch_offset}"
            )
        env.batch_offset = pos
        env.messages_in_batch = 0
        env.batches_in_file += 1
        env.separator = line[3:4] or b"|"
    elif kind == b"BTS":
        if env.batch_offset is None:
            split.problems.append(f"BTS at offset {pos} without BHS")
            return
        _check_count(line, env, env.messages_in_batch, "BTS", "messages", split)
        env.batch_offset = None
    else:
        if env.batch_offset is not None:
            split.problems.append(
                f"FTS at offset {pos} while the batch at offset "
                f"{env.batch_offset} is still open"
            )
            env.batch_offset = None
        if env.file_offset is None:
            split.problems.append(f"FTS at offset {pos} without FHS")
            return
        _check_count(line, env, env.batches_in_file, "FTS", "batches", split)
        env.file_offset = None


def _check_count(
    line: bytes, env: _Envelope, found: int, seg: str, noun: str, split: FileSplit
) -> None:
    """Compare BTS-1 (messages) or FTS-1 (batches) with what was found."""
    fields = line.rstrip(_LINE_END).split(env.separator)
    text = fields[1].strip() if len(fields) > 1 else b""
    if not text:
        return
    if not text.isdigit():
        split.problems.append(f"{seg}-1 count is not a number")
        return
    declared = int(text)
    if declared != found:
        split.problems.append(f"{seg}-1 declares {declared} {noun}, found {found}")


def _close_envelopes(env: _Envelope, split: FileSplit) -> None:
    """Report envelopes still open at the end of the region."""
    if env.batch_offset is not None:
        split.problems.append(f"batch opened at offset {env.batch_offset} has no BTS")
    if env.file_offset is not None:
        split.problems.append(f"file header at offset {env.file_offset} has no FTS")
