"""Chargemaster loaders on the bundled real files and on a messy fixture."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from carebridge.config.chargemaster import (
    ChargemasterLoad,
    description_code,
    load_chargemaster,
    pad_revenue_code,
    parse_money,
    split_hcpcs,
)
from carebridge.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[2]
CDM = ROOT / "src/carebridge/demo/data/chargemasters"
FIXTURES = ROOT / "tests/fixtures/config"


def _accounted(load: ChargemasterLoad) -> bool:
    return load.rows_read == (
        load.blank_rows
        + load.modifier_rows
        + load.collapsed_rows
        + len(load.items)
        + len(load.errors)
    )


# file, format, items, errors, rows_read, blank, modifier, collapsed
BUNDLED = [
    ("oshpd-ca_106361458_CDM_2018.csv", "cdm-2019-cpt", 5454, 0, 5455, 1, 0, 0),
    (
        "wake-forest-baptist-wilkes_CMS_Pricing_WMC.csv",
        "cdm-2019-revenue-code",
        1964,
        21,
        2021,
        0,
        0,
        36,
    ),
    (
        "cms-v3/V3.0.0_Tall_CSV_Format_Example.csv",
        "cms-v3-tall-csv",
        12,
        7,
        45,
        0,
        6,
        20,
    ),
    (
        "cms-v3/V3.0.0_Wide_CSV_Format_Example.csv",
        "cms-v3-wide-csv",
        12,
        7,
        26,
        0,
        3,
        4,
    ),
    ("cms-v3/v3_json_format_example.json", "cms-v3-json", 12, 7, 25, 0, 3, 3),
]


@pytest.mark.parametrize(
    ("name", "fmt", "items", "errors", "read", "blank", "modifier", "collapsed"),
    BUNDLED,
)
def test_bundled_chargemasters_load_with_exact_counts(
    name, fmt, items, errors, read, blank, modifier, collapsed
):
    load = load_chargemaster(CDM / name, fmt)
    assert len(load.items) == items
    assert len(load.errors) == errors
    assert (
        load.rows_read,
        load.blank_rows,
        load.modifier_rows,
        load.collapsed_rows,
    ) == (
        read,
        blank,
        modifier,
        collapsed,
    )
    assert _accounted(load)
    assert len({item.charge_code for item in load.items}) == len(load.items)
    for error in load.errors:
        assert Path(name).name in str(error)
        assert f":{error.line}:" in str(error)


def test_oshpd_items_strip_padding_and_split_codes():
    load = load_chargemaster(CDM / "oshpd-ca_106361458_CDM_2018.csv", "cdm-2019-cpt")
    items = {item.charge_code: item for item in load.items}
    assert items["10005"].price == Decimal("1050.00")
    assert items["10005"].hcpcs is None
    assert items["10005"].origin == "oshpd-ca_106361458_CDM_2018.csv:7"
    chest = items["2806553"]
    assert (chest.hcpcs, chest.modifiers, chest.price) == (
        "71046",
        ("TC",),
        Decimal("341.00"),
    )
    assert items["3711611"].hcpcs_units == 16  # "86003 X16"
    assert items["3506642"].modifiers == ("26", "LT")  # "7311026LT"


def test_wake_forest_revenue_code_and_conflicting_duplicates():
    load = load_chargemaster(
        CDM / "wake-forest-baptist-wilkes_CMS_Pricing_WMC.csv", "cdm-2019-revenue-code"
    )
    first = load.items[0]
    assert first.revenue_code == "0731"
    assert (
        first.charge_code == "0731-GT-48HR-PATCH-HOOKUP-3d7ae3"
    )  # ">48HR PATCH HOOKUP"
    assert first.price == Decimal(159)
    lines = [error.line for error in load.errors]
    assert lines[:2] == [477, 478]  # "CTA WITH/WIHTOUT INFUSN" priced 1000 and 1020
    assert lines.count(1026) == 1 and 1030 in lines  # five rows of one code, two prices
    assert "'Patient Pay Charge'" in str(load.errors[0])
    # Not UTF-8: the 0xE1 bytes are read as Windows-1252, not rejected.
    assert any("RFX\u00e1" in item.description for item in load.items)


def test_cms_formats_agree_on_items():
    names = [row for row in BUNDLED if row[1].startswith("cms")]
    loads = [load_chargemaster(CDM / name, fmt) for name, fmt, *_ in names]
    views = [
        {(i.charge_code, i.price, i.revenue_code, i.hcpcs) for i in load.items}
        for load in loads
    ]
    assert views[0] == views[1] == views[2]
    items = {item.charge_code: item for item in loads[0].items}
    assert items["99283"].revenue_code == "0450"  # written "450"
    assert items["99283"].price == Decimal(4000)
    assert items["C1785"].hcpcs == "C1785"
    assert "0762-TREATMENT-OR-OBSERVATION-ROOM-OB-8b60b6" in items


def test_cms_tall_errors_name_line_and_column():
    load = load_chargemaster(
        CDM / "cms-v3/V3.0.0_Tall_CSV_Format_Example.csv", "cms-v3-tall-csv"
    )
    missing = [error for error in load.errors if "price is missing" in str(error)]
    assert [error.line for error in missing] == [6, 8, 14, 18, 20]
    assert "'standard_charge|gross'" in str(missing[0])
    conflict = [error.line for error in load.errors if "different prices" in str(error)]
    assert conflict == [39, 40]  # one NDC, two package sizes, two prices


def test_cms_json_errors_carry_physical_lines():
    load = load_chargemaster(CDM / "cms-v3/v3_json_format_example.json", "cms-v3-json")
    lines = (CDM / "cms-v3/v3_json_format_example.json").read_text().splitlines()
    for error in load.errors:
        assert lines[error.line - 1].strip() == "{"
        assert '"description"' in lines[error.line]


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        ("$1,234.00", Decimal("1234.00")),
        ("1,200", Decimal(1200)),
        ("75", Decimal(75)),
        ("0.75", Decimal("0.75")),
        (" $352.00 ", Decimal("352.00")),
        ("$0.00", Decimal("0.00")),
        ("$1,234,567.89", Decimal("1234567.89")),
        ("-$5.00", Decimal("-5.00")),
        ("($5.00)", Decimal("-5.00")),
    ],
)
def test_parse_money(text, amount):
    assert parse_money(text) == amount


@pytest.mark.parametrize(
    "text", ["", "N/A", "$", "1,23", "12.3.4", "$1 234", "abc", "1,2345"]
)
def test_parse_money_refuses(text):
    with pytest.raises(ValueError):
        parse_money(text)


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("85025", ("85025", (), 1)),
        ("C1767", ("C1767", (), 1)),
        ("71046TC", ("71046", ("TC",), 1)),
        ("7311026RT", ("73110", ("26", "RT"), 1)),
        ("65205-RT", ("65205", ("RT",), 1)),
        ("86003 X16", ("86003", (), 16)),
        ("88368(4)", ("88368", (), 4)),
        ("83883X2", ("83883", (), 2)),
        ("", None),
        ("ABC", None),
        ("85025 ???", None),
    ],
)
def test_split_hcpcs(cell, expected):
    assert split_hcpcs(cell) == expected


def test_pad_revenue_code():
    assert [pad_revenue_code(c) for c in ("450", "0450", "45", " 300 ")] == [
        "0450",
        "0450",
        "0045",
        "0300",
    ]


def test_description_code_is_stable_and_distinguishes_symbols():
    assert description_code(
        "0761", "NEG PRESS WND TX <+50 SQ. CM."
    ) != description_code("0761", "NEG PRESS WND TX >+50 SQ.CM.")
    assert description_code("0300", "ZINC (Beaker)") == description_code(
        "0300", " ZINC  (Beaker)"
    )
    assert description_code("0300", "ZINC (Beaker)") != description_code(
        "0301", "ZINC (Beaker)"
    )
    assert description_code(None, "x").startswith("X-")


def test_messy_cdm_blank_rows_empty_codes_and_bad_rows():
    load = load_chargemaster(FIXTURES / "cdm_cpt_messy.csv", "cdm-2019-cpt")
    assert (load.rows_read, load.blank_rows, load.collapsed_rows) == (13, 2, 1)
    assert [item.charge_code for item in load.items] == [
        "100",
        "101",
        "105",
        "107",
        "108",
    ]
    items = {item.charge_code: item for item in load.items}
    assert items["100"].price == Decimal("1234.50")
    assert items["101"].hcpcs is None
    assert (
        items["107"].origin == "cdm_cpt_messy.csv:13"
    )  # a quoted field spans lines 13-14
    assert items["108"].origin == "cdm_cpt_messy.csv:15"
    assert items["108"].price == Decimal(1200)
    found = [(error.line, str(error).split(": ", 2)[1]) for error in load.errors]
    assert found == [
        (5, "column 'Item Description'"),
        (6, "column 'Price'"),
        (7, "column 'Price'"),
        (11, "column 'Price'"),
        (12, "column 'Price'"),
    ]
    assert _accounted(load)


def test_unknown_format_and_missing_file_are_configuration_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="invalid chargemaster format"):
        load_chargemaster(FIXTURES / "cdm_cpt_messy.csv", "cdm-2020")
    with pytest.raises(ConfigurationError, match="failed to read"):
        load_chargemaster(tmp_path / "absent.csv", "cdm-2019-cpt")


def test_wrong_header_is_a_configuration_error(tmp_path):
    path = tmp_path / "cdm.csv"
    path.write_text("Code,Description,Amount\n1,A,2\n")
    with pytest.raises(ConfigurationError) as caught:
        load_chargemaster(path, "cdm-2019-cpt")
    assert "cdm.csv:1" in str(caught.value)
    assert "Item No." in str(caught.value)


def test_unquoted_thousands_separator_rejected(tmp_path) -> None:
    from carebridge.config import load_chargemaster

    path = tmp_path / "cdm.csv"
    path.write_text(
        "Item No.,Item Description,CPT,Price\n"
        "2806551,CHEST 1 VIEW,71045TC,$1,234.00\n"
        "2806553,CHEST 2 VIEWS,71046TC,\"$1,500.00\"\n"
    )
    load = load_chargemaster(path, "cdm-2019-cpt")
    assert [item.charge_code for item in load.items] == ["2806553"]
    assert str(load.items[0].price) == "1500.00"
    assert len(load.errors) == 1
    assert "cdm.csv:2" in str(load.errors[0])
    assert "expected 4 fields, got 5" in str(load.errors[0])
