"""Procurement through the API: approval chains by amount, separation of duties, orders, receipts."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from carebridge.api.app import create_app
from carebridge.api.security import create_api_key, create_client, parse_roles
from carebridge.config.model import Configuration, DestinationConfig
from carebridge.store.schema import deliveries, purchase_orders, stock_levels, work_items
from carebridge.workflows.steps import run_workflow_steps

URL = "/api/v1/procurement"


@pytest.fixture()
def api(engine: Engine, config: Configuration):
    """A client for the API and an API key per caller: requester, two controllers, admin."""
    erp = DestinationConfig("erp", "http", ("purchase_order",),
                            {"url": "http://127.0.0.1:9/po", "timeout_seconds": 1.0})
    configured = dataclasses.replace(config, destinations=(erp,))
    keys = {}
    for name, role in (("buyer", "supply-chain"), ("materials-manager", "supply-chain"),
                       ("controller-1", "finance"), ("controller-2", "finance"),
                       ("owner", "admin")):
        create_client(engine, name, parse_roles(role))
        keys[name] = {"X-API-Key": create_api_key(engine, name)}
    return TestClient(create_app(engine, configured)), keys, configured


def _count(engine: Engine, table, *where) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def _request(client: TestClient, headers: dict, item: str, quantity: int, key: str,
             department: str = "CLINIC") -> dict:
    answer = client.post(f"{URL}/requests", headers={**headers, "Idempotency-Key": key},
                         json={"department": department, "item_code": item, "quantity": quantity})
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_two_step_chain_to_receipt(engine: Engine, api) -> None:
    client, keys, _ = api
    # Central supply keeps no par level of the item, so the request names no supplier.
    created = _request(client, keys["buyer"], "SUP-100231", 20000, "req-1", "SUPPLY")
    resent = _request(client, keys["buyer"], "SUP-100231", 20000, "req-1", "SUPPLY")

    assert resent["id"] == created["id"]
    assert created["amount"] == "6400.00"
    assert created["rule_version"] == "2025.1"
    assert created["supplier"] is None
    steps = created["approvals"]
    assert [(s["step_name"], s["team"], s["status"]) for s in steps] == [
        ("materials-manager", "supply_chain", "open"), ("controller", "finance", "waiting")]

    first, second = steps[0]["id"], steps[1]["id"]
    own = client.post(f"{URL}/approvals/{first}/approve", headers=keys["buyer"])
    assert own.status_code == 403
    assert "the requester may not approve" in own.json()["detail"]
    other_team = client.post(f"{URL}/approvals/{first}/approve", headers=keys["controller-1"])
    assert other_team.status_code == 403
    assert "belongs to team supply_chain" in other_team.json()["detail"]
    # An admin may decide a step of any team, but only one step of a request.
    after_first = client.post(f"{URL}/approvals/{first}/approve", headers=keys["owner"])
    assert after_first.status_code == 200, after_first.text
    assert after_first.json()["approvals"][1]["status"] == "open"
    twice = client.post(f"{URL}/approvals/{second}/approve", headers=keys["owner"])
    assert twice.status_code == 403
    assert "one person decides one step" in twice.json()["detail"]
    # Supply chain does not even see finance's queue.
    hidden = client.post(f"{URL}/approvals/{second}/approve", headers=keys["materials-manager"])
    assert hidden.status_code == 404

    # Approved without a supplier: supply chain must name one before the order.
    approved = client.post(f"{URL}/approvals/{second}/approve", headers=keys["controller-2"])
    assert approved.json()["status"] == "on_hold"
    assert _count(engine, work_items, work_items.c.reason == "unknown_supplier") == 1
    unknown = client.post(f"{URL}/requests/{created['id']}/supplier", headers=keys["buyer"],
                          json={"supplier": "ACME"})
    assert unknown.status_code == 409
    ordered = client.post(f"{URL}/requests/{created['id']}/supplier", headers=keys["buyer"],
                          json={"supplier": "OWENS"}).json()
    assert ordered["status"] == "ordered"
    order = ordered["purchase_order"]
    assert order["po_number"] == f"PO-{created['id']:06d}"
    with engine.connect() as conn:
        outbox = conn.execute(select(deliveries)).mappings().all()
    assert [(row["destination"], row["kind"]) for row in outbox] == [("erp", "purchase_order")]
    payload = json.loads(outbox[0]["payload"])["purchase_order"]
    assert payload["total"] == "6400.00"
    assert payload["lines"][0]["quantity"] == "20000"
    assert payload["supplier_name"] == "Owens & Minor"

    receipt = {"po_number": order["po_number"], "quantity": "20000", "lot_number": "L-1"}
    answer = client.post(f"{URL}/receipts", headers={**keys["buyer"], "Idempotency-Key": "gr-1"},
                         json=receipt)
    repeat = client.post(f"{URL}/receipts", headers={**keys["buyer"], "Idempotency-Key": "gr-1"},
                         json=receipt)
    assert answer.status_code == 201, answer.text
    assert answer.json()["purchase_order"]["status"] == "received"
    assert repeat.json()["created"] is False
    with engine.connect() as conn:
        on_hand = conn.execute(select(stock_levels.c.on_hand).where(
            stock_levels.c.item_code == "SUP-100231")).scalar_one()
    assert on_hand == Decimal("20000")
    stock = client.get(f"{URL}/stock", headers=keys["controller-1"]).json()
    assert stock == [{"location": "SUPPLY", "item_code": "SUP-100231", "on_hand": "20000",
                      "updated_at": stock[0]["updated_at"]}]
    # The same events again created no second order or delivery.
    assert _count(engine, purchase_orders) == 1
    assert _count(engine, deliveries) == 1


def test_over_budget_step_then_rejection(engine: Engine, api) -> None:
    client, keys, _ = api
    # 20000 x 2.75 = 55,000.00 passes the CLINIC budget of 50,000.00.
    created = _request(client, keys["buyer"], "SUP-100410", 20000, "req-2")

    assert [(s["step_name"], s["reason"]) for s in created["approvals"]] == [
        ("materials-manager", "approval_required"), ("controller", "approval_required"),
        ("budget-override", "over_budget")]
    first = created["approvals"][0]["id"]
    rejected = client.post(f"{URL}/approvals/{first}/reject", headers=keys["materials-manager"],
                           json={"note": "order from the central store"}).json()

    assert rejected["status"] == "rejected"
    assert [s["status"] for s in rejected["approvals"]] == ["rejected", "cancelled", "cancelled"]
    assert rejected["purchase_order"] is None
    assert _count(engine, purchase_orders) == 0


def test_work_item_route_approval_advances_chain(engine: Engine, api) -> None:
    client, keys, configured = api
    answer = client.post(f"{URL}/requests", headers=keys["buyer"], json={
        "department": "CLINIC", "item_code": "SUP-100232", "quantity": 100,
        "supplier": "MEDLINE"})
    created = answer.json()
    assert created["amount"] == "6.00"
    item_id = created["approvals"][0]["work_item_id"]
    finance = client.post(f"/api/v1/work-items/{item_id}/approve", headers=keys["controller-1"])
    assert finance.status_code == 403
    decided = client.post(f"/api/v1/work-items/{item_id}/approve",
                          headers=keys["materials-manager"])
    assert decided.status_code == 200, decided.text

    run_workflow_steps(engine, configured)
    shown = client.get(f"{URL}/requests/{created['id']}", headers=keys["buyer"]).json()
    assert shown["status"] == "ordered"
    assert shown["approvals"][0]["decided_by"] == "client:materials-manager"


def test_invalid_and_self_approval_refused(api) -> None:
    client, keys, _ = api
    created = _request(client, keys["owner"], "SUP-100232", 10, "req-3")
    step = created["approvals"][0]["id"]
    own = client.post(f"{URL}/approvals/{step}/approve", headers=keys["owner"])
    assert own.status_code == 403
    assert "own request" in own.json()["detail"]

    cases = [
        ({"department": "CLINIC", "item_code": "SUP-999", "quantity": 1}, "not in the item master"),
        ({"department": "WARD9", "item_code": "SUP-100231", "quantity": 1}, "not a department"),
        ({"department": "CLINIC", "item_code": "SUP-100231", "quantity": 1, "supplier": "ACME"},
         "supplier ACME"),
        ({"department": "CLINIC", "item_code": "SUP-100231", "quantity": 20001},
         "above the limit"),
    ]
    for body, message in cases:
        answer = client.post(f"{URL}/requests", headers=keys["buyer"], json=body)
        assert answer.status_code == 422, body
        assert message in answer.json()["detail"], answer.text


def test_work_item_route_keeps_separation_of_duties(api) -> None:
    client, keys, _ = api
    created = _request(client, keys["owner"], "SUP-100232", 10, "req-own-route")
    item_id = created["approvals"][0]["work_item_id"]
    own = client.post(f"/api/v1/work-items/{item_id}/approve", headers=keys["owner"])
    assert own.status_code == 403
    assert "own request" in own.json()["detail"]
    other = client.post(f"/api/v1/work-items/{item_id}/approve",
                        headers=keys["materials-manager"])
    assert other.status_code == 200, other.text
