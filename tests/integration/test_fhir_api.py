"""FHIR REST behaviour through the ASGI app on SQLite and PostgreSQL.

Covers validation (unknown elements, exact decimals), versioning, conditional
create, transactions and batches, audit rows, and a single resource mapped
against resources posted before it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from sqlalchemy import Engine, func, select

from carebridge.api.app import create_app
from carebridge.config.model import Configuration
from carebridge.engine.intake import store_inputs
from carebridge.engine.processor import process_pending
from carebridge.ingest.files.sources import split_path
from carebridge.store.bodies import raw_column, with_bodies
from carebridge.store.db import open_engine, sqlite_url
from carebridge.store.schema import audit_events, fhir_resources, messages, services
from tests.integration.fhir_api_helpers import (
    SYNTHEA_BUNDLES,
    api_configuration,
    charges,
    interface_key,
)

FHIR = "application/fhir+json"

BR21_CLAIM = {
    "resourceType": "Claim", "id": "clm-0021", "status": "active",
    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type",
                         "code": "professional"}]},
    "use": "preauthorization", "patient": {"reference": "Patient/pat-0021"},
    "created": "2024-05-01", "provider": {"reference": "Organization/org-0021"},
    "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority",
                             "code": "normal"}]},
    "insurance": [{"sequence": 1, "focal": True,
                   "coverage": {"reference": "Coverage/cov-0021"}}],
    "item": [
        {"sequence": 1, "productOrService": {"coding": [
            {"system": "http://www.ama-assn.org/go/cpt", "code": "99213"}]},
         "unitPrice": {"value": "@135.50", "currency": "USD"},
         "net": {"value": "@135.50", "currency": "USD"}},
        {"sequence": 2, "productOrService": {"coding": [
            {"system": "urn:example:supply", "code": "SUP1001"}]},
         "quantity": {"value": 3}, "unitPrice": {"value": "@0.10", "currency": "USD"},
         "net": {"value": "@0.30", "currency": "USD"}},
        {"sequence": 3, "productOrService": {"coding": [
            {"system": "urn:example:supply", "code": "SUP2002"}]},
         "unitPrice": {"value": "@19.00", "currency": "USD"},
         "net": {"value": "@19.00", "currency": "USD"}},
    ],
    "total": {"value": "@154.80", "currency": "USD"},
}


def json_with_numbers(document: dict[str, Any]) -> bytes:
    """Serialise ``document`` writing each ``"@n"`` string as the JSON number n."""
    return json.dumps(document).replace('"@', "").replace('0"', "0").encode()


@pytest.fixture()
def api(engine: Engine, config: Configuration, tmp_path: Path) -> TestClient:
    settings = api_configuration(config, tmp_path,
                                 fhir_unknown_elements_by_client={"legacy": "ignore"})
    return TestClient(create_app(engine, settings))


@pytest.fixture()
def headers(engine: Engine) -> dict[str, str]:
    return {"X-API-Key": interface_key(engine), "Content-Type": FHIR}


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def audit_actions(engine: Engine) -> list[tuple[str, str, str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(select(audit_events.c.actor, audit_events.c.action,
                                   audit_events.c.object_type, audit_events.c.object_id)
                            .order_by(audit_events.c.id)).all()
    return [tuple(row) for row in rows]


def test_metadata_without_credentials(api: TestClient) -> None:
    response = api.get("/fhir/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"] == FHIR
    statement = CapabilityStatement.model_validate(response.json())
    served = {resource.type for resource in statement.rest[0].resource}
    assert {"Patient", "Encounter", "Procedure", "ChargeItem", "SupplyDelivery",
            "ServiceRequest", "Coverage", "Claim"} <= served


def test_unknown_element_rejected_with_path(api: TestClient, headers: dict[str, str],
                                            engine: Engine) -> None:
    response = api.post("/fhir/Patient", headers=headers,
                        content=b'{"resourceType":"Patient","name":[{"family":"A","nickname":"B"}]}')
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["Patient.name[0].nickname"]
    assert count(engine, fhir_resources) == 0
    assert count(engine, messages) == 0


def test_unknown_element_ignored_for_client(api: TestClient, engine: Engine) -> None:
    legacy = {"X-API-Key": interface_key(engine, "legacy"), "Content-Type": FHIR}
    response = api.post("/fhir/Patient", headers=legacy,
                        content=b'{"resourceType":"Patient","foo":1,"gender":"female"}')
    assert response.status_code == 201
    assert "foo" not in response.json()
    assert response.json()["gender"] == "female"


def test_br21_decimals_kept_exactly(api: TestClient, headers: dict[str, str],
                                    engine: Engine) -> None:
    body = json_with_numbers(BR21_CLAIM)
    assert b'"value": 135.50' in body
    response = api.post("/fhir/Claim", headers=headers, content=body)
    assert response.status_code == 201
    for literal in (b'"value":135.50', b'"value":0.30', b'"value":19.00', b'"value":154.80'):
        assert literal in response.content
    location = response.headers["location"]
    assert location.endswith("/_history/1")
    path = "/fhir" + location.split("/fhir", 1)[1].split("/_history")[0]
    read = api.get(path, headers=headers)
    assert b'"value":135.50' in read.content
    with engine.connect() as conn:
        raw = conn.execute(select(raw_column()).select_from(with_bodies())).scalar_one()
    assert b'"value":154.80' in bytes(raw)
    assert response.json()["use"] == "preauthorization"


def test_decimal_as_text_rejected(api: TestClient, headers: dict[str, str]) -> None:
    claim = json.loads(json_with_numbers(BR21_CLAIM))
    claim["item"][0]["unitPrice"]["value"] = "1,000.00"
    response = api.post("/fhir/Claim", headers=headers, content=json.dumps(claim))
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["Claim.item[0].unitPrice.value"]


def test_if_match_mismatch_is_412(api: TestClient, headers: dict[str, str]) -> None:
    created = api.post("/fhir/Patient", headers=headers,
                       content=b'{"resourceType":"Patient","gender":"male"}')
    patient_id = created.json()["id"]
    assert created.headers["etag"] == 'W/"1"'
    body = json.dumps({"resourceType": "Patient", "id": patient_id, "gender": "female"})
    updated = api.put(f"/fhir/Patient/{patient_id}", content=body,
                      headers={**headers, "If-Match": 'W/"1"'})
    assert updated.status_code == 200
    assert updated.headers["etag"] == 'W/"2"'
    stale = api.put(f"/fhir/Patient/{patient_id}", content=body,
                    headers={**headers, "If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"
    first = api.get(f"/fhir/Patient/{patient_id}/_history/1", headers=headers)
    assert first.json()["gender"] == "male"
    assert api.get(f"/fhir/Patient/{patient_id}", headers=headers).json()["meta"][
        "versionId"] == "2"


def test_conditional_create_returns_match(api: TestClient, headers: dict[str, str]) -> None:
    body = b'{"resourceType":"Patient","identifier":[{"system":"urn:mrn","value":"7"}]}'
    conditional = {**headers, "If-None-Exist": "identifier=urn:mrn|7"}
    first = api.post("/fhir/Patient", headers=conditional, content=body)
    second = api.post("/fhir/Patient", headers=conditional, content=body)
    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    found = api.get("/fhir/Patient", params={"identifier": "urn:mrn|7"}, headers=headers)
    assert [entry["resource"]["id"] for entry in found.json()["entry"]] == [
        first.json()["id"]]


def test_transaction_rewrites_references(api: TestClient, headers: dict[str, str]) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-2222-4333-8444-555555555555",
         "resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:66666666-2222-4333-8444-555555555555",
         "resource": {"resourceType": "Encounter", "status": "finished",
                      "class": {"code": "AMB"},
                      "subject": {"reference": "urn:uuid:11111111-2222-4333-8444-555555555555"}},
         "request": {"method": "POST", "url": "Encounter"}},
    ]}
    response = api.post("/fhir", headers=headers, content=json.dumps(bundle))
    assert response.status_code == 200
    locations = [entry["response"]["location"] for entry in response.json()["entry"]]
    assert locations == ["Patient/11111111-2222-4333-8444-555555555555/_history/1",
                         "Encounter/66666666-2222-4333-8444-555555555555/_history/1"]
    encounter = api.get("/fhir/Encounter/66666666-2222-4333-8444-555555555555",
                        headers=headers).json()
    assert encounter["subject"]["reference"] == "Patient/11111111-2222-4333-8444-555555555555"


def test_transaction_rolls_back_on_invalid_entry(api: TestClient, headers: dict[str, str],
                                                 engine: Engine) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "birthDate": "not a date"},
         "request": {"method": "POST", "url": "Patient"}},
    ]}
    response = api.post("/fhir", headers=headers, content=json.dumps(bundle))
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["Bundle.entry[1].resource.birthDate"]
    assert count(engine, fhir_resources) == 0
    assert count(engine, messages) == 0


def test_transaction_rolls_back_on_stale_version(api: TestClient, headers: dict[str, str],
                                                 engine: Engine) -> None:
    api.put("/fhir/Patient/p1", headers=headers,
            content=b'{"resourceType":"Patient","id":"p1"}')
    before = (count(engine, fhir_resources), count(engine, messages))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "id": "p1", "gender": "other"},
         "request": {"method": "PUT", "url": "Patient/p1", "ifMatch": 'W/"5"'}},
    ]}
    response = api.post("/fhir", headers=headers, content=json.dumps(bundle))
    assert response.status_code == 412
    assert response.json()["issue"][0]["expression"] == ["Bundle.entry[1].request.ifMatch"]
    assert (count(engine, fhir_resources), count(engine, messages)) == before


def test_batch_reports_each_entry(api: TestClient, headers: dict[str, str],
                                  engine: Engine) -> None:
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "bogus": True},
         "request": {"method": "POST", "url": "Patient"}},
    ]}
    response = api.post("/fhir", headers=headers, content=json.dumps(bundle))
    assert response.status_code == 200
    first, second = response.json()["entry"]
    assert first["response"]["status"] == "201 Created"
    assert second["response"]["status"] == "400"
    assert second["response"]["outcome"]["issue"][0]["expression"] == [
        "Bundle.entry[1].resource.bogus"]
    assert count(engine, fhir_resources) == 1


def test_unsupported_content_type_is_415(api: TestClient, headers: dict[str, str]) -> None:
    response = api.post("/fhir/Patient", content=b"<Patient/>",
                        headers={**headers, "Content-Type": "application/fhir+xml"})
    assert response.status_code == 415
    assert response.json()["resourceType"] == "OperationOutcome"


def test_writes_and_reads_audited(api: TestClient, headers: dict[str, str],
                                  engine: Engine) -> None:
    created = api.post("/fhir/Patient", headers=headers,
                       content=b'{"resourceType":"Patient"}').json()
    api.get(f"/fhir/Patient/{created['id']}", headers=headers)
    api.get(f"/fhir/Patient/{created['id']}/_history/1", headers=headers)
    api.get("/fhir/Patient", params={"_id": created["id"]}, headers=headers)
    actions = [row for row in audit_actions(engine) if row[1].startswith("fhir.")]
    assert actions == [
        ("client:ehr", "fhir.create", "Patient", created["id"]),
        ("client:ehr", "fhir.read", "Patient", created["id"]),
        ("client:ehr", "fhir.vread", "Patient", created["id"]),
        ("client:ehr", "fhir.search", "Patient", None),
    ]


def test_logs_name_no_patient(api: TestClient, headers: dict[str, str],
                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    patient = {"resourceType": "Patient", "name": [{"family": "Quixotezebulon"}],
               "identifier": [{"system": "urn:mrn", "value": "MRN-SECRET-4417"}]}
    api.post("/fhir/Patient", headers={**headers, "If-None-Exist":
                                       "identifier=urn:mrn|MRN-SECRET-4417"},
             content=json.dumps(patient))
    api.get("/fhir/Patient", params={"identifier": "MRN-SECRET-4417"}, headers=headers)
    # The httpx records are the test client's own requests, not the server's.
    server_records = "\n".join(str(record.__dict__) for record in caplog.records
                               if not record.name.startswith("httpx"))
    assert "carebridge.api.fhir" in server_records
    assert "Quixotezebulon" not in server_records
    assert "MRN-SECRET-4417" not in server_records


def _synthea_encounter(bundle: dict[str, Any], encounter_id: str) -> list[dict[str, Any]]:
    """The bundle's Patient, the encounter, and the encounter's Procedures."""
    wanted = []
    for entry in bundle["entry"]:
        resource = entry["resource"]
        kind = resource["resourceType"]
        own = resource.get("id") == encounter_id
        done_in = (resource.get("encounter") or {}).get("reference") == f"urn:uuid:{encounter_id}"
        if kind == "Patient" or (kind == "Encounter" and own) or (kind == "Procedure"
                                                                  and done_in):
            wanted.append(json.loads(json.dumps(resource).replace("urn:uuid:", "")))
    return wanted


def test_single_procedure_maps_against_earlier_encounter(
    api: TestClient, headers: dict[str, str], engine: Engine, config: Configuration,
    tmp_path: Path,
) -> None:
    files = open_engine(sqlite_url(tmp_path / "files.db"))
    try:
        store_inputs(files, list(split_path(SYNTHEA_BUNDLES[0])), source="files")
        process_pending(files, config)
        file_charges = charges(files)
    finally:
        files.dispose()
    procedure_charges = [row for row in file_charges if ":procedure:" in row[0]]
    assert procedure_charges, "the first Synthea bundle should price a procedure"
    encounter_id = procedure_charges[0][11]
    bundle = json.loads(SYNTHEA_BUNDLES[0].read_bytes())
    resources = _synthea_encounter(bundle, encounter_id)
    for resource in resources:
        # Relative references as an EHR sends them after the first resources exist.
        for element in ("subject", "encounter"):
            if element in resource:
                kind = "Patient" if element == "subject" else "Encounter"
                resource[element]["reference"] = f"{kind}/{resource[element]['reference']}"
        body = json.dumps(resource)
        if resource["resourceType"] == "Procedure":
            response = api.post("/fhir/Procedure", headers=headers, content=body)
        else:
            url = f"/fhir/{resource['resourceType']}/{resource['id']}"
            response = api.put(url, headers=headers, content=body)
        assert response.status_code == 201, response.text
        process_pending(engine, config)
    expected = [row for row in file_charges if row[11] == encounter_id]
    assert charges(engine) == expected
    with engine.connect() as conn:
        outcomes = conn.execute(select(services.c.outcome)
                                .where(services.c.encounter_id == encounter_id)).scalars()
        assert "encounter_not_found" not in set(outcomes)
