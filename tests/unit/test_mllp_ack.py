"""ACK building and the checks that decide AA, AE or AR before storage."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from carebridge.config import load_configuration
from carebridge.config.model import ListenerConfig
from carebridge.errors import ConfigurationError, ParseError
from carebridge.ingest.hl7v2 import FINANCE_MESSAGE_TYPES, parse_message
from carebridge.ingest.hl7v2.ack import AckError, MshEcho, build_ack
from carebridge.ingest.hl7v2.receiver import ListenerPolicy, assess, parse_error_ack

WHEN = dt.datetime(2024, 5, 1, 12, 0, 5, tzinfo=dt.UTC)


def hl7(*segments: str) -> bytes:
    return ("\r".join(segments) + "\r").encode("ascii")


def policy(**settings) -> ListenerPolicy:
    return ListenerPolicy(ListenerConfig(name="test", port=0, **settings))


def ack_of(payload: bytes, code: str, errors=()) -> object:
    echo = MshEcho(payload)
    raw = build_ack(echo, code=code, control_id="CB1", timestamp=WHEN, errors=errors)
    return parse_message(raw, default_charset="latin-1")


BR14_A = hl7(
    "MSH|^~\\&|PHARMAPP|SENDFAC|FINAPP|RCVFAC|20240501120000||RDE^O11^RDE_O11|CTL0014A|P|2.5",
    "PID|1||MRN0014^^^SENDFAC^MR||TESTPATIENT^KAPPA",
    "ORC|NW|ORD0014",
)
BR14_B = hl7(
    "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P99|CTL0014B|P|2.5",
    "EVN|P99|20240501120000",
    "PID|1||MRN0014^^^SENDFAC^MR||TESTPATIENT^KAPPA",
)


def test_br14a_unsupported_type_is_ar_200() -> None:
    verdict, _ = assess(BR14_A, MshEcho(BR14_A), policy())
    assert verdict.code == "AR"
    ack = ack_of(BR14_A, verdict.code, verdict.errors)
    assert ack.segments("MSH")[0].raw(9) == "ACK"
    assert [ack.value("MSH-9.1"), ack.value("MSH-9.2"), ack.value("MSH-9.3")] == [
        "ACK", "O11", "ACK"]
    assert ack.value("MSA-1") == "AR"
    assert ack.value("MSA-2") == "CTL0014A"
    err = ack.segments("ERR")[0]
    assert "^".join(c or "" for c in err.components(2)) == "MSH^1^9^1^1"
    assert err.value(3, 1) == "200"
    assert err.value(3, 3) == "HL70357"
    assert err.value(4) == "E"


def test_br14b_unsupported_trigger_is_ar_201() -> None:
    verdict, _ = assess(BR14_B, MshEcho(BR14_B), policy())
    ack = ack_of(BR14_B, verdict.code, verdict.errors)
    assert ack.value("MSA-1") == "AR"
    assert ack.value("MSA-2") == "CTL0014B"
    err = ack.segments("ERR")[0]
    assert "^".join(c or "" for c in err.components(2)) == "MSH^1^9^1^2"
    assert err.value(3, 1) == "201"


def test_processing_id_and_version_are_checked_in_order() -> None:
    training = BR14_B.replace(b"DFT^P99", b"DFT^P03").replace(b"|P|2.5", b"|T|2.5")
    verdict, _ = assess(training, MshEcho(training), policy())
    assert [(e.code, e.location) for e in verdict.errors] == [(202, "MSH^1^11")]
    assert assess(training, MshEcho(training), policy(processing_ids=("P", "T")))[0].code == "AA"
    old = BR14_B.replace(b"DFT^P99", b"DFT^P03").replace(b"|P|2.5", b"|P|9.9")
    verdict, _ = assess(old, MshEcho(old), policy())
    assert [(e.code, e.location) for e in verdict.errors] == [(203, "MSH^1^12")]


def test_br03_ack_keeps_five_encoding_characters() -> None:
    payload = hl7(
        "MSH|^~\\&#|SENDAPP|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03^DFT_P03|CTL0003|P|2.7",
        "EVN|P03|20240501120000",
    )
    verdict, _ = assess(payload, MshEcho(payload), policy())
    assert verdict.code == "AA"
    raw = build_ack(MshEcho(payload), code="AA", control_id="CB7", timestamp=WHEN)
    assert raw.startswith(b"MSH|^~\\&#|FINAPP|RCVFAC|SENDAPP|SENDFAC|20240501120005+0000||"
                          b"ACK^P03^ACK|CB7|P|2.7\rMSA|AA|CTL0003\r")


def test_ack_uses_inbound_delimiters_and_charset_bytes() -> None:
    payload = (b"MSH#*~\\&#SEND\xc4PP#FAC#RCV#RFAC#20240501##DFT*P03#C1#P#2.5######8859/1\r"
               b"EVN#P03\r")
    raw = build_ack(MshEcho(payload), code="AE", control_id="CB1", timestamp=WHEN,
                    errors=(AckError(102, "PID^1^5", "bad | value"),))
    assert raw.split(b"\r")[0] == (
        b"MSH#*~\\&#RCV#RFAC#SEND\xc4PP#FAC#20240501120005+0000##ACK*P03*ACK#CB1#P#2.5"
        b"######8859/1")
    assert raw.split(b"\r")[2] == (
        b"ERR##PID*1*5#102*Data type error*HL70357#E####bad | value")


BR07 = (b"MSH|^~\\&|SENDAPP|SENDFAC|RCVAPP|RCVFAC|20240501120000||ADT^A04|CTL0007|P|2.5"
        b"||||||8859/1\r"
        b"EVN|A04|20240501120000\r"
        b"PID|1||MRN0007^^^SENDFAC^MR||MUSTERMANN^BJ\xd6RN||19700101|M|||"
        b"TESTSTRA\xdfE 1^^K\xd6LN^^50667\r")
BR07_NO_CHARSET = BR07.replace(b"|2.5||||||8859/1\r", b"|2.5\r")


def test_br07a_latin1_declared_is_accepted() -> None:
    verdict, fmt = assess(BR07, MshEcho(BR07), policy())
    assert verdict.code == "AA"
    assert fmt == "hl7v2"
    message = parse_message(BR07)
    assert message.value("PID-5.2") == "BJÖRN"
    assert message.value("PID-11.1") == "TESTSTRAßE 1"
    assert message.value("PID-11.3") == "KÖLN"


def test_br07b_undecodable_bytes_are_ae_naming_the_charset() -> None:
    verdict, _ = assess(BR07_NO_CHARSET, MshEcho(BR07_NO_CHARSET), policy())
    assert verdict.code == "AE"
    error = verdict.errors[0]
    assert error.location == "MSH^1^18"
    assert error.code == 102
    assert "character set" in error.text
    assert "offset 142" in error.text
    ack = ack_of(BR07_NO_CHARSET, verdict.code, verdict.errors)
    assert ack.value("MSA-1") == "AE"
    assert ack.value("MSA-2") == "CTL0007"
    assert "\ufffd" not in ack.value("ERR-8")


def test_br07b_channel_default_latin1_behaves_like_a() -> None:
    verdict, fmt = assess(BR07_NO_CHARSET, MshEcho(BR07_NO_CHARSET),
                          policy(default_charset="8859/1"))
    assert verdict.code == "AA"
    assert fmt == "hl7v2;charset=iso8859-1"


def test_enhanced_mode_codes_and_accept_ack_type() -> None:
    payload = BR14_A.replace(b"|P|2.5", b"|P|2.5|||AL|NE")
    ack = ack_of(payload, "AR", (AckError(200, "MSH^1^9^1^1", "x"),))
    assert ack.value("MSA-1") == "CR"
    assert MshEcho(payload).enhanced
    assert MshEcho(payload).accept_ack_type == "AL"
    assert not MshEcho(BR14_A).enhanced


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ParseError("MSH-10 message control ID is missing", location="MSH^1^10"), 101),
        (ParseError("unsupported character set 'X' in MSH-18", location="MSH^1^18"), 103),
        (ParseError("first segment is not MSH", location="MSH^1"), 100),
        (ParseError("MSH-2 must hold 4 or 5 encoding characters", location="MSH^1^2"), 102),
    ],
)
def test_parse_errors_map_to_table_0357(error: ParseError, code: int) -> None:
    assert parse_error_ack(error).code == code


def test_garbage_payload_still_gets_an_ack() -> None:
    verdict, _ = assess(b"hello", MshEcho(b"hello"), policy())
    assert verdict.code == "AE"
    raw = build_ack(MshEcho(b"hello"), code="AE", control_id="CB1", timestamp=WHEN,
                    errors=verdict.errors)
    assert raw.startswith(b"MSH|^~\\&|")
    assert b"\rMSA|AE|\r" in raw


def test_default_message_types_cover_the_finance_types() -> None:
    accepted = policy()
    for code, trigger in FINANCE_MESSAGE_TYPES:
        payload = BR14_B.replace(b"DFT^P99", f"{code}^{trigger}".encode())
        assert accepted.unsupported(MshEcho(payload)) is None, (code, trigger)
    oru = BR14_B.replace(b"DFT^P99", b"ORU^R01")
    assert accepted.unsupported(MshEcho(oru)) is None


DEMO = Path(__file__).resolve().parents[2] / "src" / "carebridge" / "demo" / "config"


def copy_config(tmp_path: Path, listeners: list[dict]) -> Path:
    target = tmp_path / "config"
    target.mkdir()
    for item in DEMO.rglob("*"):
        if item.is_file():
            (target / item.relative_to(DEMO)).parent.mkdir(parents=True, exist_ok=True)
            (target / item.relative_to(DEMO)).write_bytes(item.read_bytes())
    main = yaml.safe_load((DEMO / "carebridge.yaml").read_text())
    main["chargemaster"]["path"] = str(
        (DEMO / main["chargemaster"]["path"]).resolve())
    main["listeners"] = listeners
    (target / "carebridge.yaml").write_text(yaml.safe_dump(main))
    return target


def test_demo_config_has_no_listener() -> None:
    assert load_configuration(DEMO).listeners == ()


def test_listener_config_defaults_and_tls_paths(tmp_path: Path) -> None:
    folder = copy_config(tmp_path, [
        {"name": "adt", "port": 2575},
        {"name": "tls", "port": 2576, "tls_cert": "c.pem", "tls_key": "k.pem",
         "default_charset": "8859/1", "message_types": ["DFT^P03"]},
    ])
    plain, tls = load_configuration(folder).listeners
    assert plain == ListenerConfig(name="adt", port=2575)
    assert tls.tls_cert == str(folder / "c.pem")
    assert tls.message_types == ("DFT^P03",)


@pytest.mark.parametrize(
    ("listeners", "field"),
    [
        ([{"name": "a", "port": 1}, {"name": "a", "port": 2}], "listeners.1.name"),
        ([{"name": "a", "port": 1}, {"name": "b", "port": 1}], "listeners.1.port"),
        ([{"name": "a", "port": 1, "default_charset": "KLINGON"}], "listeners.0.default_charset"),
        ([{"name": "a", "port": 1, "tls_cert": "c.pem"}], "listeners.0.tls_key"),
        ([{"name": "a", "port": 1, "message_types": ["DFT"]}], "listeners.0.message_types"),
    ],
)
def test_bad_listener_config_names_the_field(
    tmp_path: Path, listeners: list[dict], field: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_configuration(copy_config(tmp_path, listeners))
    assert field in str(caught.value)
