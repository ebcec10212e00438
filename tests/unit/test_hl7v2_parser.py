"""Tests for parsing one HL7 v2 message: decoding, terminators, escapes, nulls."""

from __future__ import annotations

import random
import time
from pathlib import Path

import hl7
import pytest

import carebridge
from carebridge.errors import ParseError
from carebridge.ingest.hl7v2.escapes import (
    DEFAULT_DELIMITERS,
    Delimiters,
    escape,
    unescape,
    unescape_with_warnings,
)
from carebridge.ingest.hl7v2.framing import split_file
from carebridge.ingest.hl7v2.parser import NON_CR_TERMINATOR, location, parse_message
from carebridge.model import NULL

DATA = Path(carebridge.__file__).parent / "demo" / "data" / "hl7v2"


def hl7_text(block: str) -> bytes:
    """Join the lines of a case block with CR and end with CR (case conventions)."""
    lines = [line for line in block.strip("\n").split("\n")]
    return ("\r".join(lines) + "\r").encode("ascii")


LF_ADT = (
    b"MSH|^~\\&|SENDAPP|SENDFAC|RCVAPP|RCVFAC|20240501120000||ADT^A04|CTL0001|P|2.5\n"
    b"EVN|A04|20240501120000\n"
    b"PID|1||MRN0001^^^SENDFAC^MR||TESTPATIENT^ALPHA||19800101|F\n"
    b"PV1|1|O|CLINIC1\n"
)

V27_DFT = hl7_text(r"""
MSH|^~\&#|SENDAPP|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03^DFT_P03|CTL0003|P|2.7
EVN|P03|20240501120000
PID|1||MRN0003^^^SENDFAC^MR||TESTPATIENT^GAMMA
PV1|1|O|CLINIC1||||||||||||||||VIS0003
FT1|1|TXN0003||20240501|20240501|CG|SUP1001^GAUZE PAD 4X4 \P\2 PLY^LOCAL|||2|7.50&USD|3.75&USD
""")

ESCAPED_DFT = hl7_text(r"""
MSH|^~\&|SENDAPP|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|CTL0005|P|2.5
EVN|P03|20240501120000
PID|1||MRN0005^^^SENDFAC^MR||TESTPATIENT^ZETA
FT1|1|TXN0005||20240501|20240501|CG|PRC2001^DRESSING \T\ SPLINT \S\ LEFT ARM^LOCAL|||1|42.00&USD|42.00&USD
NTE|1||Path \E\R\E\ share \F\ ref \E\\E\
NTE|2||Unclosed \E\R\
""")

ADT_NULL_PHONE = hl7_text(r"""
MSH|^~\&|SENDAPP|SENDFAC|RCVAPP|RCVFAC|20240501130000||ADT^A08|CTL0006B|P|2.5
EVN|A08|20240501130000
PID|1||MRN0006^^^SENDFAC^MR||TESTPATIENT^ETA||19750505|M|||1 TEST ST^^TESTVILLE^TS^00001||""
PV1|1|O|CLINIC1
""")

LATIN1_ADT = (
    b"MSH|^~\\&|SENDAPP|SENDFAC|RCVAPP|RCVFAC|20240501120000||ADT^A04|CTL0007|P|2.5||||||8859/1\r"
    b"EVN|A04|20240501120000\r"
    b"PID|1||MRN0007^^^SENDFAC^MR||MUSTERMANN^BJ\xd6RN||19700101|M|||TESTSTRA\xdfE 1^^K\xd6LN^^50667\r"
)


# --- LF / CRLF segment terminators ----------------------------------


@pytest.mark.parametrize("payload", [LF_ADT, LF_ADT.replace(b"\n", b"\r\n")])
def test_lf_and_crlf_terminators(payload: bytes) -> None:
    msg = parse_message(payload)
    assert msg.segment_ids == ("MSH", "EVN", "PID", "PV1")
    assert msg.version == "2.5"
    assert msg.value("MSH-12") == "2.5"
    assert msg.value("PID-3.1") == "MRN0001"
    assert msg.value("PID-5.1") == "TESTPATIENT"
    assert msg.value("PID-5.2") == "ALPHA"
    assert msg.control_id == "CTL0001"
    assert NON_CR_TERMINATOR in msg.warnings
    for segment in msg.all_segments():
        for field in range(1, 10):
            value = segment.value(field)
            assert not (isinstance(value, str) and "\n" in value)


def test_lf_is_data_beside_cr() -> None:
    # The rule: CR present, so only a LF directly after a CR is a terminator.
    payload = b"MSH|^~\\&|A|B|C|D|1||ADT^A08|X1|P|2.5\r\nNTE|1||line one\nline two\r\n"
    msg = parse_message(payload)
    assert msg.segment_ids == ("MSH", "NTE")
    assert msg.value("NTE-3") == "line one\nline two"
    assert NON_CR_TERMINATOR in msg.warnings


def test_plain_cr_message_has_no_warning() -> None:
    msg = parse_message(LF_ADT.replace(b"\n", b"\r"))
    assert msg.warnings == ()


# --- five encoding characters ----------------------------------------


def test_truncation_character_v27() -> None:
    msg = parse_message(V27_DFT)
    assert msg.delimiters == Delimiters("|", "^", "~", "\\", "&", "#")
    assert msg.value("MSH-1") == "|"
    assert msg.value("MSH-2") == "^~\\&#"
    assert msg.value("MSH-3") == "SENDAPP"
    assert msg.value("MSH-9.3") == "DFT_P03"
    assert msg.structure == "DFT_P03"
    assert msg.value("MSH-12") == "2.7"
    assert msg.value("FT1-7.2") == "GAUZE PAD 4X4 #2 PLY"
    assert msg.value("FT1-11.1.1", segment_index=0, repetition=0) == "7.50"
    assert msg.value("FT1-11.1.2") == "USD"
    assert msg.warnings == ()


def test_truncation_character_before_v27() -> None:
    msg = parse_message(V27_DFT.replace(b"|2.7\r", b"|2.5\r"))
    assert msg.delimiters.truncation is None
    assert msg.value("FT1-7.1") == "SUP1001"
    assert any("truncation character" in w for w in msg.warnings)


# --- escapes ------------------------------------------------------


def test_split_then_unescape() -> None:
    msg = parse_message(ESCAPED_DFT)
    ft1 = msg.segments("FT1")[0]
    assert ft1.components(7) == ["PRC2001", "DRESSING & SPLINT ^ LEFT ARM", "LOCAL"]
    assert msg.value("FT1-7.2") == "DRESSING & SPLINT ^ LEFT ARM"
    assert msg.value("NTE-3") == "Path \\R\\ share | ref \\\\"
    assert escape(msg.value("FT1-7.2"), msg.delimiters) == "DRESSING \\T\\ SPLINT \\S\\ LEFT ARM"


def test_unterminated_escape_kept() -> None:
    msg = parse_message(ESCAPED_DFT)
    assert msg.value("NTE-3", segment_index=1) == "Unclosed \\R\\"
    assert msg.warnings == ("NTE^2^3: unterminated escape sequence kept literally",)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        ("\\F\\\\S\\\\T\\\\R\\\\E\\", "|^&~\\"),
        ("A\\X41\\B", "AAB"),
        ("line\\X0D0A\\end", "line\r\nend"),
        ("\\E\\R\\", "\\R\\"),
        ("bold \\H\\text\\N\\", "bold \\H\\text\\N\\"),
        ("no escapes", "no escapes"),
    ],
)
def test_unescape_sequences(raw: str, text: str) -> None:
    assert unescape(raw) == text


def test_unknown_and_bad_hex_sequences_are_kept_with_warnings() -> None:
    text, warnings = unescape_with_warnings("a\\Zxy\\b\\XZZ\\")
    assert text == "a\\Zxy\\b\\XZZ\\"
    assert len(warnings) == 2
    assert unescape("\\P\\") == "\\P\\"  # no truncation character declared


def test_escape_unescape_round_trip_for_random_text() -> None:
    rng = random.Random(20240501)
    alphabet = "ab |^~\\&#\r\nXEFSTRP0é€"
    delimiter_sets = [DEFAULT_DELIMITERS, Delimiters(truncation="#"), Delimiters("!", "@", "*", "%", "$")]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        for delimiters in delimiter_sets:
            escaped = escape(text, delimiters)
            for forbidden in (delimiters.field, delimiters.component, "\r", "\n"):
                assert forbidden not in escaped
            assert unescape(escaped, delimiters, charset="utf-8") == text


# --- explicit null --------------------------------------------------


def test_explicit_null_not_absent() -> None:
    msg = parse_message(ADT_NULL_PHONE)
    assert msg.value("PID-13") is NULL
    assert msg.value("PID-13") != '""'
    assert msg.value("PID-14") is None
    assert msg.value("PID-99") is None
    assert msg.value("ZZZ-1") is None


# --- character sets (MSH-18) ------------------------------------------------


def test_msh18_latin1_is_honoured() -> None:
    msg = parse_message(LATIN1_ADT)
    assert msg.charset == "iso8859-1"
    assert msg.value("PID-5.2") == "BJÖRN"
    assert msg.value("PID-11.1") == "TESTSTRAßE 1"
    assert msg.value("PID-11.3") == "KÖLN"


@pytest.mark.parametrize("default", ["ascii", "utf-8", "UNICODE UTF-8"])
def test_undecodable_bytes_raise_with_offset_and_charset(default: str) -> None:
    payload = LATIN1_ADT.replace(b"||||||8859/1", b"")
    with pytest.raises(ParseError) as caught:
        parse_message(payload, default_charset=default)
    assert caught.value.location == "MSH^1^18"
    assert "offset 142" in str(caught.value)
    assert ("ascii" if default == "ascii" else "utf-8") in str(caught.value)


def test_channel_default_charset_applies_when_msh18_is_empty() -> None:
    payload = LATIN1_ADT.replace(b"||||||8859/1", b"")
    assert parse_message(payload, default_charset="8859/1").value("PID-5.2") == "BJÖRN"


def test_utf8_declared_and_bom_removed() -> None:
    payload = "MSH|^~\\&|A|B|C|D|1||ADT^A08|X1|P|2.5||||||UNICODE UTF-8\rPID|1||M1||MÜLLER\r"
    msg = parse_message(b"\xef\xbb\xbf" + payload.encode("utf-8"))
    assert msg.value("PID-5.1") == "MÜLLER"
    assert msg.charset == "utf-8"


def test_unknown_msh18_is_a_parse_error() -> None:
    with pytest.raises(ParseError) as caught:
        parse_message(b"MSH|^~\\&|A|B|C|D|1||ADT^A08|X1|P|2.5||||||EBCDIC\r")
    assert caught.value.location == "MSH^1^18"


# --- malformed headers ------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        (b"", "MSH^1"),
        (b"\r\n", "MSH^1"),
        (b"PID|1||X\r", "MSH^1"),
        (b"MSH|^~\r", "MSH^1"),
        (b"MSH|^~|A|B\r", "MSH^1^2"),
        (b"MSH|^~\\\\&|A|B|C|D|1||ADT^A01|1|P|2.6\r", "MSH^1^2"),
        (b"MSH|^~\\&|A|B|C|D|1|||X1|P|2.5\r", "MSH^1^9"),
        (b"MSH|^~\\&|A|B|C|D|1||ADT^A01||P|2.5\r", "MSH^1^10"),
        (b"MSH|^~\\&|A|B|C|D|1||ADT^A01\r", "MSH^1^10"),
    ],
)
def test_malformed_header_raises_with_err2_location(payload: bytes, where: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_message(payload)
    assert caught.value.location == where


def test_header_properties() -> None:
    msg = parse_message(V27_DFT)
    assert (msg.message_code, msg.trigger, msg.structure) == ("DFT", "P03", "DFT_P03")
    assert msg.processing_id == "P"
    assert msg.sending_application == "SENDAPP"
    assert msg.sending_facility == "SENDFAC"
    assert [s.sequence for s in msg.segments("FT1")] == [1]
    assert msg.segments("FT1")[0].location(10) == "FT1^1^10"
    assert location("MSH", 1, 9, 1, 2) == "MSH^1^9^1^2"


def test_trailing_spaces_of_the_last_field_are_kept() -> None:
    msg = parse_message(b"MSH|^~\\&|A|B|C|D|1||ADT^A08|X1|P|2.5\rNTE|1||text  \r")
    assert msg.value("NTE-3") == "text  "


def test_bad_address_is_a_value_error() -> None:
    msg = parse_message(V27_DFT)
    with pytest.raises(ValueError):
        msg.value("PID5")


# --- bundled real files -----------------------------------------------------

# Files that are malformed on purpose (or by their upstream's accident).
MALFORMED = {
    # MSH-2 is "^~\\&" (the backslash doubled by a string literal): two
    # delimiters would be the same character.
    "sample_unix.hl7": "MSH^1^2",
    "sample_win.hl7": "MSH^1^2",
    # UTF-8 quotation marks, but MSH-18 is empty so ASCII applies.
    "TX_002_TX_ORU_R01.hl7": "MSH^1^18",
}


@pytest.mark.parametrize("path", sorted(DATA.rglob("*.hl7")), ids=lambda p: p.name)
def test_every_bundled_message_parses_or_fails_clearly(path: Path) -> None:
    for raw in split_file(path.read_bytes()).messages:
        if path.name in MALFORMED:
            with pytest.raises(ParseError) as caught:
                parse_message(raw.payload)
            assert caught.value.location == MALFORMED[path.name]
            continue
        msg = parse_message(raw.payload)
        assert msg.message_code
        assert msg.control_id


def test_tx002_parses_when_the_channel_default_is_utf8() -> None:
    path = DATA / "hl7v2-cdc-trusted-intermediary" / "TX_002_TX_ORU_R01.hl7"
    with pytest.raises(ParseError, match="offset 2133 is not valid ascii"):
        parse_message(path.read_bytes())
    msg = parse_message(path.read_bytes(), default_charset="utf-8")
    assert msg.message_code == "ORU"


def test_speed_is_within_twice_python_hl7() -> None:
    payload = (DATA / "hl7v2-python-hl7" / "sample_hl7.hl7").read_bytes()
    text = payload.decode("ascii")
    rounds = 300

    def best(func: object) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(rounds):
                func()  # type: ignore[operator]
            times.append(time.perf_counter() - start)
        return min(times)

    theirs = best(lambda: hl7.parse(text))
    ours = best(lambda: parse_message(payload))
    assert ours < 2 * theirs
