"""Find the field a work item is about in its raw message, to show it highlighted.

Work items carry a reason code and a detail text, not a field path. The
field is found, in order, from

1. an HL7 v2 ERR-2 location at the start of the detail (``FT1^1^10: ...``),
   which parse errors carry;
2. the HL7 v2 field each reason code is about (unknown_code: FT1-7, units:
   FT1-10, date: FT1-4, encounter: PV1-19, ...), in the FT1 segments of the
   services the item holds;
3. for FHIR JSON and Synthea CSV, the value of the held service's field
   (code, quantity, date or encounter id) where it appears as a JSON value
   or a CSV cell.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_VIEW_CHARS = 256 * 1024
"""Characters of a raw message shown; the rest is cut with a note."""

HL7_FIELDS_BY_REASON: dict[str, tuple[tuple[str, int], ...]] = {
    "unknown_code": (("FT1", 7), ("FT1", 25)),
    "code_not_billable": (("FT1", 7), ("FT1", 25)),
    "price_missing": (("FT1", 7),),
    "revenue_code_missing": (("FT1", 7),),
    "department_unmapped": (("FT1", 7),),
    "unknown_item": (("FT1", 7),),
    "lot_or_serial_missing": (("FT1", 7),),
    "units_not_positive": (("FT1", 10),),
    "units_too_high": (("FT1", 10),),
    "units_not_whole": (("FT1", 10),),
    "date_missing": (("FT1", 4),),
    "date_out_of_range": (("FT1", 4),),
    "amount_mismatch": (("FT1", 11), ("FT1", 12)),
    "amount_invalid": (("FT1", 11), ("FT1", 12)),
    "amount_too_high": (("FT1", 11), ("FT1", 12)),
    "currency_mismatch": (("FT1", 11), ("FT1", 12)),
    "service_key_conflict": (("FT1", 2),),
    "encounter_not_found": (("PV1", 19),),
    "encounter_patient_conflict": (("PV1", 19), ("PID", 3)),
    "control_id_reused": (("MSH", 10),),
}
"""The HL7 v2 fields each reason code points at (segment id, field number)."""

RECORD_FIELD_BY_REASON: dict[str, str] = {
    "unknown_code": "code", "code_not_billable": "code", "price_missing": "code", "revenue_code_missing": "code",
    "department_unmapped": "code", "unknown_item": "code", "lot_or_serial_missing": "code",
    "units_not_positive": "quantity", "units_too_high": "quantity",
    "units_not_whole": "quantity", "date_out_of_range": "service_date",
    "encounter_not_found": "encounter_id", "encounter_patient_conflict": "encounter_id",
}
"""The field of a held service or supply usage that each reason code is about."""

_ERR_LOCATION = re.compile(r"^([A-Z][A-Z0-9]{2})\^(\d+)\^(\d+)")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Span:
    """A run of text in one line, marked or not."""

    text: str
    marked: bool


@dataclass
class RawView:
    """A raw message split into lines of spans, with the fields that were marked."""

    lines: list[list[Span]] = field(default_factory=list)
    marked_fields: list[str] = field(default_factory=list)
    truncated: bool = False

    @property
    def marked(self) -> bool:
        return any(span.marked for line in self.lines for span in line)


def _spans(line: str, ranges: Iterable[tuple[int, int]]) -> list[Span]:
    merged: list[list[int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    spans, position = [], 0
    for start, end in merged:
        if start > position:
            spans.append(Span(line[position:start], False))
        spans.append(Span(line[start:end], True))
        position = end
    if position < len(line) or not spans:
        spans.append(Span(line[position:], False))
    return spans


def _hl7_field_range(line: str, separator: str, number: int) -> tuple[int, int] | None:
    """Return the character range of field ``number`` of one segment line."""
    # MSH-1 is the separator itself, so MSH-n is the (n-1)th piece after the id.
    index = number - 1 if line.startswith("MSH") else number
    start = 0
    for _ in range(index):
        found = line.find(separator, start)
        if found < 0:
            return None
        start = found + 1
    end = line.find(separator, start)
    return start, len(line) if end < 0 else end


def _hl7_ranges(lines: Sequence[str], reason: str, detail: str,
                records: Sequence[dict[str, Any]]) -> tuple[dict[int, list], list[str]]:
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 4:
        return {}, []
    separator = lines[0][3]
    wanted: list[tuple[str, int, int | None]] = []  # segment, field, occurrence
    located = _ERR_LOCATION.match(detail or "")
    if located:
        wanted.append((located.group(1), int(located.group(3)), int(located.group(2))))
    else:
        wanted.extend((seg, number, None) for seg, number in
                      HL7_FIELDS_BY_REASON.get(reason, ()))
    keys = [str(record.get("service_key") or record.get("usage_key") or "")
            for record in records]
    ranges: dict[int, list] = {}
    names: list[str] = []
    for segment, number, occurrence in wanted:
        candidates = [i for i, line in enumerate(lines)
                      if line.startswith(segment + separator) or line == segment]
        if occurrence is not None:
            candidates = candidates[occurrence - 1:occurrence]
        elif segment == "FT1" and keys:
            candidates = [i for i in candidates if _ft1_held(lines[i], separator, keys)] \
                or candidates
        for index in candidates:
            found = _hl7_field_range(lines[index], separator, number)
            if found is not None and found[1] > found[0]:
                ranges.setdefault(index, []).append(found)
                if f"{segment}-{number}" not in names:
                    names.append(f"{segment}-{number}")
    return ranges, names


def _ft1_held(line: str, separator: str, keys: Sequence[str]) -> bool:
    """Return whether an FT1 line is one of the held services (by FT1-2 or set id)."""
    fields = line.split(separator)
    transaction = fields[2].split("^")[0] if len(fields) > 2 else ""
    set_id = fields[1] if len(fields) > 1 else ""
    for key in keys:
        if transaction and key.endswith(":" + transaction):
            return True
        if set_id and key.endswith(":FT1:" + set_id):
            return True
    return False


def _value_texts(records: Sequence[dict[str, Any]], reason: str) -> list[str]:
    name = RECORD_FIELD_BY_REASON.get(reason)
    if name is None:
        return []
    values = []
    for record in records:
        value = record.get(name)
        if value is None:
            continue
        text = value.isoformat() if hasattr(value, "isoformat") else str(value)
        if text and text not in values:
            values.append(text)
    return values


def _value_ranges(lines: Sequence[str], fmt: str,
                  values: Sequence[str]) -> dict[int, list]:
    """Mark ``values`` as whole JSON values or CSV cells (a date also as a cell prefix)."""
    ranges: dict[int, list] = {}
    for value in values:
        escaped = re.escape(value)
        if fmt == "fhir-json":
            pattern = re.compile(rf'(?<=")({escaped})(?=")|(?<=: )({escaped})(?=[,\s}}]|$)')
        else:
            pattern = re.compile(rf"(?<![^,])({escaped}[^,]*)(?![^,])" if re.fullmatch(
                r"\d{4}-\d{2}-\d{2}", value) else rf"(?<![^,])({escaped})(?![^,])")
        for index, line in enumerate(lines):
            for match in pattern.finditer(line):
                ranges.setdefault(index, []).append(match.span())
    return ranges


def raw_view(raw: bytes, fmt: str, reason: str, detail: str,
             records: Sequence[dict[str, Any]]) -> RawView:
    """Split ``raw`` into lines and mark the field the work item is about."""
    text = raw.decode("utf-8", errors="replace")
    truncated = len(text) > MAX_VIEW_CHARS
    lines = _LINE_BREAK.split(text[:MAX_VIEW_CHARS])
    if lines and lines[-1] == "":
        lines.pop()
    names: list[str] = []
    if fmt.startswith("hl7v2"):
        ranges, names = _hl7_ranges(lines, reason, detail, records)
    else:
        values = _value_texts(records, reason)
        ranges = _value_ranges(lines, fmt, values)
        names = [f"{RECORD_FIELD_BY_REASON[reason]} {value}" for value in values] \
            if ranges else []
    view = RawView(truncated=truncated, marked_fields=names)
    view.lines = [_spans(line, ranges.get(index, ())) for index, line in enumerate(lines)]
    return view
