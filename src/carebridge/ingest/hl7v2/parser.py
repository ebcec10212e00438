"""Parse one HL7 v2 message (bytes) into an :class:`Hl7Message`.

python-hl7 does the splitting into segments, fields, repetitions, components
and subcomponents. This module covers what it leaves to the caller or gets
wrong:

* decoding follows MSH-18, and undecodable bytes raise instead of turning
  into U+FFFD;
* LF and CRLF segment terminators are normalised before splitting;
* leaves are unescaped after splitting, with a correct ``\\E\\`` decoder;
* ``""`` (explicit null) is reported as :data:`carebridge.model.NULL`;
* the header is checked, and errors carry an ERR-2 style location.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterator

import hl7

from carebridge.errors import ParseError
from carebridge.ingest.hl7v2.escapes import (
    Delimiters,
    unescape_with_warnings,
)
from carebridge.model.records import NULL, Null

BOM = b"\xef\xbb\xbf"
NON_CR_TERMINATOR = "non-CR segment terminator"

# HL7 table 0211 (alternate character sets) plus spellings seen in the wild.
_CHARSETS = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "latin-1",
    "ISO IR100": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "ISO IR192": "utf-8",
    "UTF-8": "utf-8",
}

_ADDRESS = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d+)(?:\.(\d+))?(?:\.(\d+))?$")
_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_EXPLICIT_NULL = '""'

Value = str | None | Null


def location(
    seg_id: str,
    sequence: int,
    field: int | None = None,
    repetition: int | None = None,
    component: int | None = None,
    subcomponent: int | None = None,
) -> str:
    """Build an ERR-2 style error location, e.g. ``FT1^2^10``.

    Args:
        seg_id: Segment ID.
        sequence: 1-based occurrence of the segment in the message.
        field: Field number, if the error is inside a field.
        repetition: 1-based repetition number.
        component: Component number.
        subcomponent: Subcomponent number.

    Returns:
        The location, omitting trailing parts that were not given.
    """
    parts = [seg_id, sequence, field, repetition, component, subcomponent]
    while parts[-1] is None:
        parts.pop()
    return "^".join("" if p is None else str(p) for p in parts)


class Hl7Segment:
    """One segment of a parsed message, with typed leaf access."""

    __slots__ = ("_seg", "_message", "seg_id", "position", "sequence")

    def __init__(
        self, seg: hl7.Segment, message: Hl7Message, position: int, sequence: int
    ) -> None:
        self._seg = seg
        self._message = message
        self.seg_id: str = str(seg[0])
        self.position = position
        self.sequence = sequence

    def __repr__(self) -> str:
        return f"<Hl7Segment {self.seg_id} #{self.sequence}>"

    def value(
        self,
        field: int,
        component: int = 1,
        subcomponent: int = 1,
        *,
        repetition: int = 0,
    ) -> Value:
        """Return one leaf of this segment, unescaped.

        Args:
            field: Field number (MSH-1 is the field separator).
            component: 1-based component number.
            subcomponent: 1-based subcomponent number.
            repetition: 0-based repetition index.

        Returns:
            The text; ``None`` when the leaf is absent or empty; ``NULL`` when
            the field was sent as ``""`` (present but null).
        """
        raw = self.raw(field, component, subcomponent, repetition=repetition)
        if raw is None or raw == "":
            return None
        if raw == _EXPLICIT_NULL:
            return NULL
        if self.seg_id == "MSH" and field <= 2:
            return raw
        msg = self._message
        return unescape_with_warnings(raw, msg.delimiters, charset=msg.charset)[0]

    def raw(
        self,
        field: int,
        component: int = 1,
        subcomponent: int = 1,
        *,
        repetition: int = 0,
    ) -> str | None:
        """Return one leaf exactly as sent (escapes not decoded), or None."""
        if field < 1 or field >= len(self._seg):
            return None
        node: object = self._seg[field]
        # A field sent as "" is null as a whole, whatever component is asked.
        if repetition == 0 and len(node) == 1 and node[0] == _EXPLICIT_NULL:  # type: ignore[arg-type,index]
            return _EXPLICIT_NULL
        # python-hl7 stops splitting where no delimiter is left, so a level
        # may already be a plain string: it then represents its first child.
        for index in (repetition, component - 1, subcomponent - 1):
            if isinstance(node, str):
                if index:
                    return None
                continue
            if index < 0 or index >= len(node):  # type: ignore[arg-type]
                return None
            node = node[index]  # type: ignore[index]
        return node if isinstance(node, str) else None

    def components(self, field: int, *, repetition: int = 0) -> list[Value]:
        """Return each component of one repetition (its first subcomponent)."""
        if field < 1 or field >= len(self._seg):
            return []
        node: object = self._seg[field]
        for index in (repetition,):
            if not isinstance(node, str):
                if index >= len(node):  # type: ignore[arg-type]
                    return []
                node = node[index]  # type: ignore[index]
        count = 1 if isinstance(node, str) else len(node)  # type: ignore[arg-type]
        return [self.value(field, c, repetition=repetition) for c in range(1, count + 1)]

    def repetitions(self, field: int) -> int:
        """Return how many repetitions field ``field`` contains (0 if empty)."""
        if field < 1 or field >= len(self._seg):
            return 0
        node = self._seg[field]
        if len(node) == 1 and isinstance(node[0], str):
            return 1 if node[0] else 0
        return len(node)

    def location(self, field: int | None = None, **parts: int) -> str:
        """Return the ERR-2 location of this segment or one of its fields."""
        return location(self.seg_id, self.sequence, field, **parts)


class Hl7Message:
    """A parsed HL7 v2 message; build it with :func:`parse_message`.

    MSH is split when the message is built; the other segments are split by
    python-hl7 when first asked for. Most of a message's parsing cost is in
    segments that finance never reads (an ORU's observations), and a
    message of a type that is not mapped is only ever asked for its header.
    """

    def __init__(
        self,
        texts: list[str],
        delimiters: Delimiters,
        charset: str,
        warnings: list[str],
    ) -> None:
        self.delimiters = delimiters
        self.charset = charset
        self._warnings = warnings
        self._texts = texts
        self._header_segment = Hl7Segment(_python_hl7_parse(texts[:1])[0], self, 0, 1)
        self._parsed: list[Hl7Segment] | None = None
        self._parsed_by_id: dict[str, list[Hl7Segment]] = {}

    @property
    def _segments(self) -> list[Hl7Segment]:
        if self._parsed is None:
            self._parse_all()
        return self._parsed  # type: ignore[return-value]

    @property
    def _by_id(self) -> dict[str, list[Hl7Segment]]:
        if self._parsed is None:
            self._parse_all()
        return self._parsed_by_id

    def _parse_all(self) -> None:
        parsed: list[Hl7Segment] = []
        by_id: dict[str, list[Hl7Segment]] = {}
        for position, seg in enumerate(_python_hl7_parse(self._texts)):
            seg_id = str(seg[0])
            same = by_id.setdefault(seg_id, [])
            segment = Hl7Segment(seg, self, position, len(same) + 1)
            same.append(segment)
            parsed.append(segment)
        self._parsed, self._parsed_by_id = parsed, by_id

    @property
    def warnings(self) -> tuple[str, ...]:
        """Facts about the input that did not stop parsing."""
        return tuple(self._warnings)

    @property
    def segment_ids(self) -> tuple[str, ...]:
        """Segment IDs in message order."""
        return tuple(s.seg_id for s in self._segments)

    def all_segments(self) -> list[Hl7Segment]:
        """Return every segment in message order."""
        return list(self._segments)

    def segments(self, seg_id: str) -> list[Hl7Segment]:
        """Return the segments with ID ``seg_id``, in message order."""
        return list(self._by_id.get(seg_id, ()))

    def value(
        self, address: str, *, segment_index: int = 0, repetition: int = 0
    ) -> Value:
        """Return the leaf at ``address`` (e.g. ``"PID-5.2"``), unescaped.

        Args:
            address: ``SEG-field[.component[.subcomponent]]``; a shorter
                address means the first component and subcomponent.
            segment_index: 0-based occurrence of the segment.
            repetition: 0-based repetition of the field.

        Returns:
            The text, ``None`` when absent or empty, ``NULL`` for ``""``.

        Raises:
            ValueError: ``address`` is not a valid field address.
        """
        seg_id, field, component, sub = _parse_address(address)
        found = self._by_id.get(seg_id)
        if not found or segment_index >= len(found):
            return None
        return found[segment_index].value(field, component, sub, repetition=repetition)

    def _header(self, field: int, component: int = 1) -> str | None:
        value = self._header_segment.value(field, component)
        return value if isinstance(value, str) else None

    @property
    def control_id(self) -> str:
        """MSH-10, the message control ID (checked present at parse time)."""
        return self._header(10) or ""

    @property
    def message_code(self) -> str:
        """MSH-9.1, e.g. ``DFT`` (checked present at parse time)."""
        return self._header(9) or ""

    @property
    def trigger(self) -> str | None:
        """MSH-9.2, e.g. ``P03``."""
        return self._header(9, 2)

    @property
    def structure(self) -> str | None:
        """MSH-9.3, e.g. ``DFT_P03``."""
        return self._header(9, 3)

    @property
    def version(self) -> str | None:
        """MSH-12.1, e.g. ``2.5``."""
        return self._header(12)

    @property
    def processing_id(self) -> str | None:
        """MSH-11.1: P (production), T (training) or D (debugging)."""
        return self._header(11)

    @property
    def sending_application(self) -> str | None:
        """MSH-3.1."""
        return self._header(3)

    @property
    def sending_facility(self) -> str | None:
        """MSH-4.1."""
        return self._header(4)


@functools.lru_cache(maxsize=512)
def _parse_address(address: str) -> tuple[str, int, int, int]:
    match = _ADDRESS.match(address)
    if not match:
        raise ValueError(f"not an HL7 field address: {address!r}")
    seg_id, field, comp, sub = match.groups()
    return seg_id, int(field), int(comp or 1), int(sub or 1)


def parse_message(payload: bytes, *, default_charset: str = "ascii") -> Hl7Message:
    """Parse the bytes of one HL7 v2 message.

    Args:
        payload: One message, as framed by
            :func:`carebridge.ingest.hl7v2.framing.split_file` or an MLLP
            receiver.
        default_charset: Character set used when MSH-18 is empty: an HL7
            table 0211 name (``8859/1``) or a Python codec name. HL7 v2.5
            says ASCII.

    Returns:
        The parsed message; its ``warnings`` list what was repaired.

    Raises:
        ParseError: The message cannot be decoded or has no usable MSH; the
            error's ``location`` follows ERR-2 (``MSH^1^9``).
    """
    warnings: list[str] = []
    bom = payload.startswith(BOM)
    body = payload[len(BOM) :] if bom else payload
    charset = _choose_charset(body, bom, default_charset, warnings)
    text = _decode(body, charset, len(BOM) if bom else 0)
    segments = _split_segments(text, warnings)
    delimiters = _check_header(segments)
    _check_embedded_segments(segments, delimiters)
    message = Hl7Message(segments, delimiters, charset, warnings)
    _check_required(message)
    _check_truncation(message, warnings)
    _check_segment_ids(segments, delimiters, warnings)
    warnings.extend(_escape_warnings(segments, message.delimiters, charset))
    return message


def _choose_charset(
    body: bytes, bom: bool, default_charset: str, warnings: list[str]
) -> str:
    """Pick the codec from MSH-18, the BOM or the channel default."""
    declared = _declared_charset(body)
    if declared:
        codec = _CHARSETS.get(declared.upper())
        if codec is None:
            raise ParseError(
                f"unsupported character set {declared!r} in MSH-18",
                location="MSH^1^18",
            )
        if bom and codec != "utf-8":
            warnings.append(f"UTF-8 BOM ignored: MSH-18 declares {declared}")
        return codecs.lookup(codec).name
    if bom:
        warnings.append("UTF-8 BOM removed; decoded as UTF-8")
        return "utf-8"
    name = _CHARSETS.get(default_charset.upper(), default_charset)
    try:
        return codecs.lookup(name).name
    except LookupError as exc:
        raise ValueError(f"unknown default charset {default_charset!r}") from exc


def _declared_charset(body: bytes) -> str | None:
    """Read MSH-18 (first repetition, first component) before decoding."""
    end = len(body)
    for terminator in (b"\r", b"\n"):
        found = body.find(terminator)
        if 0 <= found < end:
            end = found
    # Latin-1 maps every byte to one character, so offsets stay valid and
    # the ASCII delimiters are found whatever the real charset is.
    header = body[:end].decode("latin-1")
    if not header.startswith("MSH") or len(header) < 8:
        return None
    fields = header.split(header[3])
    if len(fields) < 18:
        return None
    encoding = fields[1]
    value = fields[17]
    if len(encoding) >= 2:
        value = value.split(encoding[1])[0]
    value = value.split(encoding[:1] or "^")[0].strip()
    return value or None


def _decode(body: bytes, charset: str, base_offset: int) -> str:
    """Decode strictly; a bad byte raises with its offset and the charset."""
    try:
        return body.decode(charset)
    except UnicodeDecodeError as exc:
        offset = base_offset + exc.start
        raise ParseError(
            f"byte 0x{body[exc.start]:02X} at payload offset {offset} is not "
            f"valid {charset}",
            location="MSH^1^18",
        ) from exc


def _split_segments(text: str, warnings: list[str]) -> list[str]:
    """Split at segment terminators (CR, LF or CRLF).

    If the message contains no CR at all, LF is the terminator; otherwise a LF
    right after a CR is dropped and any other LF is data. Trailing
    terminators and empty segments are dropped.
    """
    body = text.rstrip("\r\n")
    tail = text[len(body) :]
    if "\r" not in body:
        terminator = "\n"
        non_cr = "\n" in body or "\n" in tail
    else:
        terminator = "\r"
        non_cr = "\r\n" in body or "\n" in tail
        if "\r\n" in body:
            body = body.replace("\r\n", "\r")
    if non_cr:
        warnings.append(NON_CR_TERMINATOR)
    segments = body.split(terminator)
    non_empty = [s for s in segments if s.strip()]
    if len(non_empty) != len(segments):
        warnings.append(f"{len(segments) - len(non_empty)} empty segment(s) dropped")
    return non_empty


def _check_embedded_segments(segments: list[str], delimiters: Delimiters) -> None:
    """Raise if a LF kept as data starts what looks like another segment.

    In a message that uses CR, a lone LF is data, but a LF followed by a
    segment ID and the field separator is a terminator the sender got wrong.
    Reading it as data would hide that segment inside a field value (a lost
    FT1 is a lost charge), so the message is rejected instead.
    """
    pattern = re.compile(r"\n([A-Z][A-Z0-9]{2})" + re.escape(delimiters.field))
    counts: dict[str, int] = {}
    for segment in segments:
        seg_id = segment[:3]
        counts[seg_id] = counts.get(seg_id, 0) + 1
        match = pattern.search(segment)
        if match:
            raise ParseError(
                f"a line feed inside {seg_id} is followed by {match.group(1)!r} and "
                "the field separator, which looks like a segment; segments must "
                "end with CR, so fix the sender's segment terminators",
                location=f"{seg_id}^{counts[seg_id]}",
            )


def _check_header(segments: list[str]) -> Delimiters:
    """Check MSH-1 and MSH-2 and return the delimiters they declare."""
    if not segments:
        raise ParseError("empty message", location="MSH^1")
    msh = segments[0]
    if not msh.startswith("MSH"):
        raise ParseError("first segment is not MSH", location="MSH^1")
    if len(msh) < 8:
        raise ParseError("MSH segment too short", location="MSH^1")
    sep = msh[3]
    if sep.isalnum() or sep.isspace():
        raise ParseError("invalid field separator", location="MSH^1^1")
    end = msh.find(sep, 4)
    encoding = msh[4:] if end < 0 else msh[4:end]
    if not 4 <= len(encoding) <= 5:
        raise ParseError(
            f"MSH-2 must hold 4 or 5 encoding characters, not {len(encoding)}",
            location="MSH^1^2",
        )
    chars = sep + encoding
    if len(set(chars)) != len(chars) or any(c.isalnum() or c.isspace() for c in chars):
        raise ParseError(
            f"MSH-2 {encoding!r} repeats a character or uses a letter, digit or space",
            location="MSH^1^2",
        )
    component, repetition, esc, sub = encoding[:4]
    truncation = encoding[4] if len(encoding) == 5 else None
    return Delimiters(sep, component, repetition, esc, sub, truncation)


def _python_hl7_parse(segments: list[str]) -> hl7.Message:
    """Split with python-hl7, keeping what its ``str.strip()`` would lose."""
    text = "\r".join(segments)
    if not text[-1].isspace():
        return hl7.parse(text)
    # python-hl7 strips the whole message, which would eat trailing spaces
    # of the last field; a throw-away last segment protects them.
    parsed = hl7.parse(text + "\rZZZ")
    del parsed[-1]
    return parsed


def _check_required(message: Hl7Message) -> None:
    """MSH-9 and MSH-10 are required to route and acknowledge a message."""
    if not message.message_code:
        raise ParseError("MSH-9 message type is missing", location="MSH^1^9")
    if not message.control_id:
        raise ParseError("MSH-10 message control ID is missing", location="MSH^1^10")


def _check_truncation(message: Hl7Message, warnings: list[str]) -> None:
    """A 5th MSH-2 character only means truncation from v2.7 on (chapter 2, MSH-2)."""
    if message.delimiters.truncation is None:
        return
    version = _version_tuple(message.version)
    if version is not None and version < (2, 7):
        warnings.append(
            f"MSH-2 has a truncation character but MSH-12 declares {message.version}; "
            "it is kept as data"
        )
        d = message.delimiters
        message.delimiters = Delimiters(
            d.field, d.component, d.repetition, d.escape, d.subcomponent
        )


def _version_tuple(version: str | None) -> tuple[int, ...] | None:
    if not version:
        return None
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None


def _check_segment_ids(segments: list[str], delimiters: Delimiters,
                       warnings: list[str]) -> None:
    for position, text in enumerate(segments):
        if not _SEGMENT_ID.match(text.split(delimiters.field, 1)[0]):
            warnings.append(f"segment {position + 1} has a malformed segment ID")


def _escape_warnings(
    segments: list[str], delimiters: Delimiters, charset: str
) -> Iterator[str]:
    """Yield a warning for each leaf whose escape sequences were kept as sent."""
    seen: dict[str, int] = {}
    for text in segments:
        seg_id = text[:3]
        seen[seg_id] = seen.get(seg_id, 0) + 1
        if delimiters.escape not in text:
            continue
        fields = text.split(delimiters.field)
        # MSH-1 is the separator itself, so MSH-n is fields[n - 1]; MSH-2
        # contains the escape character and is never unescaped.
        numbered = enumerate(fields[2:], 3) if seg_id == "MSH" else enumerate(fields[1:], 1)
        for number, field_text in numbered:
            if delimiters.escape in field_text:
                for problem in _field_escape_problems(field_text, delimiters, charset):
                    yield f"{location(seg_id, seen[seg_id], number)}: {problem}"


def _field_escape_problems(
    field_text: str, delimiters: Delimiters, charset: str
) -> Iterator[str]:
    for rep in field_text.split(delimiters.repetition):
        for comp in rep.split(delimiters.component):
            for leaf in comp.split(delimiters.subcomponent):
                yield from unescape_with_warnings(leaf, delimiters, charset=charset)[1]


class Hl7Header:
    """The header of a message whose whole payload passed the cheap checks.

    :func:`read_header` builds it. It contains the MSH fields as sent (escape
    sequences not decoded), which is what routing and acknowledgement need,
    without the cost of splitting every segment into fields.
    """

    __slots__ = ("charset", "delimiters", "fields", "warnings")

    def __init__(
        self,
        fields: list[str],
        delimiters: Delimiters,
        charset: str,
        warnings: list[str],
    ) -> None:
        self.fields = fields
        self.delimiters = delimiters
        self.charset = charset
        self.warnings = tuple(warnings)

    def field(self, number: int, component: int = 1) -> str:
        """Return component ``component`` of MSH-``number`` as sent, or ``""``."""
        # fields[0] is "MSH" and fields[1] MSH-2, so MSH-n is fields[n - 1].
        if number < 2 or number - 1 >= len(self.fields):
            return ""
        value = self.fields[number - 1]
        if number == 2:
            return value
        first = value.split(self.delimiters.repetition, 1)[0]
        parts = first.split(self.delimiters.component)
        return parts[component - 1].strip() if component <= len(parts) else ""


def read_header(payload: bytes, *, default_charset: str = "ascii") -> Hl7Header:
    """Run the checks of :func:`parse_message` that need no field splitting.

    The character set is chosen and the whole payload decoded strictly,
    segments are split, MSH-1, MSH-2, MSH-9 and MSH-10 are checked and a
    segment hidden behind a stray LF is detected, so that an MLLP receiver
    can decide its acknowledgement at a fraction of a full parse's cost.

    Args:
        payload: One message, without MLLP framing.
        default_charset: As for :func:`parse_message`.

    Returns:
        The header fields, delimiters, codec name and warnings.

    Raises:
        ParseError: As :func:`parse_message` would for the same problems.
    """
    warnings: list[str] = []
    bom = payload.startswith(BOM)
    body = payload[len(BOM) :] if bom else payload
    charset = _choose_charset(body, bom, default_charset, warnings)
    text = _decode(body, charset, len(BOM) if bom else 0)
    segments = _split_segments(text, warnings)
    delimiters = _check_header(segments)
    _check_embedded_segments(segments, delimiters)
    header = Hl7Header(segments[0].split(delimiters.field), delimiters, charset, warnings)
    if not header.field(9):
        raise ParseError("MSH-9 message type is missing", location="MSH^1^9")
    if not header.field(10):
        raise ParseError("MSH-10 message control ID is missing", location="MSH^1^10")
    return header


def charset_codec(name: str) -> str:
    """Return the Python codec of an HL7 table 0211 name or a codec name.

    Raises:
        ValueError: ``name`` is neither.
    """
    codec = _CHARSETS.get(name.strip().upper(), name.strip())
    try:
        return codecs.lookup(codec).name
    except LookupError as exc:
        raise ValueError(f"unknown character set {name!r}") from exc
