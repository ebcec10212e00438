"""Authorizations from REF^I12 and FHIR, the scheduling check on the bundled SIU^S12, expiry warnings."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from carebridge.config.model import Configuration
from carebridge.engine.intake import store_inputs
from carebridge.engine.processor import process_pending
from carebridge.ingest.files.sources import discover, split_path
from carebridge.store.schema import (
    authorizations,
    messages,
    scheduled_services,
    workflow_cursors,
    workflow_marks,
    work_items,
)
from carebridge.workflows import authorizations as authorization_step
from carebridge.workflows.authorizations import authorization_status
from carebridge.workflows.steps import run_workflow_steps

from .conftest import DEMO, hl7

SIU_SAMPLE = DEMO / "data" / "hl7v2" / "hl7v2-microsoft-fhir-converter" / "SIU-S12-01.hl7"
"""Books SNOMED 76164006 (biopsy of colon) for patient PATID1234 on 2021-09-24."""

PATIENT = "PATID1234"
BIOPSY = "76164006"
VISIT = dt.date(2021, 9, 24)


def referral(control_id: str, status: str = "A", code: str = BIOPSY) -> bytes:
    """A REF^I12 for PATID1234 under referral REF-2021-0042, authorized 2021-09-01..10-31."""
    return hl7(
        f"MSH|^~\\&|REFSYS|CLINICA|CAREBRIDGE|HOSP|20210901080000||REF^I12^REF_I12|{control_id}|P|2.5",
        f"RF1|{status}^Accepted^HL70283|R^Routine|MED^Medical|GI^Gastroenterology|S^Specialist|"
        "REF-2021-0042|20210901|20211031",
        "AUT|PLAN01|PAYER01|Payer One|20210901|20211031|AUTH-7788||1|1",
        f"PID|1||{PATIENT}^^^GHHSFacility^MR||TESTPATIENT^ALPHA",
        f"PR1|1||{code}^Biopsy of colon^SCT|||20210924",
    )


def _ingest(engine: Engine, config: Configuration, tmp_path: Path, name: str, raw: bytes,
            as_of: dt.date = VISIT):
    folder = tmp_path / name.replace(".", "_")
    folder.mkdir()
    (folder / name).write_bytes(raw)
    for path in discover([folder]).files:
        store_inputs(engine, split_path(path), source="test")
    process_pending(engine, config, as_of=dt.date(2025, 6, 1))
    return run_workflow_steps(engine, config, as_of=as_of, until_idle=True)


def _count(engine: Engine, table, *where) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def _status(engine: Engine, code: str, on: dt.date, patient: str = PATIENT) -> str:
    with engine.connect() as conn:
        return authorization_status(conn, patient, code, on)


def test_booking_held_until_referral_approves(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    booked = _ingest(engine, config, tmp_path, SIU_SAMPLE.name, SIU_SAMPLE.read_bytes())

    assert booked.scheduled == 1
    missing = (work_items.c.reason == "authorization_missing",
               work_items.c.subject_key.like("schedule:%"))
    with engine.connect() as conn:
        item = conn.execute(select(work_items).where(*missing)).mappings().one()
        booking = conn.execute(select(scheduled_services)).mappings().one()
    assert item["team"] == "revenue_cycle"
    assert item["status"] == "open"
    assert "2021-09-24" in item["detail"]
    assert (booking["code_system"], booking["code"]) == ("SNOMED", BIOPSY)
    assert booking["authorization_status"] == "missing"
    assert _status(engine, BIOPSY, VISIT) == "missing"

    _ingest(engine, config, tmp_path, "ref1.hl7", referral("REF0001"))

    with engine.connect() as conn:
        record = conn.execute(select(authorizations)).mappings().one()
        item_status = conn.execute(select(work_items.c.status).where(*missing)).scalar_one()
        booking_status = conn.execute(
            select(scheduled_services.c.authorization_status)).scalar_one()
    assert record["status"] == "approved"
    assert record["units"] == Decimal("1")
    assert record["valid_from"] == dt.date(2021, 9, 1)
    assert record["valid_to"] == dt.date(2021, 10, 31)
    assert record["reference"] == "AUTH-7788"
    assert record["source"] == "hl7v2:REF^I12"
    assert item_status == "resolved"
    assert booking_status == "approved"
    assert _status(engine, BIOPSY, VISIT) == "approved"
    assert _status(engine, BIOPSY, dt.date(2021, 11, 1)) == "expired"
    assert _status(engine, BIOPSY, dt.date(2021, 8, 31)) == "missing"
    assert _status(engine, BIOPSY, VISIT, patient="OTHER") == "missing"


def test_referral_update_keeps_one_record(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    _ingest(engine, config, tmp_path, "ref1.hl7", referral("REF0001", status="P"))
    assert _status(engine, BIOPSY, VISIT) == "pending"

    _ingest(engine, config, tmp_path, "ref1b.hl7", referral("REF0001", status="P"))
    _ingest(engine, config, tmp_path, "ref2.hl7", referral("REF0002", status="A"))

    assert _count(engine, authorizations) == 1
    assert _status(engine, BIOPSY, VISIT) == "approved"
    _ingest(engine, config, tmp_path, "ref3.hl7", referral("REF0003", status="R"))
    assert _count(engine, authorizations) == 1
    assert _status(engine, BIOPSY, VISIT) == "missing"


def test_expiry_warning_once(engine: Engine, config: Configuration, tmp_path: Path) -> None:
    far = _ingest(engine, config, tmp_path, "ref1.hl7", referral("REF0001"),
                  as_of=dt.date(2021, 9, 2))
    assert far.expiry_warnings == 0

    near = run_workflow_steps(engine, config, as_of=dt.date(2021, 10, 20))
    again = run_workflow_steps(engine, config, as_of=dt.date(2021, 10, 21))

    assert near.expiry_warnings == 1
    assert again.expiry_warnings == 0
    with engine.connect() as conn:
        item = conn.execute(select(work_items).where(
            work_items.c.reason == "authorization_expiring")).mappings().one()
    assert item["team"] == "revenue_cycle"
    assert "2021-10-31" in item["detail"]


def test_referral_without_service_is_a_work_item(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    raw = referral("REF0009").replace(b"PR1|1||76164006^Biopsy of colon^SCT|||20210924\r", b"")
    result = _ingest(engine, config, tmp_path, "ref9.hl7", raw)

    assert result.work_items == 1
    assert _count(engine, authorizations) == 0
    with engine.connect() as conn:
        item = conn.execute(select(work_items).where(
            work_items.c.subject_key.like("authorization:message:%"))).mappings().one()
    assert item["reason"] == "malformed_input"
    assert "PR1-3 or OBR-4" in item["detail"]


CPT = "http://www.ama-assn.org/go/cpt"
CLAIM_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type",
                          "code": "professional"}]}


def preauthorization_claim() -> dict:
    return {
        "resourceType": "Claim", "id": "pa-1", "status": "active", "type": CLAIM_TYPE,
        "use": "preauthorization", "patient": {"reference": "Patient/pat-fhir-1"},
        "created": "2024-02-20", "provider": {"reference": "Organization/org-1"},
        "priority": {"coding": [{"code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": True, "coverage": {"reference": "Coverage/cov-1"}}],
        "item": [{"sequence": 1, "productOrService": {"coding": [{"system": CPT, "code": "70450"}]},
                  "quantity": {"value": 1}, "servicedDate": "2024-03-05"}],
    }


def preauthorization_response(outcome: str = "complete") -> dict:
    return {
        "resourceType": "ClaimResponse", "id": "par-1", "status": "active", "type": CLAIM_TYPE,
        "use": "preauthorization", "patient": {"reference": "Patient/pat-fhir-1"},
        "created": "2024-02-22", "insurer": {"reference": "Organization/payer-1"},
        "request": {"reference": "Claim/pa-1"}, "outcome": outcome,
        "preAuthRef": "PA-123456",
        "preAuthPeriod": {"start": "2024-02-22", "end": "2024-05-22"},
    }


def service_request() -> dict:
    return {
        "resourceType": "ServiceRequest", "id": "sr-1", "status": "active", "intent": "order",
        "identifier": [{"value": "REF-778"}],
        "code": {"coding": [{"system": CPT, "code": "72148"}]},
        "subject": {"reference": "Patient/pat-fhir-1"},
        "quantityQuantity": {"value": 2},
        "occurrencePeriod": {"start": "2024-03-01", "end": "2024-06-30"},
    }


def _fhir(document: dict) -> bytes:
    return json.dumps(document).encode()


def test_fhir_preauthorization_and_service_request(
    engine: Engine, config: Configuration, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _ingest(engine, config, tmp_path, "claim.json", _fhir(preauthorization_claim()))
    assert _status(engine, "70450", dt.date(2024, 3, 5), "pat-fhir-1") == "pending"

    _ingest(engine, config, tmp_path, "response.json", _fhir(preauthorization_response()))
    _ingest(engine, config, tmp_path, "request.json", _fhir(service_request()))

    with engine.connect() as conn:
        rows = {row["auth_key"]: row for row in
                conn.execute(select(authorizations)).mappings()}
    assert set(rows) == {"fhir:Claim/pa-1#1", "fhir:ServiceRequest/sr-1"}
    claim = rows["fhir:Claim/pa-1#1"]
    assert claim["status"] == "approved"
    assert claim["reference"] == "PA-123456"
    assert claim["valid_to"] == dt.date(2024, 5, 22)
    assert (claim["code_system"], claim["code"]) == ("CPT", "70450")
    referral_row = rows["fhir:ServiceRequest/sr-1"]
    assert referral_row["units"] == Decimal("2")
    assert referral_row["reference"] == "REF-778"
    assert _status(engine, "70450", dt.date(2024, 3, 5), "pat-fhir-1") == "approved"
    assert _status(engine, "70450", dt.date(2024, 6, 1), "pat-fhir-1") == "expired"
    assert _status(engine, "72148", dt.date(2024, 4, 1), "pat-fhir-1") == "approved"

    # The Claim resent (a new version of the resource) keeps the payer's decision.
    resent = preauthorization_claim() | {"created": "2024-02-23"}
    _ingest(engine, config, tmp_path, "claim2.json", _fhir(resent))
    assert _count(engine, authorizations) == 2
    assert _status(engine, "70450", dt.date(2024, 3, 5), "pat-fhir-1") == "approved"

    # Once messages are old enough the cursor moves past them and drops their marks.
    monkeypatch.setattr(authorization_step, "CURSOR_GRACE", dt.timedelta(0))
    run_workflow_steps(engine, config, as_of=dt.date(2024, 1, 1))
    with engine.connect() as conn:
        newest = conn.execute(select(func.max(messages.c.id))).scalar_one()
        cursor = conn.execute(select(workflow_cursors.c.last_message_id)).scalar_one()
    assert cursor == newest
    assert _count(engine, workflow_marks) == 0


def test_denied_preauthorization(engine: Engine, config: Configuration, tmp_path: Path) -> None:
    _ingest(engine, config, tmp_path, "claim.json", _fhir(preauthorization_claim()))
    _ingest(engine, config, tmp_path, "response.json",
            _fhir(preauthorization_response(outcome="error")))
    assert _status(engine, "70450", dt.date(2024, 3, 5), "pat-fhir-1") == "missing"


def test_bundled_siu_copy_is_one_booking(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    _ingest(engine, config, tmp_path, SIU_SAMPLE.name, SIU_SAMPLE.read_bytes())
    _ingest(engine, config, tmp_path, "again.hl7", SIU_SAMPLE.read_bytes())
    assert _count(engine, scheduled_services) == 1
    assert _count(engine, work_items, work_items.c.reason == "authorization_missing") == 1


def office_visit(control_id: str, day: str) -> bytes:
    """A DFT^P03 charging one 99213 office visit to PATID1234 on ``day`` (YYYYMMDD)."""
    return hl7(
        f"MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|{day}120000||DFT^P03|{control_id}|P|2.5",
        f"EVN|P03|{day}120000",
        f"PID|1||{PATIENT}^^^GHHSFacility^MR||TESTPATIENT^ALPHA",
        f"PV1|1|O|CLINIC1||||||||||||||||VIS{control_id}",
        f"FT1|1|TXN{control_id}||{day}|{day}|CG|99213^OFFICE VISIT EST^CPT|||1|135.50&USD",
    )


def test_units_charged_beyond_the_authorization_are_exhausted(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    # One unit of 99213 authorized for September and October 2021.
    granted = referral("REFU01", code="99213").replace(b"^Biopsy of colon^SCT", b"^Visit^CPT")
    _ingest(engine, config, tmp_path, "ref.hl7", granted)
    _ingest(engine, config, tmp_path, "visit1.hl7", office_visit("DFTU01", "20210910"))

    def status(day: dt.date, *, count_units: bool = True) -> str:
        with engine.connect() as conn:
            return authorization_status(conn, PATIENT, "99213", day, code_system="CPT",
                                        count_units=count_units)

    assert status(dt.date(2021, 9, 10)) == "approved"
    _ingest(engine, config, tmp_path, "visit2.hl7", office_visit("DFTU02", "20211005"))
    # The first visit used the one unit; the second goes beyond it.
    assert status(dt.date(2021, 9, 10)) == "approved"
    assert status(dt.date(2021, 10, 5)) == "exhausted"
    # A booking is checked without counting units.
    assert status(dt.date(2021, 10, 5), count_units=False) == "approved"
