"""The web UI's pure helpers: session cookies, field highlighting and SVG charts."""

from __future__ import annotations

import datetime as dt
import time
from decimal import Decimal

from carebridge.web.charts import Series, bar_chart
from carebridge.web.highlight import raw_view
from carebridge.web.session import (
    SESSION_MAX_AGE_SECONDS,
    decode_session,
    encode_session,
    new_session,
)
from carebridge.web.work_pages import match_line_endings

KEY = b"k" * 32

DFT = (
    b"MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|CTL1|P|2.5\r"
    b"PID|1||MRN1^^^SENDFAC^MR||TESTPATIENT^ALPHA\r"
    b"PV1|1|O|CLINIC1||||||||||||||||VIS1\r"
    b"FT1|1|TXN1||20240501|20240501|CG|99213^VISIT^CPT|||1|135.50&USD\r"
    b"FT1|2|TXN2||20240501|20240501|CG|99999^UNKNOWN^CPT|||0|135.50&USD\r"
)


def marked(view) -> list[str]:
    return [span.text for line in view.lines for span in line if span.marked]


def test_session_round_trip_and_tampering() -> None:
    values = new_session("rc-analyst", None)
    cookie = encode_session(KEY, values)
    assert decode_session(KEY, cookie) == values
    assert decode_session(b"x" * 32, cookie) is None
    body, mac = cookie.split(".")
    assert decode_session(KEY, body[:-2] + "xx." + mac) is None
    assert decode_session(KEY, "not-a-cookie") is None
    assert decode_session(KEY, None) is None


def test_session_expires() -> None:
    values = new_session("rc-analyst", "abcd")
    cookie = encode_session(KEY, values)
    later = time.time() + SESSION_MAX_AGE_SECONDS + 5
    assert decode_session(KEY, cookie, now=later) is None


def test_highlight_follows_the_held_ft1() -> None:
    service = {"service_key": "hl7:CHGSYS:SENDFAC:TXN2", "code": "99999"}
    view = raw_view(DFT, "hl7v2", "unknown_code", "CPT code '99999' ...", [service])
    assert marked(view) == ["99999^UNKNOWN^CPT"]
    assert view.marked_fields == ["FT1-7"]
    assert len(view.lines) == 5


def test_highlight_reads_err_location() -> None:
    view = raw_view(DFT, "hl7v2", "malformed_input", "FT1^2^10: quantity is invalid", [])
    assert marked(view) == ["0"]
    assert view.marked_fields == ["FT1-10"]


def test_highlight_msh_field_numbering() -> None:
    view = raw_view(DFT, "hl7v2", "control_id_reused", "control id reused", [])
    assert marked(view) == ["CTL1"]


def test_highlight_encounter_field() -> None:
    view = raw_view(DFT, "hl7v2", "encounter_not_found", "encounter VIS1 not found", [])
    assert marked(view) == ["VIS1"]


def test_highlight_csv_cell_and_date_prefix() -> None:
    row = (b"2015-01-12T22:34:30Z,2015-01-12T22:49:30Z,pat,enc,117015009,"
           b"Throat culture,26.00,,")
    code = raw_view(row, "synthea-csv:procedures", "unknown_code", "",
                    [{"code": "117015009"}])
    assert marked(code) == ["117015009"]
    date = raw_view(row, "synthea-csv:procedures", "date_out_of_range", "",
                    [{"service_date": dt.date(2015, 1, 12)}])
    assert marked(date) == ["2015-01-12T22:34:30Z", "2015-01-12T22:49:30Z"]


def test_highlight_fhir_value() -> None:
    body = b'{\n  "resourceType": "Procedure",\n  "code": {"coding": [{"code": "430193006"}]}\n}'
    view = raw_view(body, "fhir-json", "unknown_code", "", [{"code": "430193006"}])
    assert marked(view) == ["430193006"]


def test_nothing_marked_without_a_rule() -> None:
    view = raw_view(DFT, "hl7v2", "", "", [])
    assert not view.marked


def test_textarea_line_endings_are_restored() -> None:
    assert match_line_endings("A\r\nB\r\n", b"A\rB\r") == "A\rB\r"
    assert match_line_endings("A\r\nB", b"A\nB") == "A\nB"
    assert match_line_endings("A\r\nB", b"A\r\nB") == "A\r\nB"


def test_bar_chart_is_accessible_svg() -> None:
    chart = str(bar_chart("Work items by reason", ["unknown_code", "date_out_of_range"],
                          [Series("items", [972, 38])], unit="items",
                          cumulative_percent=[96.2, 100.0]))
    assert chart.startswith("<svg")
    assert 'role="img"' in chart
    assert "<title id=" in chart
    assert "unknown_code: items 972" in chart
    assert chart.count('class="bar-0"') == 2
    assert "pareto-line" in chart


def test_bar_chart_escapes_labels_and_handles_log_scale() -> None:
    chart = str(bar_chart("<lag>", ["a<b"], [Series("p50", [0.002]), Series("p99", [86400])],
                          log_scale=True, unit="seconds"))
    assert "<lag>" not in chart
    assert "a&lt;b" in chart
    empty = str(bar_chart("none", [], [Series("x", [])]))
    assert "No data." in empty


def test_money_filter_format() -> None:
    from carebridge.web.render import duration, money
    assert money(Decimal(90694)) == "90,694.00"
    assert duration(3 * 86400 + 4 * 3600 + 5) == "3d 4h"
    assert duration(-125) == "-2m 5s"
