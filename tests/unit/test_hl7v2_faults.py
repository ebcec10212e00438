"""Faults that must never lose a charge: hidden segments and empty DFTs."""

from __future__ import annotations

import pytest

from carebridge.errors import ParseError
from carebridge.ingest.hl7v2.mapping import map_message
from carebridge.ingest.hl7v2.parser import parse_message

HEADER = "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|CTL0100|P|2.5"
PID = "PID|1||MRN0100^^^SENDFAC^MR||TESTPATIENT^SIGMA"
PV1 = "PV1|1|O|CLINIC1||||||||||||||||VIS0100"
FT1 = "FT1|1|TXN0100||20240501|20240501|CG|99213^VISIT^CPT|||1|135.50&USD"


def test_lf_before_segment_is_rejected() -> None:
    payload = ("\r".join([HEADER, "EVN|P03|20240501120000", PID]) + "\r" + PV1 + "\n"
               + FT1 + "\r").encode()
    with pytest.raises(ParseError) as caught:
        parse_message(payload)
    assert caught.value.location == "PV1^1"
    assert "'FT1'" in str(caught.value)


def test_lf_inside_text_is_data() -> None:
    note = "NTE|1||first line\nsecond line"
    payload = ("\r".join([HEADER, PID, PV1, FT1, note]) + "\r").encode()
    message = parse_message(payload)
    assert message.value("NTE-3") == "first line\nsecond line"


def test_dft_without_ft1_is_rejected() -> None:
    payload = ("\r".join([HEADER, "EVN|P03|20240501120000", PID, PV1]) + "\r").encode()
    with pytest.raises(ParseError) as caught:
        map_message(parse_message(payload), 1)
    assert caught.value.location == "FT1^1"
    assert "no FT1" in str(caught.value)


def test_invalid_ft1_date_names_value() -> None:
    bad = FT1.replace("|20240501|20240501|", "|20241345|20241345|")
    payload = ("\r".join([HEADER, PID, PV1, bad]) + "\r").encode()
    with pytest.raises(ParseError) as caught:
        map_message(parse_message(payload), 1)
    assert "20241345" in str(caught.value)
    assert caught.value.location == "FT1^1^4"
