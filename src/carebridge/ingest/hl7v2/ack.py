"""Build HL7 v2 acknowledgements (ACK) in original and enhanced mode.

An ACK answers one inbound message (HL7 v2.5 chapter 2, sections 2.9.2 and
2.9.3). It is written with the inbound message's own delimiters, and the
fields it echoes (MSH-3 to MSH-6, MSH-10 to MSH-12, MSH-18) are copied byte
for byte: the header line is viewed through Latin-1, which maps every byte
to one character and back, so the ACK carries the sender's character set
without decoding it. Text that carebridge adds is ASCII.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from carebridge.ingest.hl7v2.escapes import DEFAULT_DELIMITERS, Delimiters, escape

AA, AE, AR = "AA", "AE", "AR"
"""Original-mode acknowledgement codes (HL7 table 0008)."""

ENHANCED_CODES = {AA: "CA", AE: "CE", AR: "CR"}
"""Enhanced-mode accept acknowledgement code for each original-mode code."""

TABLE_0357 = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}
"""HL7 table 0357, message error condition codes (v2.5)."""

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class AckError:
    """One ERR segment: where, which table 0357 code, how severe, and why.

    Attributes:
        code: An HL7 table 0357 code.
        location: ERR-2 with ``^`` between parts (``MSH^1^9^1^1``), or None.
        text: ERR-8, a short ASCII explanation without message content.
        severity: ERR-4: ``E`` (error), ``W`` (warning) or ``I`` (information).
    """

    code: int
    location: str | None
    text: str
    severity: str = "E"


class MshEcho:
    """The inbound MSH segment, byte-exact, for the fields an ACK copies.

    A header that cannot be read (no MSH, odd delimiters) still gives an
    echo: default delimiters and empty fields, so that a NAK can be sent.
    """

    __slots__ = ("delimiters", "encoding_characters", "fields")

    def __init__(self, payload: bytes) -> None:
        body = payload[len(_BOM) :] if payload.startswith(_BOM) else payload
        end = len(body)
        for terminator in (b"\r", b"\n"):
            found = body.find(terminator, 0, end)
            if found >= 0:
                end = found
        line = body[:end].decode("latin-1")
        self.fields: list[str] = []
        self.encoding_characters = "^~\\&"
        self.delimiters: Delimiters = DEFAULT_DELIMITERS
        if line.startswith("MSH") and len(line) >= 8:
            separator = line[3]
            fields = line.split(separator)
            encoding = fields[1]
            if 4 <= len(encoding) <= 5 and separator not in encoding and (
                len(set(encoding)) == len(encoding)
            ):
                self.fields = fields
                self.encoding_characters = encoding
                component, repetition, esc, sub = encoding[:4]
                truncation = encoding[4] if len(encoding) == 5 else None
                self.delimiters = Delimiters(
                    separator, component, repetition, esc, sub, truncation
                )

    def field(self, number: int) -> str:
        """Return MSH-``number`` exactly as sent (all components), or ``""``."""
        if number < 3 or number - 1 >= len(self.fields):
            return ""
        return self.fields[number - 1]

    def component(self, number: int, component: int = 1) -> str:
        """Return one component of MSH-``number``'s first repetition."""
        value = self.field(number).split(self.delimiters.repetition, 1)[0]
        parts = value.split(self.delimiters.component)
        return parts[component - 1].strip() if component <= len(parts) else ""

    @property
    def enhanced(self) -> bool:
        """Whether MSH-15 or MSH-16 asks for enhanced-mode acknowledgement."""
        return bool(self.component(15) or self.component(16))

    @property
    def accept_ack_type(self) -> str:
        """MSH-15 (HL7 table 0155); an empty MSH-15 is read as ``AL``."""
        return self.component(15).upper() or "AL"


def hl7_timestamp(moment: dt.datetime) -> str:
    """Format ``moment`` as an HL7 DTM in UTC, e.g. ``20240501120000+0000``."""
    if moment.tzinfo is None:
        # SQLite returns naive values; carebridge writes them in UTC.
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S+0000")


def build_ack(
    echo: MshEcho,
    *,
    code: str,
    control_id: str,
    timestamp: dt.datetime,
    errors: tuple[AckError, ...] = (),
) -> bytes:
    """Build the ACK for the message whose header is ``echo``.

    Args:
        echo: The inbound header.
        code: ``AA``, ``AE`` or ``AR``; in enhanced mode it is sent as
            ``CA``, ``CE`` or ``CR``.
        control_id: MSH-10 of the ACK itself.
        timestamp: MSH-7 of the ACK.
        errors: One ERR segment each, in order.

    Returns:
        The ACK's bytes, segments ended by CR, without MLLP framing.
    """
    d = echo.delimiters
    sep = d.field
    if echo.enhanced:
        code = ENHANCED_CODES[code]
    trigger = echo.component(9, 2)
    msh = [
        "MSH", echo.encoding_characters,
        echo.field(5), echo.field(6), echo.field(3), echo.field(4),
        hl7_timestamp(timestamp), "",
        # The ACK's MSH-9 repeats the inbound trigger (chapter 2, ACK message).
        d.component.join(("ACK", trigger, "ACK")) if trigger else "ACK",
        escape(control_id, d), echo.field(11) or "P", echo.field(12) or "2.5",
        "", "", "", "", "", echo.field(18),
    ]
    while msh[-1] == "":
        msh.pop()
    segments = [sep.join(msh), sep.join(("MSA", code, echo.field(10)))]
    segments.extend(_err_segment(error, d) for error in errors)
    return ("\r".join(segments) + "\r").encode("latin-1")


def _err_segment(error: AckError, d: Delimiters) -> str:
    """Lay out one v2.5 ERR segment: ERR-2 location, ERR-3 code, ERR-4, ERR-8."""
    location = d.component.join((error.location or "").split("^"))
    name = TABLE_0357.get(error.code, "")
    condition = d.component.join((str(error.code), escape(name, d), "HL70357"))
    text = error.text.encode("ascii", "backslashreplace").decode("ascii")
    return d.field.join(
        ("ERR", "", location, condition, error.severity, "", "", "", escape(text, d))
    )
