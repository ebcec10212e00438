"""Tests for mapping parsed HL7 v2 messages to canonical records."""

from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal
from pathlib import Path

import pytest

import carebridge
from carebridge.errors import ParseError
from carebridge.ingest.hl7v2.framing import split_file
from carebridge.ingest.hl7v2.mapping import (
    FINANCE_MESSAGE_TYPES,
    GT1_OUT_OF_ORDER,
    map_message,
)
from carebridge.ingest.hl7v2.parser import parse_message
from carebridge.model import (
    NULL,
    CanonicalBatch,
    Guarantor,
    ServiceKind,
    TransactionType,
)

DATA = Path(carebridge.__file__).parent / "demo" / "data" / "hl7v2"


def hl7_text(block: str) -> bytes:
    """Join the lines of a case block with CR and end with CR (case conventions)."""
    return ("\r".join(block.strip("\n").split("\n")) + "\r").encode("ascii")


def mapped(block: str | bytes, message_id: int = 1) -> CanonicalBatch:
    payload = hl7_text(block) if isinstance(block, str) else block
    return map_message(parse_message(payload), message_id)


V27_DFT = r"""
MSH|^~\&#|SENDAPP|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03^DFT_P03|CTL0003|P|2.7
EVN|P03|20240501120000
PID|1||MRN0003^^^SENDFAC^MR||TESTPATIENT^GAMMA
PV1|1|O|CLINIC1||||||||||||||||VIS0003
FT1|1|TXN0003||20240501|20240501|CG|SUP1001^GAUZE PAD 4X4 \P\2 PLY^LOCAL|||2|7.50&USD|3.75&USD
"""

ADT_WITH_PHONES = r"""
MSH|^~\&|SENDAPP|SENDFAC|RCVAPP|RCVFAC|20240501120000||ADT^A08|CTL0006A|P|2.5
EVN|A08|20240501120000
PID|1||MRN0006^^^SENDFAC^MR||TESTPATIENT^ETA||19750505|M|||1 TEST ST^^TESTVILLE^TS^00001||555-0100|555-0199
PV1|1|O|CLINIC1
"""

ADT_NULL_PHONE = r"""
MSH|^~\&|SENDAPP|SENDFAC|RCVAPP|RCVFAC|20240501130000||ADT^A08|CTL0006B|P|2.5
EVN|A08|20240501130000
PID|1||MRN0006^^^SENDFAC^MR||TESTPATIENT^ETA||19750505|M|||1 TEST ST^^TESTVILLE^TS^00001||""
PV1|1|O|CLINIC1
"""

DFT_TXN0011 = r"""
MSH|^~\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|CTL0011|P|2.5
EVN|P03|20240501120000
PID|1||MRN0011^^^SENDFAC^MR||TESTPATIENT^THETA
PV1|1|O|CLINIC1||||||||||||||||VIS0011
FT1|1|TXN0011||20240501|20240501|CG|99213^OFFICE VISIT EST^CPT|||1|135.50&USD|135.50&USD
"""

DFT_TXN0012 = r"""
MSH|^~\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501121500||DFT^P03|CTL0011|P|2.5
EVN|P03|20240501121500
PID|1||MRN0011^^^SENDFAC^MR||TESTPATIENT^THETA
PV1|1|O|CLINIC1||||||||||||||||VIS0011
FT1|1|TXN0012||20240501|20240501|CG|99212^OFFICE VISIT EST^CPT|||1|80.00&USD|80.00&USD
"""

DFT_GT1_FIRST = r"""
MSH|^~\&|RISAPP|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|CTL0016|P|2.5
EVN|P03|20240501120000
PID|1||MRN0016^^^SENDFAC^MR||TESTPATIENT^LAMBDA||19900202|F
PV1|1|O|CLINIC1||||||||||||||||VIS0016
GT1|1||TESTGUARANTOR^MU||9 TEST RD^^TESTVILLE^TS^00002|555-0116|||||SEL^SELF
FT1|1|TXN0016A||20240501|20240501|CG|71045^CHEST XRAY 1 VIEW^CPT|||1|125.00&USD|125.00&USD
FT1|2|TXN0016B||20240501|20240501|CG|A4550^SURGICAL TRAY^HCPCS|||2|39.00&USD|19.50&USD
"""

DFT_HEAD = r"""
MSH|^~\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|CTL9000|P|2.5
PID|1||MRN9000^^^SENDFAC^MR||TESTPATIENT^OMEGA
PV1|1|O|CLINIC1||||||||||||||||VIS9000
"""


def dft(ft1: str) -> str:
    """A minimal DFT^P03 whose only FT1 is ``ft1``."""
    return DFT_HEAD.strip("\n") + "\n" + ft1


# --- field cases ------------------------------------------------------------


def test_v27_charge_amounts() -> None:
    batch = mapped(V27_DFT)
    (service,) = batch.services
    assert service.code == "SUP1001"
    assert service.code_system == "LOCAL"
    assert service.quantity == Decimal("2")
    assert service.unit_price == Decimal("3.75")
    assert service.amount == Decimal("7.50")
    assert service.currency == "USD"
    assert service.quantity * service.unit_price == service.amount
    assert service.description == "GAUZE PAD 4X4 #2 PLY"
    assert service.encounter_id == "VIS0003"


def test_explicit_null_phone() -> None:
    a = mapped(ADT_WITH_PHONES).patients[0]
    b = mapped(ADT_NULL_PHONE).patients[0]
    assert (a.home_phone, a.business_phone) == ("555-0100", "555-0199")
    assert b.home_phone is NULL
    assert b.business_phone is None  # not sent: keep the stored value
    for patient in (a, b):
        assert '""' not in [patient.home_phone, patient.business_phone, patient.family_name]


def test_business_key_msh4_ft1_2() -> None:
    x = mapped(DFT_TXN0011).services[0]
    x_new_control_id = mapped(DFT_TXN0011.replace("|CTL0011|", "|CTL0099|")).services[0]
    y = mapped(DFT_TXN0012).services[0]
    assert x.service_key == "hl7:SENDFAC:TXN0011"
    assert x_new_control_id.service_key == x.service_key
    assert y.service_key == "hl7:SENDFAC:TXN0012"
    assert x.amount == Decimal("135.50")
    assert str(x.amount) == "135.50"


def test_gt1_before_two_ft1() -> None:
    batch = mapped(DFT_GT1_FIRST)
    (encounter,) = batch.encounters
    assert encounter.encounter_id == "VIS0016"
    assert encounter.guarantor == Guarantor("TESTGUARANTOR", "MU", "SEL", "555-0116")
    lines = [(s.code, s.quantity, s.unit_price, s.amount) for s in batch.services]
    assert lines == [
        ("71045", Decimal("1"), Decimal("125.00"), Decimal("125.00")),
        ("A4550", Decimal("2"), Decimal("19.50"), Decimal("39.00")),
    ]
    assert [s.code_system for s in batch.services] == ["CPT", "HCPCS"]
    assert sum(s.amount for s in batch.services if s.amount) == Decimal("164.00")
    assert all(s.encounter_id == "VIS0016" for s in batch.services)
    assert GT1_OUT_OF_ORDER in batch.warnings


def test_gt1_after_ft1_is_standard_order() -> None:
    lines = DFT_GT1_FIRST.strip("\n").split("\n")
    reordered = "\n".join(lines[:4] + lines[5:] + [lines[4]])
    batch = mapped(reordered)
    assert GT1_OUT_OF_ORDER not in batch.warnings
    assert batch.encounters[0].guarantor == Guarantor("TESTGUARANTOR", "MU", "SEL", "555-0116")


# --- patient and encounter --------------------------------------------------


def test_patient_fields_prefer_the_mr_identifier() -> None:
    batch = mapped(r"""
MSH|^~\&|APP|FAC|RCV|RFAC|20240501120000||ADT^A01|C1|P|2.5
PID|1||SSN1^^^USA^SS~MRN42^^^FAC^MR||FAMILY^GIVEN||19800202|F|||||555-1^PRN~555-2|555-3|||||ACCT7
PV1|1|I|WARD1^101^A||||||||||||||||VIS42|||||||||||||||||||||||||20240501083000|20240503
""")
    (patient,) = batch.patients
    assert (patient.patient_id, patient.mrn) == ("MRN42", "MRN42")
    assert (patient.family_name, patient.given_name) == ("FAMILY", "GIVEN")
    assert patient.birth_date == dt.date(1980, 2, 2)
    assert patient.gender == "F"
    assert (patient.home_phone, patient.business_phone) == ("555-1", "555-3")
    (encounter,) = batch.encounters
    assert encounter.encounter_id == "VIS42"
    assert encounter.patient_id == "MRN42"
    assert encounter.encounter_class == "I"
    assert encounter.department == "WARD1"
    assert encounter.start == dt.datetime(2024, 5, 1, 8, 30)
    assert encounter.end == dt.datetime(2024, 5, 3)


def test_account_number_is_the_encounter_when_pv1_19_is_empty() -> None:
    batch = mapped(r"""
MSH|^~\&|APP|FAC|RCV|RFAC|20240501120000||ADT^A04|C1|P|2.5
PID|1||ID1^^^FAC^PI||F^G|||||||||||||ACCT9^^^FAC^AN
PV1|1|O|CLINIC1
""")
    assert batch.patients[0].patient_id == "ID1"
    assert batch.patients[0].mrn is None
    assert batch.encounters[0].encounter_id == "ACCT9"


def test_no_visit_number_maps_no_encounter_with_a_warning() -> None:
    batch = mapped(ADT_WITH_PHONES)
    assert batch.encounters == []
    assert any("PV1^1^19" in w for w in batch.warnings)


def test_adt_without_pid_is_a_parse_error() -> None:
    with pytest.raises(ParseError) as caught:
        mapped("MSH|^~\\&|A|B|C|D|1||ADT^A01|C1|P|2.5\nEVN|A01|1\n")
    assert caught.value.location == "PID^1"


def test_parser_warnings_stay_on_the_message() -> None:
    msg = parse_message(hl7_text(ADT_WITH_PHONES).replace(b"\r", b"\n"))
    batch = map_message(msg, 5)
    assert "non-CR segment terminator" in msg.warnings
    assert "non-CR segment terminator" not in batch.warnings
    assert batch.patients[0].source_message_id == 5


# --- FT1 details -------------------------------------------------------------


def test_credit_payment_and_adjustment() -> None:
    batch = mapped(
        dft("FT1|1|T1||20240501||CD|99213^VISIT^CPT|||1|-50.00&USD\n")
        + "FT1|2|T2||20240501||PY|CASH|||1|20.00\n"
        + "FT1|3|T3||20240501||AJ|ADJ|||1|5.00\n"
    )
    assert [s.transaction_type for s in batch.services] == [TransactionType.CREDIT]
    assert batch.services[0].amount == Decimal("-50.00")
    assert batch.ignored == {"FT1 payment/adjustment": 2}


def test_unknown_transaction_type_is_a_parse_error() -> None:
    with pytest.raises(ParseError) as caught:
        mapped(dft("FT1|1|T1||20240501||XX|99213^VISIT^CPT|||1\n"))
    assert caught.value.location == "FT1^1^6"


def test_empty_quantity_means_one_with_a_warning() -> None:
    batch = mapped(dft("FT1|1|T1||20240501||CG|99213^VISIT^CPT|||\n"))
    assert batch.services[0].quantity == Decimal(1)
    assert "FT1^1^10: FT1-10 empty, quantity 1 assumed" in batch.warnings


@pytest.mark.parametrize("quantity", ["two", "1,5", "1e3", "--1"])
def test_non_numeric_quantity_is_a_parse_error(quantity: str) -> None:
    with pytest.raises(ParseError) as caught:
        mapped(dft(f"FT1|1|T1||20240501||CG|99213^VISIT^CPT|||{quantity}\n"))
    assert caught.value.location == "FT1^1^10"


@pytest.mark.parametrize(
    ("ft1_money", "where"),
    [("|1,000.00&USD|", "FT1^1^11^1^1^1"), ("||12.5.0&USD", "FT1^1^12^1^1^1")],
)
def test_invalid_amount_is_a_parse_error(ft1_money: str, where: str) -> None:
    with pytest.raises(ParseError) as caught:
        mapped(dft(f"FT1|1|T1||20240501||CG|99213^VISIT^CPT|||1{ft1_money}\n"))
    assert caught.value.location == where


def test_conflicting_currencies_are_a_parse_error() -> None:
    with pytest.raises(ParseError) as caught:
        mapped(dft("FT1|1|T1||20240501||CG|99213^VISIT^CPT|||1|10&USD|10&EUR\n"))
    assert caught.value.location == "FT1^1^12"


def test_currency_from_unit_price_and_default() -> None:
    eur = mapped(dft("FT1|1|T1||20240501||CG|99213^VISIT^CPT|||1|10|10&EUR\n"))
    plain = mapped(dft("FT1|1|T1||20240501||CG|99213^VISIT^CPT|||1|10\n"))
    assert eur.services[0].currency == "EUR"
    assert plain.services[0].currency == "USD"


def test_code_system_falls_back_to_ft1_25_then_inference() -> None:
    batch = mapped(
        dft("FT1|1|T1||20240501||CG|CDM77^LOCAL ITEM|||1" + "|" * 15 + "99214^VISIT^C4\n")
        + "FT1|2|T2||20240501||CG|J1100|||1\n"
        + "FT1|3|T3||20240501||CG|X1^THING^99XYZ|||1\n"
    )
    codes = [(s.code, s.code_system) for s in batch.services]
    assert codes == [("99214", "CPT"), ("J1100", "HCPCS"), ("X1", "99XYZ")]
    assert any("FT1^2^7" in w and "HCPCS inferred" in w for w in batch.warnings)


def test_code_without_any_system_is_a_parse_error() -> None:
    with pytest.raises(ParseError) as caught:
        mapped(dft("FT1|1|T1||20240501||CG|626.2|||1\n"))
    assert caught.value.location == "FT1^1^7"


def test_service_date_falls_back_to_posting_date_and_rejects_bad_dates() -> None:
    batch = mapped(dft("FT1|1|T1|||20240502093000|CG|99213^V^CPT|||1\n"))
    assert batch.services[0].service_date == dt.date(2024, 5, 2)
    with pytest.raises(ParseError) as caught:
        mapped(dft("FT1|1|T1||20241399||CG|99213^V^CPT|||1\n"))
    assert caught.value.location == "FT1^1^4"


def test_key_without_transaction_id_uses_the_message_position() -> None:
    batch = mapped(dft("FT1|1|||20240501||CG|99213^V^CPT|||1\nFT1||||20240501||CG|99214^V^CPT|||1\n"))
    assert [s.service_key for s in batch.services] == [
        "hl7:CHGSYS:SENDFAC:CTL9000:FT1:1",
        "hl7:CHGSYS:SENDFAC:CTL9000:FT1:2",
    ]


def test_same_transaction_id_twice_in_one_message_is_a_parse_error() -> None:
    with pytest.raises(ParseError) as caught:
        mapped(dft("FT1|1|T1||20240501||CG|99213^V^CPT|||1\nFT1|2|T1||20240501||CG|99214^V^CPT|||1\n"))
    assert caught.value.location == "FT1^2^2"


# --- message types --------------------------------------------------------


def test_other_message_types_are_counted_as_ignored() -> None:
    batch = mapped("MSH|^~\\&|A|B|C|D|1||ORU^R01|C1|P|2.5\nPID|1||X\nOBX|1|ST|A||B\n")
    assert (batch.patients, batch.encounters, batch.services) == ([], [], [])
    assert batch.ignored == {"ORU^R01 message": 1}
    assert mapped("MSH|^~\\&|A|B|C|D|1||DFT^P99|C1|P|2.5\nPID|1||X\n").ignored == {
        "DFT^P99 message": 1
    }


def test_finance_message_types() -> None:
    for pair in [("ADT", "A01"), ("ADT", "A40"), ("BAR", "P12"), ("DFT", "P03"), ("DFT", "P11")]:
        assert pair in FINANCE_MESSAGE_TYPES
    assert ("ORU", "R01") not in FINANCE_MESSAGE_TYPES


def test_no_personal_data_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="carebridge"):
        mapped(DFT_GT1_FIRST, message_id=77)
    text = caplog.text
    assert "77" in text and "CTL0016" in text
    for secret in ("TESTPATIENT", "LAMBDA", "MRN0016", "19900202", "TESTGUARANTOR", "555-0116"):
        assert secret not in text


# --- bundled real files -----------------------------------------------------


def _file_batches(relative: str) -> list[CanonicalBatch]:
    split = split_file((DATA / relative).read_bytes())
    return [map_message(parse_message(m.payload), 1) for m in split.messages]


def test_microsoft_dft_p03_01() -> None:
    (batch,) = _file_batches("hl7v2-microsoft-fhir-converter/DFT-P03-01.hl7")
    first, second = batch.services
    assert first.service_key == "hl7:GHHSFacility:12345"
    assert (first.code, first.code_system) == ("71045", "CPT")
    assert (first.quantity, first.amount, first.unit_price) == (
        Decimal("2"),
        Decimal("100"),
        Decimal("50"),
    )
    assert first.department == "RAD-1"
    assert first.diagnosis_codes == ("29857009", "68235000")
    assert first.service_date == dt.date(2019, 11, 22)
    assert first.kind is ServiceKind.FINANCIAL_TRANSACTION
    assert (first.patient_id, first.encounter_id) == ("PATID1234", "40007716")
    # FT1-7 "626.2" has no system; FT1-25 "99011" looks like CPT.
    assert (second.code, second.code_system, second.amount) == ("99011", "CPT", Decimal("120"))
    assert second.service_key == "hl7:IMMAPP:GHHSFacility:MSG00001:FT1:2"
    assert batch.patients[0].family_name == "EVERYMAN"


@pytest.mark.parametrize(
    ("name", "second_code", "guarantor_family"),
    [
        ("DFT-P03-02.hl7", "99011", "RADIANT"),
        ("DFT-P11-01.hl7", "92002", "EVERYMAN"),
        ("DFT-P11-02.hl7", "92002", "RADIANT"),
    ],
)
def test_other_microsoft_dft_files(name: str, second_code: str, guarantor_family: str) -> None:
    (batch,) = _file_batches(f"hl7v2-microsoft-fhir-converter/{name}")
    assert [s.code for s in batch.services] == ["71045", second_code]
    assert batch.encounters[0].guarantor is not None
    assert batch.encounters[0].guarantor.family_name == guarantor_family
    assert GT1_OUT_OF_ORDER not in batch.warnings


def test_mieweb_dft_file_has_two_messages() -> None:
    first, second = _file_batches("hl7v2-node-hl7-complete/mieweb_dft-example.hl7")
    assert [(s.code, s.code_system, s.service_date) for s in first.services + second.services] == [
        ("73630", "CPT", dt.date(2008, 5, 28)),
        ("76775", "CPT", dt.date(2010, 2, 12)),
    ]
    assert second.services[0].diagnosis_codes == ("440.0", "441.4")
    assert first.services[0].service_key == "hl7:WCDataSend:SENDING_FAC:DSD1184185250:FT1:1"
    assert first.services[0].patient_id == "10476"
    assert first.services[0].amount is None


# Messages whose structure is broken beyond mapping (the rest map cleanly).
MAPPING_FAILURES = {
    "healthcare-it-systems_adt-example.hl7",  # all segments on one line: no PID
    "sample_bad_batch1.hl7",  # the BHS in mid-message cut off its PID
}
PARSE_FAILURES = {"sample_unix.hl7", "sample_win.hl7"}  # see test_hl7v2_parser


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(DATA.rglob("*.hl7")) if p.name not in PARSE_FAILURES],
    ids=lambda p: p.name,
)
def test_every_bundled_message_maps_or_fails_clearly(path: Path) -> None:
    for raw in split_file(path.read_bytes()).messages:
        msg = parse_message(raw.payload, default_charset="utf-8")
        if path.name in MAPPING_FAILURES:
            with pytest.raises(ParseError):
                map_message(msg, 1)
            continue
        batch = map_message(msg, 1)
        finance = (msg.message_code, msg.trigger) in FINANCE_MESSAGE_TYPES
        assert bool(batch.patients) == finance
        assert bool(batch.ignored) != finance
