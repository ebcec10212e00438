"""CSV row reading and the Synthea CSV mapping."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from decimal import Decimal
from importlib import resources
from pathlib import Path

import pytest

from carebridge.errors import ParseError
from carebridge.ingest.files.csvrows import CsvFile, read_csv_records
from carebridge.ingest.files.synthea import (
    SYNTHEA_KINDS,
    map_synthea_row,
    number_occurrences,
)
from carebridge.model.records import ServiceKind

SYNTHEA_CSV = Path(str(resources.files("carebridge") / "demo/data/synthea/csv"))
FIXTURES = Path(__file__).parent.parent / "fixtures" / "csv"

# Supply-usage extract with CRLF line ends: a quoted comma, doubled quotes, an
# empty last field and a short last row.
SUPPLY_EXTRACT = (
    b"usage_id,encounter_id,item_code,description,qty,unit_cost,lot_number\r\n"
    b'U0001,VIS0028,SUP3001,"Gauze, sterile 4x4",10,0.35,LOT-A1\r\n'
    b'U0002,VIS0028,SUP3002,"Tape ""silk"" 1in",1,2.10,\r\n'
    b"U0003,VIS0028,SUP3003,Saline flush 10mL,2,0.95,LOT-C3\r\n"
    b"U0004,VIS0028,SUP3004,Syringe 3mL,3\r\n"
)


def read_bundled(kind: str) -> CsvFile:
    return read_csv_records((SYNTHEA_CSV / f"{kind}.csv").read_bytes(), source=kind)


# --- read_csv_records ---


def test_extract_quoting_and_short_row() -> None:
    csv_file = read_csv_records(SUPPLY_EXTRACT, source="usage.csv")
    rows = csv_file.records
    assert len(csv_file.header) == 7
    assert [len(r.fields) for r in rows[:3] if r.fields is not None] == [7, 7, 7]
    assert rows[0].fields is not None
    assert rows[0].fields["description"] == "Gauze, sterile 4x4"
    assert rows[1].fields is not None
    assert rows[1].fields["description"] == 'Tape "silk" 1in'
    assert rows[1].fields["lot_number"] == ""
    assert rows[1].error is None
    assert rows[3].fields is None
    assert rows[3].error == "line 5: expected 7 fields, got 5"
    assert csv_file.accepted == 3
    assert csv_file.rejected == 1


def test_extract_decimal_extended_cost() -> None:
    fields = read_csv_records(SUPPLY_EXTRACT, source="usage.csv").records[0].fields
    assert fields is not None
    assert Decimal(fields["qty"]) * Decimal(fields["unit_cost"]) == Decimal("3.50")


def test_raw_is_header_plus_row_bytes() -> None:
    rows = read_csv_records(SUPPLY_EXTRACT, source="usage.csv").records
    header = b"usage_id,encounter_id,item_code,description,qty,unit_cost,lot_number"
    assert (
        rows[1].raw == header + b'\nU0002,VIS0028,SUP3002,"Tape ""silk"" 1in",1,2.10,'
    )
    assert rows[3].raw == header + b"\nU0004,VIS0028,SUP3004,Syringe 3mL,3"
    assert [r.line for r in rows] == [2, 3, 4, 5]


def test_quoted_newline_keeps_row_bytes() -> None:
    data = b'id,note\r\n1,"first\r\nsecond"\r\n2,plain\r\n'
    rows = read_csv_records(data, source="notes.csv").records
    assert rows[0].fields == {"id": "1", "note": "first\r\nsecond"}
    assert rows[0].raw == b'id,note\n1,"first\r\nsecond"'
    assert rows[0].line == 2
    assert rows[1].line == 4


def test_lf_bom_and_blank_lines() -> None:
    data = b"\xef\xbb\xbfid,name\n\n1,a\n\n\n2,b"
    csv_file = read_csv_records(data, source="x.csv")
    assert csv_file.header == ("id", "name")
    assert [r.line for r in csv_file] == [3, 6]
    assert csv_file.blank_lines == 3
    assert csv_file.records[1].raw == b"id,name\n2,b"
    assert csv_file.records[0].fields == {"id": "1", "name": "a"}


def test_broken_quote_is_row_error() -> None:
    data = b'id,name\n1,"ab"c\n2,ok\n'
    rows = read_csv_records(data, source="x.csv").records
    assert rows[0].fields is None
    assert rows[0].error is not None
    assert rows[0].error.startswith("line 2: ")
    assert rows[1].fields == {"id": "2", "name": "ok"}


def test_unclosed_quote_at_end_is_row_error() -> None:
    rows = read_csv_records(b'id,name\n1,"open\n2,x\n', source="x.csv").records
    assert len(rows) == 1
    assert rows[0].error is not None
    assert rows[0].error.startswith("line 2: ")
    assert rows[0].raw == b'id,name\n1,"open\n2,x'


def test_invalid_utf8_is_row_error() -> None:
    rows = read_csv_records(b"id,name\n1,caf\xe9\n2,ok\n", source="x.csv").records
    assert rows[0].error == "line 2: invalid UTF-8"
    assert rows[1].error is None


def test_long_row_is_row_error() -> None:
    rows = read_csv_records(b"a,b\n1,2,3\n", source="x.csv").records
    assert rows[0].error == "line 2: expected 2 fields, got 3"


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "empty CSV file"), (b"a,a\n1,2\n", "duplicate column names")],
)
def test_unreadable_header_raises(data: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        read_csv_records(data, source="x.csv")


def test_fixture_file_with_crlf_and_quotes() -> None:
    csv_file = read_csv_records(
        (FIXTURES / "supplies-quoted.csv").read_bytes(), source="supplies-quoted.csv"
    )
    assert csv_file.rejected == 0
    assert len(csv_file) == 2
    fields = csv_file.records[1].fields
    assert fields is not None
    assert fields["DESCRIPTION"] == 'Lancet, "fine"\r\n(physical object)'
    assert csv_file.records[1].line == 3


# --- bundled Synthea files ---


@pytest.mark.parametrize(
    ("kind", "rows"),
    [
        ("patients", 11),
        ("encounters", 388),
        ("procedures", 889),
        ("immunizations", 129),
        ("supplies", 47),
    ],
)
def test_bundled_file_reads_cleanly(kind: str, rows: int) -> None:
    csv_file = read_bundled(kind)
    assert len(csv_file) == rows
    assert csv_file.rejected == 0
    assert csv_file.blank_lines == 0


@pytest.mark.parametrize("kind", SYNTHEA_KINDS)
def test_bundled_rows_all_map(kind: str) -> None:
    csv_file = read_bundled(kind)
    occurrences = number_occurrences(kind, [r.fields for r in csv_file])
    for record, occurrence in zip(csv_file, occurrences, strict=True):
        assert record.fields is not None
        map_synthea_row(kind, record.fields, record.line, occurrence=occurrence)


def test_bundled_keys_unique() -> None:
    keys: Counter[str] = Counter()
    for kind in SYNTHEA_KINDS:
        csv_file = read_bundled(kind)
        occurrences = number_occurrences(kind, [r.fields for r in csv_file])
        for record, occurrence in zip(csv_file, occurrences, strict=True):
            assert record.fields is not None
            batch = map_synthea_row(
                kind, record.fields, record.line, occurrence=occurrence
            )
            keys.update(s.service_key for s in batch.services)
            keys.update(s.usage_key for s in batch.supplies)
    assert [key for key, count in keys.items() if count > 1] == []
    assert len(keys) == 388 + 889 + 129 + 47


def test_identical_supply_rows_numbered() -> None:
    csv_file = read_bundled("supplies")
    occurrences = number_occurrences("supplies", [r.fields for r in csv_file])
    repeated = [r for r, n in zip(csv_file, occurrences, strict=True) if n > 1]
    assert len(repeated) == 1
    assert repeated[0].fields is not None
    batch = map_synthea_row("supplies", repeated[0].fields, 1, occurrence=2)
    assert batch.supplies[0].usage_key == (
        "synthea:supply:4237be97-a13d-18b8-6e01-df3ee076675f:337388004:2022-01-30#2"
    )


# --- map_synthea_row samples ---


def first_fields(kind: str) -> dict[str, str]:
    fields = read_bundled(kind).records[0].fields
    assert fields is not None
    return fields


def test_patient_row() -> None:
    batch = map_synthea_row("patients", first_fields("patients"), 7)
    patient = batch.patients[0]
    assert patient.patient_id == "b37f7960-7e9e-f3f7-f891-79ae4f632406"
    assert patient.birth_date == dt.date(2011, 3, 18)
    assert patient.gender == "F"
    assert patient.source_message_id == 7
    assert batch.services == []


def test_encounter_row_gives_visit_service() -> None:
    batch = map_synthea_row("encounters", first_fields("encounters"), 3)
    encounter = batch.encounters[0]
    assert encounter.encounter_id == "47afd8bf-98df-7e85-832a-3da2a89cc222"
    assert encounter.patient_id == "b37f7960-7e9e-f3f7-f891-79ae4f632406"
    assert encounter.encounter_class == "ambulatory"
    assert encounter.start == dt.datetime(2014, 5, 6, 8, 34, 30, tzinfo=dt.UTC)
    assert encounter.end == dt.datetime(2014, 5, 6, 8, 49, 30, tzinfo=dt.UTC)
    assert encounter.code == "185345009"
    assert encounter.code_system == "SNOMED"
    service = batch.services[0]
    assert (
        service.service_key == "synthea:encounter:47afd8bf-98df-7e85-832a-3da2a89cc222"
    )
    assert service.kind is ServiceKind.ENCOUNTER
    assert service.code == "185345009"
    assert service.quantity == Decimal(1)
    assert service.service_date == dt.date(2014, 5, 6)
    assert service.amount is None


def test_procedure_row() -> None:
    service = map_synthea_row("procedures", first_fields("procedures"), 1).services[0]
    assert service.kind is ServiceKind.PROCEDURE
    assert service.code_system == "SNOMED"
    assert service.code == "117015009"
    assert service.encounter_id == "81c86a96-6069-1a45-4f2d-d63fef0bd37c"
    assert service.service_date == dt.date(2015, 1, 12)
    assert service.service_key == (
        "synthea:procedure:81c86a96-6069-1a45-4f2d-d63fef0bd37c:117015009:2015-01-12T22:34:30Z"
    )
    assert service.unit_price is None


def test_immunization_row() -> None:
    service = map_synthea_row(
        "immunizations", first_fields("immunizations"), 1
    ).services[0]
    assert service.kind is ServiceKind.IMMUNIZATION
    assert service.code_system == "CVX"
    assert service.code == "140"
    assert service.service_key == (
        "synthea:immunization:0cf48d09-408b-c5fa-4b28-7faa993e55a8:140:2015-02-20T18:34:30Z"
    )


def test_supply_row() -> None:
    supply = map_synthea_row("supplies", first_fields("supplies"), 1).supplies[0]
    assert supply.code_system == "SNOMED"
    assert supply.code == "337388004"
    assert supply.quantity == Decimal(50)
    assert supply.service_date == dt.date(1992, 2, 23)
    assert supply.encounter_id == "96b49443-3032-aed3-eb72-9afab11b54fd"
    assert supply.usage_key == (
        "synthea:supply:4237be97-a13d-18b8-6e01-df3ee076675f:337388004:1992-02-23"
    )


@pytest.mark.parametrize(
    ("kind", "column", "value"),
    [
        ("supplies", "QUANTITY", "fifty"),
        ("supplies", "QUANTITY", "NaN"),
        ("supplies", "QUANTITY", "-1"),
        ("supplies", "DATE", "2022-02-30"),
        ("procedures", "START", "yesterday"),
        ("procedures", "START", "2015-01-12T22:34:30"),
        ("encounters", "STOP", "2014-13-01T00:00:00Z"),
        ("immunizations", "CODE", ""),
    ],
)
def test_invalid_value_names_column(kind: str, column: str, value: str) -> None:
    fields = dict(first_fields(kind))
    fields[column] = value
    with pytest.raises(ParseError) as caught:
        map_synthea_row(kind, fields, 1)
    assert caught.value.location == f"{kind}.{column}"
    assert column in str(caught.value)
    if value:
        assert repr(value) in str(caught.value)


def test_missing_column_raises() -> None:
    fields = dict(first_fields("procedures"))
    del fields["ENCOUNTER"]
    with pytest.raises(ParseError, match="missing column ENCOUNTER"):
        map_synthea_row("procedures", fields, 1)


def test_unknown_kind_raises() -> None:
    with pytest.raises(ParseError, match="unknown Synthea CSV kind 'medications'"):
        map_synthea_row("medications", {"CODE": "1"}, 1)
