"""The AI-assisted checks on small, hand-built data: what they flag and why."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from carebridge.checks.anomalies import ChargeNorms, find_anomalies, fixed_threshold_baseline
from carebridge.checks.evaluate import exact_match_pairs, score
from carebridge.checks.labelled_patients import generate_patient_index, name_pools
from carebridge.checks.linkage import find_duplicates, prepare_records
from carebridge.checks.missing_charges import (
    ChargePatterns,
    ChargeRecord,
    EncounterCharges,
    find_missing_charges,
    low_total_baseline,
)
from carebridge.checks.nicknames import given_name_roots, normalise_name
from carebridge.checks.ranking import priority

NOW = dt.datetime(2026, 1, 10, 12, 0, tzinfo=dt.UTC)


def test_nickname_roots_shared():
    assert "william" in given_name_roots("bill")
    assert set(given_name_roots("chris")) >= {"christopher", "christine"}
    assert given_name_roots("zebedee") == ("zebedee",)
    assert normalise_name(" O'Brien-Smith ") == "obriensmith"
    assert normalise_name("123") is None


def test_prepare_records_normalises_fields():
    table = prepare_records([{
        "unique_id": 7, "given_name": "Bill", "family_name": "SMITH",
        "birth_date": dt.date(1980, 3, 4), "gender": "male", "phone": "+1 (555) 201-0001",
    }]).to_pylist()[0]
    assert table["unique_id"] == "7"
    assert table["given_name"] == "bill"
    assert table["given_roots"] == ["william"]
    assert table["birth_date"] == "1980-03-04"
    assert table["birth_month_day"] == "03-04"
    assert table["gender"] == "M"
    assert table["phone"] == "5552010001"


def test_linkage_explains_flagged_pair():
    index = generate_patient_index(300, seed=5)
    records = [r for r in index.records if r["unique_id"] not in index.errors]
    records += [
        {"unique_id": "left", "given_name": "William", "family_name": "Quarrington",
         "birth_date": "1980-03-04", "gender": "M", "phone": "555-201-0001"},
        {"unique_id": "right", "given_name": "Bill", "family_name": "Quarington",
         "birth_date": "1980-04-03", "gender": "M", "phone": "555-201-0001"},
    ]
    pairs = {(p.left_id, p.right_id): p for p in find_duplicates(records)}
    pair = pairs[("left", "right")]
    assert pair.probability >= 0.8
    assert pair.levels["given_name"] == "nickname"
    assert pair.levels["family_name"] == "typo"
    assert pair.levels["birth_date"] == "day and month swapped"
    assert pair.agreed == ("gender", "phone")
    assert pair.disagreed == ()


def test_linkage_beats_exact_match_baseline():
    index = generate_patient_index(2000, seed=2)
    found = {(p.left_id, p.right_id) for p in find_duplicates(index.records)}
    model = score(found, index.true_pairs, 0.0)
    baseline = score(exact_match_pairs(index.records), index.true_pairs, 0.0)
    assert model["precision"] >= 0.97
    assert model["recall"] >= 0.9
    assert model["f1"] > baseline["f1"] + 0.5


def test_name_pools_come_from_bundled_data():
    pools = name_pools()
    assert "Cormier" in pools.family  # a Synthea patient's family name
    assert "Temika" in pools.given["F"]  # digits of "Temika453" removed
    assert len(pools.family) > 1000


def _encounter(eid: str, features: set[str], *charges: tuple[str, str, str]) -> EncounterCharges:
    records = tuple(
        ChargeRecord(f"{eid}-{n}", code, Decimal(units), Decimal(amount))
        for n, (code, units, amount) in enumerate(charges)
    )
    return EncounterCharges(eid, frozenset(features), records)


def _history() -> list[EncounterCharges]:
    history = []
    for n in range(40):
        history.append(_encounter(
            f"h{n}", {"class:ambulatory", "encounter:SNOMED:1", "procedure:SNOMED:50"},
            ("VISIT", "1", "100.00"), ("LAB", "1", str(20 + n % 3)),
        ))
        history.append(_encounter(
            f"w{n}", {"class:wellness", "encounter:SNOMED:2", "procedure:SNOMED:60"},
            ("WELL", "1", "150.00"),
        ))
    return history


def test_missing_charge_flagged_with_amount():
    patterns = ChargePatterns.fit(_history())
    encounter = _encounter("e1", {"class:ambulatory", "encounter:SNOMED:1",
                                  "procedure:SNOMED:50"}, ("VISIT", "1", "100.00"))
    flagged = find_missing_charges(patterns, [encounter])
    assert [(f.encounter_id, f.charge_code) for f in flagged] == [("e1", "LAB")]
    assert flagged[0].expected_amount == Decimal("21")
    assert flagged[0].support == 40
    assert flagged[0].confidence == pytest.approx(40 / 41, abs=1e-4)


def test_complete_encounter_not_flagged():
    patterns = ChargePatterns.fit(_history())
    complete = _encounter("e2", {"class:wellness", "encounter:SNOMED:2",
                                 "procedure:SNOMED:60"}, ("WELL", "1", "150.00"))
    assert find_missing_charges(patterns, [complete]) == []


def test_low_total_baseline_flags_encounter():
    history = _history()
    short = _encounter("e3", {"class:wellness"}, ("WELL", "1", "50.00"))
    full = _encounter("e4", {"class:wellness"}, ("WELL", "1", "150.00"))
    assert low_total_baseline(history, [short, full]) == ["e3"]


def test_anomalies_flag_units_price_mismatch():
    history = _history()
    norms = ChargeNorms.fit(history)
    patterns = ChargePatterns.fit(history)
    features = {"class:ambulatory", "encounter:SNOMED:1", "procedure:SNOMED:50"}
    test = _encounter("t1", features, ("VISIT", "10", "1000.00"), ("LAB", "1", "2100.00"),
                      ("WELL", "1", "150.00"), ("VISIT", "1", "101.00"))
    found = {a.charge_id: a for a in find_anomalies(norms, patterns, [test])}
    assert found["t1-0"].kind == "units"
    assert found["t1-0"].amount_at_risk == Decimal("900.00")
    assert found["t1-1"].kind == "unit_price"
    assert found["t1-2"].kind == "not_documented"
    assert "t1-3" not in found
    assert fixed_threshold_baseline([test]) == []


def test_priority_money_and_sla():
    overdue, reason = priority(Decimal("999"), NOW - dt.timedelta(hours=5), NOW)
    assert overdue == 700
    assert reason == "USD 999.00 at risk; SLA overdue by 5 h"
    later, reason = priority(Decimal("999"), NOW + dt.timedelta(hours=72), NOW)
    assert later == 400
    assert reason == "USD 999.00 at risk; SLA due in 3 days"
    nothing, reason = priority(None, None, NOW)
    assert nothing == 0
    assert reason == "no amount at risk; no SLA"
