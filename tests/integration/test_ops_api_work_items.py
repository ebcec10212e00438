"""Operations API on real data: the work queue, its state machine, corrections, deliveries."""

from __future__ import annotations

import base64
import datetime as dt
from decimal import Decimal

from sqlalchemy import func, select

from carebridge.engine.processor import process_pending
from carebridge.store.schema import (
    audit_events,
    charge_lines,
    deliveries,
    messages,
    work_item_events,
)

from .ops_api_data import AS_OF, CORRECTED_DFT, Api, api

__all__ = ["api"]  # the module-scoped fixture

ITEMS = "/api/v1/work-items"
DELIVERIES = "/api/v1/deliveries"


def audit_actions(api: Api, object_type: str, object_id: int) -> list[tuple[str, str]]:
    with api.engine.connect() as conn:
        rows = conn.execute(
            select(audit_events.c.actor, audit_events.c.action)
            .where(audit_events.c.object_type == object_type,
                   audit_events.c.object_id == str(object_id))
            .order_by(audit_events.c.id)).all()
    return [tuple(row) for row in rows]


def walk(api: Api, role: str, path: str, **params) -> list[dict]:
    answer = api.get(role, path, **params)
    assert answer.status_code == 200, answer.text
    items = list(answer.json()["items"])
    while answer.json().get("next"):
        answer = api.get(role, answer.json()["next"])
        assert answer.status_code == 200, answer.text
        items.extend(answer.json()["items"])
    return items


def parse(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def test_queue_order_and_due_times(api: Api) -> None:
    queue = walk(api, "revenue-cycle", ITEMS, limit=60)
    assert len(queue) > 60
    assert {item["team"] for item in queue} == {"revenue_cycle"}
    ids = [item["id"] for item in queue]
    assert len(ids) == len(set(ids))
    order = [(-item["priority"], item["due_at"], item["id"]) for item in queue]
    assert order == sorted(order)
    for item in queue:
        assert parse(item["due_at"]) - parse(item["created_at"]) == dt.timedelta(hours=48)

    unknown = walk(api, "admin", ITEMS, reason="unknown_code", status="open", limit=100)
    assert unknown
    assert {item["reason"] for item in unknown} == {"unknown_code"}
    later = api.get("admin", ITEMS, created_from="2999-01-01T00:00:00Z").json()["items"]
    assert later == []
    assert api.get("admin", ITEMS, reason="no_such_reason").status_code == 422


def test_team_scoping(api: Api) -> None:
    supply = api.get("supply-chain", ITEMS).json()["items"]
    assert [(item["team"], item["reason"]) for item in supply] == [
        ("supply_chain", "unknown_item")]
    item_id = supply[0]["id"]
    assert api.get("revenue-cycle", f"{ITEMS}/{item_id}").status_code == 404
    assert api.post("revenue-cycle", f"{ITEMS}/{item_id}/claim").status_code == 404
    assert api.get("revenue-cycle", ITEMS, team="supply_chain").json()["items"] == []

    detail = api.get("supply-chain", f"{ITEMS}/{item_id}").json()
    assert detail["supply_usages"][0]["code"] == "999999999"
    assert detail["supply_usages"][0]["outcome"] == "work_item"
    assert detail["history"] == []
    assert audit_actions(api, "work_item", item_id) == [
        ("client:supply-chain", "work_item.read")]


def test_state_machine(api: Api) -> None:
    item_id = walk(api, "revenue-cycle", ITEMS, reason="date_out_of_range",
                   status="open")[0]["id"]
    path = f"{ITEMS}/{item_id}"

    claimed = api.post("revenue-cycle", f"{path}/claim")
    assert claimed.status_code == 200
    assert claimed.json()["status"] == "claimed"
    assert claimed.json()["assignee"] == "revenue-cycle"
    again = api.post("revenue-cycle", f"{path}/claim")
    assert again.status_code == 409
    assert "claimed" in again.json()["detail"]

    moved = api.post("revenue-cycle", f"{path}/reassign", {"assignee": "rc-analyst-2"})
    assert moved.json()["assignee"] == "rc-analyst-2"
    not_mine = api.post("revenue-cycle", f"{path}/resolve", {"note": "fixed"})
    assert not_mine.status_code == 409
    assert "rc-analyst-2" in not_mine.json()["detail"]
    api.post("admin", f"{path}/reassign", {"assignee": "revenue-cycle"})

    assert api.post("revenue-cycle", f"{path}/resolve", {}).status_code == 422
    resolved = api.post("revenue-cycle", f"{path}/resolve",
                        {"note": "service date confirmed with the clinic"})
    assert resolved.status_code == 200
    assert resolved.json()["status"] == "resolved"
    assert resolved.json()["resolved_by"] == "client:revenue-cycle"

    assert api.post("revenue-cycle", f"{path}/reject", {"reason": "no"}).status_code == 403
    rejected = api.post("finance", f"{path}/reject", {"reason": "not billable"})
    assert rejected.json()["status"] == "rejected"
    for action, body in (("resolve", {"note": "again"}), ("approve", None),
                         ("claim", None), ("reject", {"reason": "again"})):
        answer = api.post("admin", f"{path}/{action}", body)
        assert answer.status_code == 409, action
        assert "rejected" in answer.json()["detail"]

    detail = api.get("finance", path).json()
    assert [(e["actor"], e["action"]) for e in detail["history"]] == [
        ("client:revenue-cycle", "claimed"),
        ("client:revenue-cycle", "reassigned"),
        ("client:admin", "reassigned"),
        ("client:revenue-cycle", "resolved"),
        ("client:finance", "rejected"),
    ]
    assert detail["history"][3]["detail"] == {"note": "service date confirmed with the clinic"}
    assert [action for _, action in audit_actions(api, "work_item", item_id)] == [
        "work_item.claim", "work_item.reassign", "work_item.reassign",
        "work_item.resolve", "work_item.reject", "work_item.read"]

    other = walk(api, "finance", ITEMS, reason="date_out_of_range", status="open")[0]
    approved = api.post("finance", f"{ITEMS}/{other['id']}/approve", {"note": "ok"})
    assert approved.json()["status"] == "approved"


def test_resolve_with_corrected_message(api: Api) -> None:
    original_id = api.get("admin", "/api/v1/messages", control_id="CTLOPS1").json()[
        "items"][0]["id"]
    item = api.get("revenue-cycle", ITEMS, message_id=original_id).json()["items"][0]
    assert item["reason"] == "unknown_code"

    answer = api.post("revenue-cycle", f"{ITEMS}/{item['id']}/resolve", {
        "note": "CPT 99999 corrected to 99213 from the chart",
        "corrected_message": {"encoding": "text", "content": CORRECTED_DFT.decode("ascii")},
    })
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["status"] == "resolved"
    correction = result["correction"]
    assert correction["state"] == "processed"
    assert correction["outcomes"] == {"clinical_charged": 1}
    assert correction["work_item_ids"] == []

    corrected = api.get("admin", f"/api/v1/messages/{correction['message_id']}").json()
    assert corrected["replay_of"] == original_id
    with api.engine.connect() as conn:
        amounts = conn.execute(select(charge_lines.c.amount).where(
            charge_lines.c.service_key == "hl7:SENDFAC:TXNOPS1")).scalars().all()
    assert amounts == [Decimal("135.50")]

    again = api.post("revenue-cycle", f"{ITEMS}/{item['id']}/resolve", {
        "note": "again",
        "corrected_message": {"encoding": "base64",
                              "content": base64.b64encode(CORRECTED_DFT).decode()},
    })
    assert again.status_code == 409
    replay = api.post("admin", f"/api/v1/messages/{correction['message_id']}/replay")
    assert replay.status_code == 202
    process_pending(api.engine, api.config, as_of=AS_OF)
    with api.engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(charge_lines).where(
            charge_lines.c.service_key == "hl7:SENDFAC:TXNOPS1")).scalar()
        events = conn.execute(select(work_item_events.c.detail).where(
            work_item_events.c.work_item_id == item["id"])).scalars().all()
        state = conn.execute(select(messages.c.state).where(
            messages.c.id == replay.json()["message_id"])).scalar()
    assert count == 1
    assert state == "processed"
    assert str(correction["message_id"]) in events[0]
    assert ("client:revenue-cycle", "work_item.resolve") in audit_actions(
        api, "work_item", item["id"])


def test_delivery_routes(api: Api) -> None:
    dead = walk(api, "finance", f"{DELIVERIES}/dead-letters")
    assert len(dead) == 5
    assert {d["state"] for d in dead} == {"dead"}
    listed = api.get("finance", DELIVERIES, state="dead", destination="erp").json()
    assert [d["id"] for d in listed["items"]] == [d["id"] for d in dead]
    counts = api.get("finance", f"{DELIVERIES}/summary").json()
    assert counts[0]["destination"] == "erp"
    assert counts[0]["counts"]["dead"] == 5

    detail = api.get("finance", f"{DELIVERIES}/{dead[0]['id']}").json()
    assert detail["payload"]["kind"] == "journal"
    assert detail["payload"]["journal"]["id"] == detail["record_id"]
    assert detail["replays"] == []

    assert api.post("finance", f"{DELIVERIES}/{dead[0]['id']}/retry").status_code == 403
    retried = api.post("integration-analyst", f"{DELIVERIES}/{dead[0]['id']}/retry").json()
    assert retried["replay_of"] == dead[0]["id"]
    assert api.post("admin", f"{DELIVERIES}/{dead[0]['id']}/retry").status_code == 409
    replayed = api.get("admin", f"{DELIVERIES}/{retried['delivery_id']}").json()
    assert replayed["idempotency_key"] == dead[0]["idempotency_key"]
    assert replayed["state"] == "pending"

    pending = api.get("admin", DELIVERIES, state="pending", limit=1).json()["items"][-1]
    due_now = api.post("admin", f"{DELIVERIES}/{pending['id']}/retry").json()
    assert due_now["delivery_id"] == pending["id"]
    assert parse(due_now["next_attempt_at"]) <= dt.datetime.now(dt.UTC)

    assert api.post("admin", f"{DELIVERIES}/replay", {}).status_code == 422
    bulk = api.post("admin", f"{DELIVERIES}/replay", {"destination": "erp"}).json()
    assert bulk["count"] == 4
    assert sorted(pair["replay_of"] for pair in bulk["replayed"]) == sorted(
        d["id"] for d in dead[1:])
    again = api.post("admin", f"{DELIVERIES}/replay", {"all_dead": True}).json()
    assert again == {"count": 0, "replayed": []}
    with api.engine.connect() as conn:
        linked = conn.execute(select(func.count()).select_from(deliveries).where(
            deliveries.c.replay_of.is_not(None))).scalar()
    assert linked == 5
    assert ("client:integration-analyst", "delivery.retry") in audit_actions(
        api, "delivery", dead[0]["id"])
