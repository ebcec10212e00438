"""Recompute the demo's charges from the source files, without the pipeline.

Synthea services are priced here by reading the crosswalk CSVs and the
house chargemaster CSV with the csv module; HL7 FT1 lines are read from the
stored raw message by splitting on the delimiters. The charged set and every
amount must match what the pipeline posted, to the cent.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import sqlite3
import subprocess
import sys
from collections import Counter
from decimal import Decimal
from importlib import resources
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(900)

DEMO = Path(str(resources.files("carebridge").joinpath("demo")))
CONFIG = DEMO / "config"
SYNTHEA = DEMO / "data" / "synthea" / "csv"


def money(text: str) -> Decimal:
    return Decimal(text.replace("$", "").replace(",", "").strip())


def load_crosswalk() -> dict[tuple[str, str], str]:
    crosswalk = {}
    for path in sorted((CONFIG / "crosswalks").glob("*.csv")):
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                crosswalk[(row["source_system"], row["source_code"])] = row["charge_code"]
    return crosswalk


def load_prices() -> dict[str, Decimal]:
    settings = yaml.safe_load((CONFIG / "carebridge.yaml").read_text())
    path = (CONFIG / settings["chargemaster"]["path"]).resolve()
    prices = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["Item No."].strip() and row["Price"].strip():
                prices[row["Item No."].strip()] = money(row["Price"])
    return prices


def rules() -> tuple[dt.date, dt.date]:
    settings = yaml.safe_load((CONFIG / "carebridge.yaml").read_text())["rules"]
    latest = settings["latest_service_date"] or dt.date.today()
    return settings["earliest_service_date"], latest


def read(name: str) -> list[dict[str, str]]:
    with (SYNTHEA / name).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def expected_synthea_charges() -> dict[str, Decimal]:
    """Price every Synthea service that the rules let through."""
    crosswalk, prices = load_crosswalk(), load_prices()
    earliest, latest = rules()
    encounter_ids = {row["Id"] for row in read("encounters.csv")}
    candidates: list[tuple[str, str, str]] = []
    for row in read("encounters.csv"):
        candidates.append((f"synthea:encounter:{row['Id']}", f"SNOMED:{row['CODE']}", row["START"]))
    seen: Counter[str] = Counter()
    for name, kind, system, time_column in (
        ("procedures.csv", "procedure", "SNOMED", "START"),
        ("immunizations.csv", "immunization", "CVX", "DATE"),
    ):
        for row in read(name):
            if row["ENCOUNTER"] not in encounter_ids:
                continue
            key = f"synthea:{kind}:{row['ENCOUNTER']}:{row['CODE']}:{row[time_column]}"
            seen[key] += 1
            if seen[key] > 1:
                key = f"{key}#{seen[key]}"
            candidates.append((key, f"{system}:{row['CODE']}", row[time_column]))

    expected = {}
    for key, code, when in candidates:
        system, _, value = code.partition(":")
        charge_code = crosswalk.get((system, value))
        day = dt.date.fromisoformat(when[:10])
        if charge_code is None or not earliest <= day <= latest:
            continue
        price = prices.get(charge_code, Decimal(0))
        if price > 0:
            expected[key] = price
    return expected


def ft1_amount(raw: bytes, transaction_id: str) -> Decimal:
    """Return FT1-11 (extended amount) of the FT1 whose FT1-2 is ``transaction_id``."""
    text = raw.decode("utf-8")
    separator = text[3]
    component, subcomponent = text[4], text[7]
    for segment in text.replace("\n", "\r").split("\r"):
        fields = segment.split(separator)
        if fields[0] == "FT1" and fields[2] == transaction_id:
            return Decimal(fields[11].split(component)[0].split(subcomponent)[0])
    raise AssertionError(f"FT1 {transaction_id} not in message")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("totals")
    result = subprocess.run(
        [sys.executable, "-m", "carebridge.cli", "demo", "--json", "--no-erp", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), out / "carebridge.db"


def test_synthea_charges_match_source(demo: tuple[dict, Path]) -> None:
    _, database = demo
    expected = expected_synthea_charges()
    with sqlite3.connect(database) as conn:
        posted = {
            key: Decimal(amount)
            for key, amount in conn.execute(
                "SELECT service_key, amount FROM charge_lines WHERE service_key LIKE 'synthea:%'"
            )
        }
    assert len(expected) > 100
    assert set(posted) == set(expected)
    mismatched = {key: (posted[key], expected[key]) for key in posted if posted[key] != expected[key]}
    assert mismatched == {}


def test_total_matches_to_the_cent(demo: tuple[dict, Path]) -> None:
    summary, database = demo
    synthea_total = sum(expected_synthea_charges().values(), Decimal(0))
    hl7_total = Decimal(0)
    with sqlite3.connect(database) as conn:
        rows = conn.execute(
            "SELECT c.service_key, b.raw FROM charge_lines c "
            "JOIN message_bodies b ON b.message_id = c.source_message_id "
            "WHERE c.service_key LIKE 'hl7:%'"
        ).fetchall()
        other = conn.execute(
            "SELECT count(*) FROM charge_lines "
            "WHERE service_key NOT LIKE 'hl7:%' AND service_key NOT LIKE 'synthea:%'"
        ).fetchone()[0]
    for key, raw in rows:
        hl7_total += ft1_amount(raw, key.rsplit(":", 1)[1])
    assert rows, "the demo charges at least one HL7 FT1 line"
    assert other == 0
    assert Decimal(summary["charges"]["total"]) == synthea_total + hl7_total
