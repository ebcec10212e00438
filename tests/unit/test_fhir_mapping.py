"""FHIR resource and Bundle mapping, and key agreement with the Synthea CSV path."""

from __future__ import annotations

import copy
import datetime as dt
from collections import Counter
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from carebridge.errors import ParseError
from carebridge.ingest.fhir import load_fhir_json, map_fhir
from carebridge.ingest.files.csvrows import read_csv_records
from carebridge.ingest.files.synthea import (
    SYNTHEA_KINDS,
    map_synthea_row,
    number_occurrences,
)
from carebridge.model.records import CanonicalBatch, ServiceKind

SYNTHEA = Path(str(resources.files("carebridge") / "demo/data/synthea"))
FIXTURES = Path(__file__).parent.parent / "fixtures" / "fhir"

# Patient id (file name suffix) → services of kind encounter, procedure and
# immunization, then supplies.
BUNDLE_COUNTS = {
    "9808a1c3-5354-de5f-bfe5-7fdbd39bb426": (51, 52, 6, 0),
    "edcd074e-b20a-2826-ff28-4677579314b1": (27, 47, 4, 7),
    "4237be97-a13d-18b8-6e01-df3ee076675f": (21, 41, 12, 13),
    "b37f7960-7e9e-f3f7-f891-79ae4f632406": (23, 20, 20, 0),
}


def bundle_path(patient_id: str) -> Path:
    return next((SYNTHEA / "fhir").glob(f"*_{patient_id}.json"))


@pytest.fixture(scope="module")
def bundle_batches() -> dict[str, CanonicalBatch]:
    return {
        patient_id: map_fhir(load_fhir_json(bundle_path(patient_id).read_bytes()), 1)
        for patient_id in BUNDLE_COUNTS
    }


@pytest.fixture(scope="module")
def csv_keys() -> dict[str, set[str]]:
    """Service and usage keys of every bundled CSV row, by patient id."""
    keys: dict[str, set[str]] = {}
    for kind in SYNTHEA_KINDS:
        csv_file = read_csv_records(
            (SYNTHEA / "csv" / f"{kind}.csv").read_bytes(), source=kind
        )
        occurrences = number_occurrences(kind, [r.fields for r in csv_file])
        for record, occurrence in zip(csv_file, occurrences, strict=True):
            assert record.fields is not None
            batch = map_synthea_row(
                kind, record.fields, record.line, occurrence=occurrence
            )
            for service in batch.services:
                keys.setdefault(str(service.patient_id), set()).add(service.service_key)
            for supply in batch.supplies:
                keys.setdefault(str(supply.patient_id), set()).add(supply.usage_key)
    return keys


def fixture_batch() -> CanonicalBatch:
    raw = (FIXTURES / "chargeitem-transaction.json").read_bytes()
    return map_fhir(load_fhir_json(raw), 9)


# --- bundled Synthea bundles ---


@pytest.mark.parametrize("patient_id", BUNDLE_COUNTS)
def test_synthea_bundle_counts(
    patient_id: str, bundle_batches: dict[str, CanonicalBatch]
) -> None:
    batch = bundle_batches[patient_id]
    encounters, procedures, immunizations, supplies = BUNDLE_COUNTS[patient_id]
    kinds = Counter(service.kind for service in batch.services)
    assert kinds[ServiceKind.ENCOUNTER] == encounters
    assert kinds[ServiceKind.PROCEDURE] == procedures
    assert kinds[ServiceKind.IMMUNIZATION] == immunizations
    assert len(batch.supplies) == supplies
    assert len(batch.encounters) == encounters
    assert [p.patient_id for p in batch.patients] == [patient_id]
    assert batch.warnings == []


def test_synthea_bundle_ignored_kinds(
    bundle_batches: dict[str, CanonicalBatch],
) -> None:
    ignored = bundle_batches["9808a1c3-5354-de5f-bfe5-7fdbd39bb426"].ignored
    assert ignored["Claim"] == 52
    assert ignored["ExplanationOfBenefit"] == 52
    assert ignored["Observation"] == 84
    assert "Condition" not in ignored
    # Mapped: 1 Patient, 51 Encounters, 52 Procedures, 6 Immunizations, 16 Conditions.
    assert sum(ignored.values()) == 436 - 1 - 51 - 52 - 6 - 16


def test_synthea_bundle_diagnoses(
    bundle_batches: dict[str, CanonicalBatch],
) -> None:
    diagnoses = bundle_batches["9808a1c3-5354-de5f-bfe5-7fdbd39bb426"].diagnoses
    # 16 Condition resources and 42 Encounter.reasonCode codings.
    assert len(diagnoses) == 58
    assert {d.code_system for d in diagnoses} == {"SNOMED"}
    assert all(d.encounter_id for d in diagnoses)


def test_fhir_keys_match_csv(
    bundle_batches: dict[str, CanonicalBatch], csv_keys: dict[str, set[str]]
) -> None:
    for patient_id, batch in bundle_batches.items():
        fhir_keys = {s.service_key for s in batch.services}
        fhir_keys |= {s.usage_key for s in batch.supplies}
        assert len(fhir_keys) == len(batch.services) + len(batch.supplies)
        assert fhir_keys - csv_keys[patient_id] == set(), patient_id
        # The CSV export and the bundles cover the same events for these patients.
        assert fhir_keys == csv_keys[patient_id], patient_id


def test_repeated_supply_numbered(bundle_batches: dict[str, CanonicalBatch]) -> None:
    supplies = bundle_batches["4237be97-a13d-18b8-6e01-df3ee076675f"].supplies
    prefix = "synthea:supply:4237be97-a13d-18b8-6e01-df3ee076675f:337388004:2022-01-30"
    assert sorted(s.usage_key for s in supplies if s.usage_key.startswith(prefix)) == [
        prefix,
        prefix + "#2",
    ]


def test_synthea_encounter_sample(bundle_batches: dict[str, CanonicalBatch]) -> None:
    batch = bundle_batches["b37f7960-7e9e-f3f7-f891-79ae4f632406"]
    encounter = next(
        e
        for e in batch.encounters
        if e.encounter_id == "47afd8bf-98df-7e85-832a-3da2a89cc222"
    )
    assert encounter.start == dt.datetime(2014, 5, 6, 8, 34, 30, tzinfo=dt.UTC)
    assert encounter.code == "185345009"
    assert encounter.encounter_class == "AMB"
    service = next(
        s
        for s in batch.services
        if s.encounter_id == encounter.encounter_id and s.kind is ServiceKind.ENCOUNTER
    )
    assert service.service_date == dt.date(2014, 5, 6)
    assert service.code_system == "SNOMED"


def test_synthea_supply_sample(bundle_batches: dict[str, CanonicalBatch]) -> None:
    supply = bundle_batches["4237be97-a13d-18b8-6e01-df3ee076675f"].supplies[0]
    assert supply.code == "337388004"
    assert supply.quantity == Decimal(50)
    assert supply.service_date == dt.date(1992, 2, 23)
    assert supply.encounter_id is None


# --- hand-written transaction Bundle ---


def test_fixture_patient() -> None:
    patient = fixture_batch().patients[0]
    assert patient.patient_id == "6f1c0d3e-0000-4000-8000-000000000101"
    assert patient.mrn == "MRN0101"
    assert patient.birth_date == dt.date(1980, 1, 1)
    assert patient.source_message_id == 9


def test_fixture_charge_item() -> None:
    service = next(
        s for s in fixture_batch().services if s.kind is ServiceKind.CHARGE_ITEM
    )
    assert service.code_system == "CPT"
    assert service.code == "99213"
    assert service.quantity == Decimal(2)
    assert str(service.amount) == "271.00"
    assert service.currency == "USD"
    assert service.encounter_id == "enc-0101"
    assert service.patient_id == "6f1c0d3e-0000-4000-8000-000000000101"
    assert service.service_date == dt.date(2024, 5, 1)
    assert service.service_key == "fhir:ChargeItem/6f1c0d3e-0000-4000-8000-000000000102"


def test_fixture_encounter_and_supply() -> None:
    batch = fixture_batch()
    assert batch.encounters[0].start == dt.datetime(2024, 5, 1, 13, 0, tzinfo=dt.UTC)
    supply = batch.supplies[0]
    assert str(supply.quantity) == "2.50"
    # 21:34 at UTC-4 is the next day in UTC; the local date is kept.
    assert supply.service_date == dt.date(2024, 5, 1)


def test_fixture_ignored_counts() -> None:
    batch = fixture_batch()
    assert batch.ignored == {"Procedure with status not-done": 1, "Observation": 1}
    assert len(batch.services) == 2


# --- single resources and errors ---


def procedure(**changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Procedure",
        "id": "proc-1",
        "status": "completed",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "117015009"}]},
        "subject": {"reference": "Patient/pat-1"},
        "encounter": {"reference": "Encounter/enc-1"},
        "performedPeriod": {"start": "2015-01-12T17:34:30-05:00"},
    }
    resource.update(changes)
    return resource


def test_single_procedure_key_in_utc() -> None:
    service = map_fhir(procedure(), 1).services[0]
    assert (
        service.service_key == "synthea:procedure:enc-1:117015009:2015-01-12T22:34:30Z"
    )
    assert service.service_date == dt.date(2015, 1, 12)
    assert service.patient_id == "pat-1"


def test_procedure_without_encounter_keyed_by_id() -> None:
    service = map_fhir(procedure(encounter=None), 1).services[0]
    assert service.service_key == "fhir:Procedure/proc-1"
    assert service.encounter_id is None


def test_reference_to_wrong_type_raises() -> None:
    with pytest.raises(ParseError) as caught:
        map_fhir(procedure(encounter={"reference": "Patient/pat-1"}), 1)
    assert caught.value.location == "Procedure.encounter.reference"


def test_procedure_without_code_raises() -> None:
    with pytest.raises(ParseError) as caught:
        map_fhir(procedure(code={"text": "culture"}), 1)
    assert caught.value.location == "Procedure.code"


def test_unsupported_bundle_type_raises() -> None:
    with pytest.raises(ParseError) as caught:
        map_fhir({"resourceType": "Bundle", "type": "searchset", "entry": []}, 1)
    assert caught.value.location == "Bundle.type"


def test_cancelled_encounter_has_no_service() -> None:
    document = load_fhir_json((FIXTURES / "chargeitem-transaction.json").read_bytes())
    cancelled = copy.deepcopy(document["entry"][1]["resource"])
    cancelled["status"] = "cancelled"
    batch = map_fhir(cancelled, 1)
    assert len(batch.encounters) == 1
    assert batch.services == []
    assert batch.ignored == {"Encounter with status cancelled": 1}


def test_float_quantity_rejected() -> None:
    document = load_fhir_json((FIXTURES / "chargeitem-transaction.json").read_bytes())
    supply = copy.deepcopy(document["entry"][4]["resource"])
    supply["suppliedItem"]["quantity"]["value"] = 2.5
    with pytest.raises(ParseError) as caught:
        map_fhir(supply, 1)
    assert caught.value.location == "SupplyDelivery.suppliedItem.quantity.value"
