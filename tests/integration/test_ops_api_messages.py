"""Operations API on real data: message search, views, replay, master data, audit."""

from __future__ import annotations

import hashlib

from sqlalchemy import Engine, delete, func, select, update

from carebridge.engine.processor import process_pending
from carebridge.store.schema import (
    audit_events,
    charge_lines,
    message_bodies,
    messages,
    retained_bodies,
    services,
)

from .ops_api_data import AS_OF, SYNTHEA_PROCEDURE_ROWS, UNKNOWN_CPT_DFT, Api, api

__all__ = ["api"]  # the module-scoped fixture

MESSAGES = "/api/v1/messages"


def audit_count(engine: Engine, action: str, object_id: str | None = None) -> int:
    query = select(func.count()).select_from(audit_events).where(
        audit_events.c.action == action)
    if object_id is not None:
        query = query.where(audit_events.c.object_id == object_id)
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


def pages(api: Api, role: str, path: str, **params) -> list[list[dict]]:
    """Follow next links from the first page and return the items of each page."""
    answer = api.get(role, path, **params)
    assert answer.status_code == 200, answer.text
    found = [answer.json()["items"]]
    while answer.json().get("next"):
        answer = api.get(role, answer.json()["next"])
        assert answer.status_code == 200, answer.text
        found.append(answer.json()["items"])
    return found


def walk(api: Api, role: str, path: str, **params) -> list[dict]:
    """Return the items of every page, following next links."""
    return [item for items in pages(api, role, path, **params) for item in items]


def dft_message_id(api: Api) -> int:
    found = api.get("admin", MESSAGES, control_id="CTLOPS1").json()["items"]
    assert len(found) == 1
    return found[0]["id"]


def test_search_filters_and_pages(api: Api) -> None:
    searches_before = audit_count(api.engine, "message.search")
    dft = api.get("integration-analyst", MESSAGES, control_id="CTLOPS1").json()["items"]
    assert [m["message_type"] for m in dft] == ["DFT^P03"]
    assert dft[0]["patient_id"] == "MRNOPS1"
    assert dft[0]["format"] == "hl7v2"

    by_patient = api.get("auditor", MESSAGES, patient_id="MRNOPS1").json()["items"]
    assert dft[0]["id"] in [m["id"] for m in by_patient]
    by_encounter = api.get("auditor", MESSAGES, encounter_id="VISOPS1").json()["items"]
    assert [m["id"] for m in by_encounter] == [dft[0]["id"]]

    dft_pages = pages(api, "admin", MESSAGES, type="DFT", limit=2)
    dfts = [item for items in dft_pages for item in items]
    assert len(dfts) >= 3
    assert all(m["message_type"].startswith("DFT^") for m in dfts)

    procedure_pages = pages(api, "admin", MESSAGES, type="synthea-csv:procedures",
                            state="processed", limit=70)
    ids = [m["id"] for items in procedure_pages for m in items]
    assert len(ids) == SYNTHEA_PROCEDURE_ROWS
    assert ids == sorted(set(ids), reverse=True)

    everything = api.get("admin", MESSAGES, source="files", limit=500).json()
    assert everything["next"] is not None
    assert len(everything["items"]) == 500

    future = api.get("admin", MESSAGES, received_from="2999-01-01T00:00:00Z").json()
    assert future == {"items": [], "next": None, "next_cursor": None}

    # One audit row per response that listed messages, none for the empty one.
    answered = 3 + len(dft_pages) + len(procedure_pages) + 1
    assert audit_count(api.engine, "message.search") - searches_before == answered


def test_search_rejects_invalid_input(api: Api) -> None:
    for params, location in (
        ({"cursor": "bm90LWEtY3Vyc29y"}, "query.cursor"),
        ({"cursor": 0}, "query.cursor"),
        ({"type": "not a type"}, "query.type"),
        ({"type": "???"}, "query.type"),
        ({"patient_id": "MRN\x00"}, "query.patient_id"),
        ({"limit": 501}, "query.limit"),
        ({"state": "lost"}, "query.state"),
    ):
        answer = api.get("admin", MESSAGES, **params)
        assert answer.status_code == 422, params
        assert answer.json()["location"] == location
    backwards = api.get("admin", MESSAGES, received_from="2025-01-02T00:00:00Z",
                        received_to="2025-01-01T00:00:00Z")
    assert backwards.json()["items"] == []
    assert api.get("admin", f"{MESSAGES}/0").status_code == 422
    assert api.get("admin", f"{MESSAGES}/2147483648").status_code == 422
    assert api.get("admin", f"{MESSAGES}/2147483647").status_code == 404
    assert api.get("supply-chain", MESSAGES).status_code == 403
    assert api.client.get(MESSAGES).status_code == 401


def test_message_views_are_audited(api: Api) -> None:
    engine = api.engine
    message_id = dft_message_id(api)
    reads_before = audit_count(engine, "message.read", str(message_id))

    detail = api.get("auditor", f"{MESSAGES}/{message_id}").json()
    assert detail["control_id"] == "CTLOPS1"
    assert detail["state"] == "processed"
    assert detail["content_sha256"] == hashlib.sha256(UNKNOWN_CPT_DFT).hexdigest()
    assert len(detail["work_item_ids"]) == 1

    raw = api.get("auditor", f"{MESSAGES}/{message_id}/raw").json()
    assert raw["encoding"] == "text"
    assert raw["content"].encode() == UNKNOWN_CPT_DFT
    assert raw["size"] == len(UNKNOWN_CPT_DFT)

    lineage = api.get("revenue-cycle", f"{MESSAGES}/{message_id}/canonical").json()
    assert [(s["code"], s["outcome"]) for s in lineage["services"]] == [
        ("99999", "work_item")]
    assert [w["reason"] for w in lineage["work_items"]] == ["unknown_code"]
    assert lineage["charge_lines"] == []
    assert [e["encounter_id"] for e in lineage["encounters"]] == ["VISOPS1"]

    assert audit_count(engine, "message.read", str(message_id)) == reads_before + 1
    assert audit_count(engine, "message.raw.read", str(message_id)) == 1
    assert audit_count(engine, "message.canonical.read", str(message_id)) == 1
    with engine.connect() as conn:
        actors = conn.execute(select(audit_events.c.actor).where(
            audit_events.c.object_id == str(message_id),
            audit_events.c.action.like("message.%"))).scalars().all()
        details = conn.execute(select(audit_events.c.detail)).scalars().all()
    assert set(actors) == {"client:auditor", "client:revenue-cycle"}
    assert not any("OMEGA" in (d or "") or "TESTPATIENT" in (d or "") for d in details)


def test_charged_message_lineage(api: Api) -> None:
    with api.engine.connect() as conn:
        message_id, service_key = conn.execute(
            select(services.c.message_id, services.c.service_key)
            .join(charge_lines, charge_lines.c.service_id == services.c.id)
            .where(charge_lines.c.journal_id.is_not(None))
            .order_by(services.c.id).limit(1)).one()
    lineage = api.get("admin", f"{MESSAGES}/{message_id}/canonical").json()
    assert [line["service_key"] for line in lineage["charge_lines"]] == [service_key]
    journal_id = lineage["charge_lines"][0]["journal_id"]
    assert journal_id in lineage["journal_ids"]
    assert {d["record_id"] for d in lineage["deliveries"]} == {journal_id}
    assert {d["destination"] for d in lineage["deliveries"]} == {"erp"}


def test_pruned_content_answers_410(api: Api) -> None:
    message_id = api.get("admin", MESSAGES, type="ADT^A01").json()["items"][0]["id"]
    with api.engine.begin() as conn:
        conn.execute(delete(message_bodies).where(message_bodies.c.message_id == message_id))
        conn.execute(delete(retained_bodies).where(
            retained_bodies.c.message_id == message_id))
        conn.execute(update(messages).where(messages.c.id == message_id).values(
            content_pruned_at=func.now(), content_archive="archive/2025-03.jsonl.gz"))
    raw = api.get("admin", f"{MESSAGES}/{message_id}/raw")
    assert raw.status_code == 410
    assert "archive/2025-03.jsonl.gz" in raw.json()["detail"]
    replay = api.post("admin", f"{MESSAGES}/{message_id}/replay")
    assert replay.status_code == 410
    assert api.get("admin", f"{MESSAGES}/{message_id}").json()["content_pruned"] is True


def test_replay_posts_nothing_twice(api: Api) -> None:
    engine = api.engine
    with engine.connect() as conn:
        message_id = conn.execute(
            select(services.c.message_id)
            .join(charge_lines, charge_lines.c.service_id == services.c.id)
            .order_by(services.c.id).limit(1)).scalar_one()
        charges_before = conn.execute(select(func.count()).select_from(charge_lines)).scalar()

    assert api.post("revenue-cycle", f"{MESSAGES}/{message_id}/replay").status_code == 403
    answer = api.post("integration-analyst", f"{MESSAGES}/{message_id}/replay")
    assert answer.status_code == 202
    replay = answer.json()
    assert replay["replay_of"] == message_id
    assert replay["state"] == "received"

    process_pending(engine, api.config, as_of=AS_OF)
    copy = api.get("admin", f"{MESSAGES}/{replay['message_id']}").json()
    assert copy["state"] == "processed"
    assert copy["replay_of"] == message_id
    assert copy["summary"]["outcomes"] == {"clinical_duplicate": 1}
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(charge_lines)).scalar() == \
            charges_before
    original = api.get("admin", f"{MESSAGES}/{message_id}").json()
    assert original["replays"] == [replay["message_id"]]
    assert audit_count(engine, "message.replay", str(replay["message_id"])) == 1


def test_master_data_routes(api: Api) -> None:
    config = api.config
    versions = api.get("supply-chain", "/api/v1/master-data/chargemaster/versions").json()
    current = versions[0]
    assert current["current"] is True
    assert current["version_id"] == config.chargemaster_version.version_id
    assert current["items"] == len(config.chargemaster)
    with api.engine.connect() as conn:
        assert current["charge_lines"] == conn.execute(
            select(func.count()).select_from(charge_lines)).scalar()

    items = "/api/v1/master-data/chargemaster/items"
    xray = api.get("finance", items, cpt="71046").json()["items"]
    assert "2806553" in [item["charge_code"] for item in xray]
    assert {item["hcpcs"] for item in xray} == {"71046"}
    assert api.get("finance", items, code="10001").json()["items"][0]["price"] == "352.00"
    sedation = walk(api, "finance", items, description="sedation", limit=2)
    codes = [item["charge_code"] for item in sedation]
    assert len(codes) >= 3
    assert codes == sorted(set(codes))
    assert all("SEDATION" in item["description"].upper() for item in sedation)

    crosswalk = api.get("finance", "/api/v1/master-data/crosswalks", system="CPT",
                        code="71046").json()["items"]
    assert crosswalk == [{"source_system": "CPT", "source_code": "71046",
                          "charge_code": "2806553"}]
    supplies = walk(api, "finance", "/api/v1/master-data/supply-items", chargeable=False,
                    limit=10)
    assert len(supplies) == sum(not s.chargeable for s in config.supply_items.values())
    assert api.get("auditor", items, revenue_code="12").status_code == 422


def test_audit_query_and_verify(api: Api) -> None:
    engine = api.engine
    message_id = dft_message_id(api)
    api.get("revenue-cycle", f"{MESSAGES}/{message_id}/raw")
    events = api.get("auditor", "/api/v1/audit/events", actor="client:revenue-cycle",
                     action="message.raw.read").json()["items"]
    assert [(e["object_type"], e["object_id"]) for e in events] == [
        ("message", str(message_id))]
    assert api.get("revenue-cycle", "/api/v1/audit/events").status_code == 403

    every = walk(api, "auditor", "/api/v1/audit/events", limit=2)
    assert [e["id"] for e in every] == sorted((e["id"] for e in every), reverse=True)

    verified = api.get("auditor", "/api/v1/audit/verify").json()
    assert verified["ok"] is True
    assert verified["rows"] == len(every)

    with engine.begin() as conn:
        actor = conn.execute(select(audit_events.c.actor)
                             .where(audit_events.c.id == 2)).scalar_one()
        conn.execute(update(audit_events).where(audit_events.c.id == 2)
                     .values(actor="client:someone-else"))
    broken = api.get("auditor", "/api/v1/audit/verify").json()
    with engine.begin() as conn:
        conn.execute(update(audit_events).where(audit_events.c.id == 2).values(actor=actor))
    assert broken["ok"] is False
    assert broken["broken_id"] == 2
    assert "row 2" in broken["problem"]
