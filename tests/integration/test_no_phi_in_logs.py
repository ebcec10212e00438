"""No patient name or identifier reaches the logs, whatever path the data takes.

One recognisable patient is sent through every intake path (HL7 v2 files,
Synthea CSV, FHIR bundle files, the MLLP listener, the FHIR API) and
through the operations API's reads, in good and in broken messages, with
every logger at DEBUG. Then neither the name nor the identifier may
appear in any captured record, its arguments or its extra fields.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from carebridge.api.app import create_app
from carebridge.api.security import Role, create_api_key, create_client
from carebridge.config.model import Configuration
from carebridge.engine.job import JobOptions, run_job
from carebridge.engine.processor import process_pending

from .conftest import DEMO
from .mllp_helpers import Client, frame, running_listener

FAMILY = "Zqxwvfamily"
GIVEN = "Plokmngiven"
IDENTIFIER = "MRN44778899"
PHONE = "5550199887"
SECRETS = (FAMILY, GIVEN, IDENTIFIER, PHONE, FAMILY.upper(), IDENTIFIER[3:])


def hl7_messages() -> list[bytes]:
    pid = f"PID|1||{IDENTIFIER}^^^SENDFAC^MR||{FAMILY}^{GIVEN}||19800101|F|||||{PHONE}"
    good = "\r".join([
        "MSH|^~\\&|ADTSYS|SENDFAC|FINAPP|RCVFAC|20240501110000||ADT^A04|PHI0001|P|2.5",
        "EVN|A04|20240501110000",
        pid,
        "PV1|1|O|CLINIC1||||||||||||||||VISPHI1",
    ]) + "\r"
    # An FT1 with a letter in its amount and a date that is not a date.
    bad = "\r".join([
        "MSH|^~\\&|BILL|SENDFAC|FINAPP|RCVFAC|20240501110000||DFT^P03|PHI0002|P|2.5",
        "EVN|P03|20240501110000",
        pid.replace("19800101", f"1980{FAMILY}"),
        "PV1|1|O|CLINIC1||||||||||||||||VISPHI1",
        f"FT1|1|TXNPHI1||20240501||CG|99213^Visit^CPT|||1|8O.00&USD|{GIVEN}",
    ]) + "\r"
    return [good.encode(), bad.encode()]


def synthea_patients() -> bytes:
    source = (DEMO / "data" / "synthea" / "csv" / "patients.csv").read_text()
    header, first = source.splitlines()[:2]
    cells = first.split(",")
    columns = header.split(",")
    cells[columns.index("FIRST")] = GIVEN
    cells[columns.index("LAST")] = FAMILY
    cells[columns.index("SSN")] = IDENTIFIER
    broken = list(cells)
    broken[columns.index("BIRTHDATE")] = f"{FAMILY}-01"
    broken[0] = "phi-broken-patient"
    return (header + "\n" + ",".join(cells) + "\n" + ",".join(broken) + "\n").encode()


def fhir_patient(**extra: object) -> dict:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3.4", "value": IDENTIFIER}],
        "name": [{"family": FAMILY, "given": [GIVEN]}],
        "telecom": [{"system": "phone", "value": PHONE}],
        "birthDate": "1980-01-01",
        **extra,
    }


def fhir_bundle_file(tmp_path: Path) -> Path:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:6d1f7b1e-0000-4000-8000-000000000001",
         "resource": fhir_patient(),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:6d1f7b1e-0000-4000-8000-000000000002",
         "resource": fhir_patient(birthDate=f"1980-{FAMILY}"),
         "request": {"method": "POST", "url": "Patient"}},
    ]}
    path = tmp_path / "phi-bundle.json"
    path.write_text(json.dumps(bundle))
    return path


def captured_text(caplog: pytest.LogCaptureFixture) -> str:
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(record.args))
        parts.append(repr({k: v for k, v in record.__dict__.items() if k != "args"}))
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(repr(record.exc_info[1]))
    return "\n".join(parts)


def test_no_patient_data_in_logs(
    engine: Engine, config: Configuration, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    files = []
    for n, payload in enumerate(hl7_messages()):
        path = tmp_path / f"m{n}.hl7"
        path.write_bytes(payload)
        files.append(path)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "patients.csv").write_bytes(synthea_patients())
    files.append(tmp_path / "csv" / "patients.csv")
    files.append(fhir_bundle_file(tmp_path))
    run_job(engine, config, JobOptions(paths=files, out_dir=tmp_path / "out"))

    with running_listener(engine) as listener:
        client = Client(listener.listeners[0].port)
        for payload in hl7_messages():
            client.send(frame(payload.replace(b"PHI000", b"MLP000")))
            client.read_ack()
        client.close()

    create_client(engine, "phi-test", frozenset({Role.ADMIN}))
    key = create_api_key(engine, "phi-test")
    api = TestClient(create_app(engine, config))
    headers = {"X-API-Key": key, "Content-Type": "application/fhir+json"}
    created = api.post("/fhir/Patient", content=json.dumps(fhir_patient()), headers=headers)
    assert created.status_code == 201, created.text
    refused = [
        api.post("/fhir/Patient", content=json.dumps(fhir_patient(nickname=GIVEN)),
                 headers=headers),
        api.post("/fhir/Patient", content=json.dumps(fhir_patient(birthDate=FAMILY)),
                 headers=headers),
        api.post("/fhir/Patient", content=b'{"resourceType": "Patient", "name": [{"family": "'
                 + FAMILY.encode() + b'"', headers=headers),
    ]
    assert [answer.status_code // 100 for answer in refused] == [4, 4, 4]
    assert api.get(f"/fhir/Patient/{created.json()['id']}", headers=headers).status_code == 200
    process_pending(engine, config)
    search = api.get("/api/v1/messages", headers=headers)
    assert search.status_code == 200
    for item in search.json()["items"][:5]:
        api.get(f"/api/v1/messages/{item['id']}/raw", headers=headers)
        api.get(f"/api/v1/messages/{item['id']}/canonical", headers=headers)

    text = captured_text(caplog)
    assert len(caplog.records) > 20, "the paths above log their starts, stops and errors"
    leaked = [secret for secret in SECRETS if secret in text]
    assert not leaked, f"patient data in the logs: {leaked}"
