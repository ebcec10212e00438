"""Write X12 005010 segments and the ISA/GS/ST envelope around them.

X12 has no escape mechanism, so a value that contains a delimiter cannot be
written at all: :class:`SegmentWriter` raises :class:`X12DataError` naming
the element, never the value, because claim data is PHI.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

ELEMENT = "*"
COMPONENT = ":"
REPETITION = "^"
SEGMENT = "~"
DELIMITERS = frozenset(ELEMENT + COMPONENT + REPETITION + SEGMENT)

Element = str | Sequence[str] | None
"""An element: a simple value, a composite given as its components, or empty."""


class X12DataError(ValueError):
    """A value cannot be written into an X12 segment (delimiter, length, blank)."""


def x12_amount(amount: Decimal) -> str:
    """Format a monetary amount as an X12 ``R`` value: ``164.3``, ``125``, ``-12.5``.

    Trailing zeros are dropped, as the 837 guides allow, and the result never
    uses an exponent.
    """
    text = format(amount.normalize(), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def x12_quantity(quantity: Decimal) -> str:
    """Format a unit count as an X12 ``R`` value."""
    return x12_amount(quantity)


def x12_date(value: dt.date) -> str:
    """Format a date as CCYYMMDD."""
    return value.strftime("%Y%m%d")


@dataclass(frozen=True, slots=True)
class Envelope:
    """Interchange and group headers of one 837 file."""

    sender_id: str
    receiver_id: str
    control_number: int
    usage_indicator: str
    version: str  # GS08 / ST03, e.g. 005010X222A1
    created_at: dt.datetime


class SegmentWriter:
    """Collects segments, checking every value against the delimiters."""

    def __init__(self) -> None:
        self.segments: list[str] = []

    def add(self, segment_id: str, *elements: Element) -> None:
        """Append a segment; trailing empty elements are dropped."""
        texts = [self._element(segment_id, position, value)
                 for position, value in enumerate(elements, start=1)]
        while texts and texts[-1] == "":
            texts.pop()
        self.segments.append(ELEMENT.join([segment_id, *texts]))

    def count_from(self, start: int) -> int:
        """Return how many segments were added since index ``start``, inclusive."""
        return len(self.segments) - start

    @staticmethod
    def _element(segment_id: str, position: int, value: Element) -> str:
        if value is None:
            return ""
        components = [value] if isinstance(value, str) else list(value)
        for component in components:
            if DELIMITERS.intersection(component):
                raise X12DataError(
                    f"{segment_id}{position:02d} contains an X12 delimiter "
                    f"({' '.join(sorted(DELIMITERS))}); correct the source data"
                )
        while components and components[-1] == "":
            components.pop()
        return COMPONENT.join(components)


def _fixed(value: str, width: int, name: str) -> str:
    if len(value) > width:
        raise X12DataError(f"{name} is longer than {width} characters")
    if DELIMITERS.intersection(value):
        raise X12DataError(f"{name} contains an X12 delimiter")
    return value.ljust(width)


def wrap_interchange(envelope: Envelope, transaction: SegmentWriter) -> str:
    """Return the interchange text: ISA, GS, the ST..SE set of ``transaction``, GE, IEA.

    ``transaction`` contains the segments from ST to just before SE, and the
    SE segment count is computed here. One segment per line, each ended by ``~``.
    """
    control = envelope.control_number
    if not 0 < control < 10**9:
        raise X12DataError("interchange control number must be 1..999999999")
    created = envelope.created_at
    isa = ELEMENT.join(
        [
            "ISA", "00", " " * 10, "00", " " * 10,
            "ZZ", _fixed(envelope.sender_id, 15, "ISA06"),
            "ZZ", _fixed(envelope.receiver_id, 15, "ISA08"),
            created.strftime("%y%m%d"), created.strftime("%H%M"),
            REPETITION, "00501", f"{control:09d}", "0", envelope.usage_indicator,
            COMPONENT,
        ]
    )
    outer = SegmentWriter()
    outer.add(
        "GS", "HC", envelope.sender_id, envelope.receiver_id, x12_date(created.date()),
        created.strftime("%H%M"), str(control), "X", envelope.version,
    )
    segments = [isa, *outer.segments, *transaction.segments]
    trailer = SegmentWriter()
    st_control = transaction.segments[0].split(ELEMENT)[2]
    trailer.add("SE", str(len(transaction.segments) + 1), st_control)
    trailer.add("GE", "1", str(control))
    trailer.add("IEA", "1", f"{control:09d}")
    segments += trailer.segments
    return "".join(f"{segment}{SEGMENT}\n" for segment in segments)
