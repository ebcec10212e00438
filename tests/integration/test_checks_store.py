"""The checks on a real database: flags become work items, and only a person merges."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, func, insert, select

from carebridge.checks.labelled_patients import generate_patient_index
from carebridge.checks.merge import MergeError, approve_merge, reject_duplicate
from carebridge.checks.run import run_checks
from carebridge.store.schema import (
    audit_events,
    charge_lines,
    encounters,
    journal_lines,
    journals,
    messages,
    patient_links,
    patients,
    services,
    supply_issues,
    work_item_events,
    work_items,
)

NOW = dt.datetime(2026, 1, 10, 12, 0, tzinfo=dt.UTC)


def _message(conn: Connection, key: str) -> int:
    return conn.execute(insert(messages).values(
        source="test", format="csv", received_at=NOW, content_sha256="0" * 64,
        dedup_key=key, state="processed",
    )).inserted_primary_key[0]


def _patient(conn: Connection, patient_id: str, record: dict[str, Any]) -> None:
    message_id = _message(conn, f"patient:{patient_id}")
    birth = record.get("birth_date")
    conn.execute(insert(patients).values(
        patient_id=patient_id, given_name=record.get("given_name"),
        family_name=record.get("family_name"),
        birth_date=dt.date.fromisoformat(birth) if birth else None,
        gender=record.get("gender"), home_phone=record.get("phone"),
        source_message_id=message_id, updated_message_id=message_id,
    ))


def _encounter(conn: Connection, encounter_id: str, patient_id: str,
               charges: list[tuple[str, str, str]]) -> None:
    message_id = _message(conn, f"encounter:{encounter_id}")
    conn.execute(insert(encounters).values(
        encounter_id=encounter_id, patient_id=patient_id, encounter_class="ambulatory",
        code="185345009", code_system="SNOMED", source_message_id=message_id,
        updated_message_id=message_id,
    ))
    conn.execute(insert(services).values(
        service_key=f"{encounter_id}:proc", message_id=message_id, origin="clinical",
        kind="procedure", code_system="SNOMED", code="117015009", quantity=Decimal("1"),
        patient_id=patient_id, encounter_id=encounter_id, fingerprint="f",
        outcome="charged",
    ))
    for number, (code, units, amount) in enumerate(charges):
        service_id = conn.execute(insert(services).values(
            service_key=f"{encounter_id}:{number}", message_id=message_id,
            origin="clinical", kind="procedure", code_system="SNOMED", code=code,
            quantity=Decimal(units), patient_id=patient_id, encounter_id=encounter_id,
            fingerprint="f", outcome="charged",
        )).inserted_primary_key[0]
        conn.execute(insert(charge_lines).values(
            service_key=f"{encounter_id}:{number}", service_id=service_id, charge_code=code,
            revenue_code="0300", units=Decimal(units),
            unit_price=Decimal(amount) / Decimal(units), amount=Decimal(amount),
            currency="USD", service_date=dt.date(2025, 6, 1), department="LAB",
            gl_account="4000", patient_id=patient_id, encounter_id=encounter_id,
            source_message_id=message_id, chargemaster_version="v1",
        ))


@pytest.fixture()
def seeded(engine: Engine) -> dict[str, Any]:
    """A database with 120 patients (a tenth duplicates) and 40 encounters.

    Encounters of the first 38 patients bill VISIT and LAB; ``gap`` lacks
    LAB, and ``slip`` bills ten units of VISIT.
    """
    index = generate_patient_index(120, seed=11)
    ids = [str(record["unique_id"]) for record in index.records]
    with engine.begin() as conn:
        for record in index.records:
            _patient(conn, str(record["unique_id"]), record)
        for n in range(38):
            _encounter(conn, f"enc-{n}", ids[n],
                       [("VISIT", "1", "100.00"), ("LAB", "1", "30.00")])
        _encounter(conn, "gap", ids[38], [("VISIT", "1", "100.00")])
        _encounter(conn, "slip", ids[39], [("VISIT", "10", "1000.00"), ("LAB", "1", "30.00")])
    return {"index": index}


def _postings(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {
            table.name: [tuple(row) for row in conn.execute(select(table).order_by(
                *table.primary_key.columns))]
            for table in (charge_lines, journals, journal_lines, supply_issues)
        }


def _items(engine: Engine, reason: str) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(select(work_items).where(work_items.c.reason == reason)
                            .order_by(work_items.c.id)).all()


def test_checks_open_work_items(engine, seeded):
    before = _postings(engine)
    result = run_checks(engine, now=NOW)
    assert _postings(engine) == before
    assert result.patients == 120
    duplicates = _items(engine, "duplicate_patient")
    flagged = {tuple(json.loads(item.detail)[key] for key in
                     ("left_patient_id", "right_patient_id")) for item in duplicates}
    true_pairs = seeded["index"].true_pairs
    assert len(flagged & true_pairs) >= len(true_pairs) - 2
    assert flagged <= true_pairs
    detail = json.loads(duplicates[0].detail)
    assert detail["match_probability"] >= 0.8
    assert set(detail["levels"]) == {"given_name", "family_name", "birth_date", "gender",
                                     "phone"}
    assert duplicates[0].team == "integration"
    [missing] = _items(engine, "missing_charge")
    assert missing.subject_key == "encounter:gap:charge:LAB"
    assert missing.amount_at_risk == Decimal("30.00")
    assert json.loads(missing.detail)["feature"] in {"encounter:SNOMED:185345009",
                                                     "procedure:SNOMED:117015009"}
    [units] = _items(engine, "units_anomaly")
    assert json.loads(units.detail)["encounter_id"] == "slip"
    assert units.amount_at_risk == Decimal("900.00")
    assert units.priority > missing.priority
    assert units.priority_reason == "USD 900.00 at risk; SLA due in 2 days"


def test_checks_rerun_opens_nothing(engine, seeded):
    first = run_checks(engine, now=NOW)
    second = run_checks(engine, now=NOW)
    assert sum(first.opened.values()) >= 3
    assert sum(second.opened.values()) == 0
    assert second.flagged == first.flagged


def test_merge_only_after_approval(engine, seeded):
    run_checks(engine, now=NOW)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(patient_links)).scalar() == 0
    item = _items(engine, "duplicate_patient")[0]
    detail = json.loads(item.detail)
    left, right = detail["left_patient_id"], detail["right_patient_id"]
    with engine.begin() as conn:
        _encounter(conn, "of-right", right, [("VISIT", "1", "100.00")])
    result = approve_merge(engine, item.id, "analyst@example.org", surviving_patient_id=left)
    assert result.merged_patient_id == right
    assert result.repointed["encounters"] >= 1
    assert result.repointed["charge_lines"] >= 1
    with engine.connect() as conn:
        moved = conn.execute(select(encounters.c.patient_id)
                             .where(encounters.c.encounter_id == "of-right")).scalar()
        charged = conn.execute(select(charge_lines.c.patient_id)
                               .where(charge_lines.c.encounter_id == "of-right")).scalar()
        link = conn.execute(select(patient_links)).one()
        status = conn.execute(select(work_items.c.status, work_items.c.resolved_by)
                              .where(work_items.c.id == item.id)).one()
        events = conn.execute(select(work_item_events.c.actor, work_item_events.c.action)
                              .where(work_item_events.c.work_item_id == item.id)).all()
        audited = conn.execute(select(audit_events.c.action, audit_events.c.object_id)).all()
    assert moved == left
    assert charged == left
    assert (link.merged_patient_id, link.surviving_patient_id) == (right, left)
    assert link.linked_by == "analyst@example.org"
    assert tuple(status) == ("approved", "analyst@example.org")
    assert [tuple(event) for event in events] == [("analyst@example.org", "approved")]
    assert ("patient.merge", right) in [tuple(row) for row in audited]
    with pytest.raises(MergeError, match="is approved"):
        approve_merge(engine, item.id, "analyst@example.org")


def test_rejected_duplicate_stays_closed(engine, seeded):
    run_checks(engine, now=NOW)
    item = _items(engine, "duplicate_patient")[0]
    before = _postings(engine)
    reject_duplicate(engine, item.id, "analyst@example.org", "twins")
    run_checks(engine, now=NOW)
    with engine.connect() as conn:
        status = conn.execute(select(work_items.c.status)
                              .where(work_items.c.id == item.id)).scalar()
        links = conn.execute(select(func.count()).select_from(patient_links)).scalar()
    assert status == "rejected"
    assert links == 0
    assert _postings(engine) == before
    with pytest.raises(MergeError, match="is rejected"):
        approve_merge(engine, item.id, "analyst@example.org")


def test_merge_rejects_other_reasons(engine, seeded):
    run_checks(engine, now=NOW)
    [missing] = _items(engine, "missing_charge")
    with pytest.raises(MergeError, match="not a duplicate_patient item"):
        approve_merge(engine, missing.id, "analyst@example.org")
    item = _items(engine, "duplicate_patient")[0]
    with pytest.raises(MergeError, match="not one of the pair"):
        approve_merge(engine, item.id, "analyst@example.org", surviving_patient_id="nobody")
    with pytest.raises(MergeError, match="needs the actor"):
        approve_merge(engine, item.id, " ")


def test_api_approval_merges_the_pair(engine, seeded, config):
    from fastapi.testclient import TestClient

    from carebridge.api.app import create_app
    from carebridge.api.security import Role, create_api_key, create_client

    run_checks(engine, now=NOW)
    item = _items(engine, "duplicate_patient")[0]
    detail = json.loads(item.detail)
    create_client(engine, "controller", frozenset({Role.FINANCE}))
    key = create_api_key(engine, "controller")
    api = TestClient(create_app(engine, config))
    answer = api.post(f"/api/v1/work-items/{item.id}/approve", headers={"X-API-Key": key})
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "approved"
    with engine.connect() as conn:
        link = conn.execute(select(patient_links)).one()
    assert {link.merged_patient_id, link.surviving_patient_id} == {
        detail["left_patient_id"], detail["right_patient_id"]}
    assert link.work_item_id == item.id
