"""The web UI over HTTP: sessions, CSRF, scopes, and each page's actions on real data."""

from __future__ import annotations

import csv
import io
import re
import socket
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update

from carebridge.api.app import create_app
from carebridge.api.security import create_api_key, revoke_api_key
from carebridge.config.model import Configuration
from carebridge.store.schema import (
    api_clients,
    audit_events,
    charge_lines,
    deliveries,
    messages,
    work_items,
)
from carebridge.web.session import SESSION_COOKIE, SIGN_IN_COOKIE

from .web_ui_data import UNKNOWN_CPT_DFT, UiData, load_ui_data

CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


def refusing_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/journals"


@pytest.fixture()
def data(engine: Engine, config: Configuration, tmp_path: Path) -> UiData:
    return load_ui_data(engine, config, tmp_path, refusing_url())


@pytest.fixture()
def app(engine: Engine, data: UiData):
    return create_app(engine, data.config)


def sign_in(app, role: str, secret: str) -> TestClient:
    client = TestClient(app, follow_redirects=False)
    form = client.get("/ui/sign-in")
    assert form.status_code == 200
    answer = client.post("/ui/sign-in", data={
        "csrf": client.cookies[SIGN_IN_COOKIE], "client_id": role,
        "client_secret": secret, "next": "/ui/"})
    assert answer.status_code == 303, answer.text
    return client


def csrf_of(page_html: str) -> str:
    found = CSRF_FIELD.search(page_html)
    assert found, "the page has no CSRF field"
    return found.group(1)


def audit_actions(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(audit_events.c.action)
                                 .order_by(audit_events.c.id)).scalars())


def test_ui_routes_stay_out_of_openapi(app) -> None:
    paths = app.openapi()["paths"]
    assert "/api/v1/work-items" in paths
    assert not [path for path in paths if path.startswith("/ui")]
    assert TestClient(app).get("/ui/sign-in").status_code == 200


def test_sign_in_sets_strict_session_cookie(app, data: UiData, engine: Engine) -> None:
    client = TestClient(app, follow_redirects=False)
    client.get("/ui/sign-in")
    wrong = client.post("/ui/sign-in", data={
        "csrf": client.cookies[SIGN_IN_COOKIE], "client_id": "revenue-cycle",
        "client_secret": "not-the-secret"})
    assert wrong.status_code == 401
    assert "Sign-in failed" in wrong.text
    assert SESSION_COOKIE not in wrong.headers.get("set-cookie", "")

    forged = client.post("/ui/sign-in", data={
        "csrf": "forged", "client_id": "revenue-cycle",
        "client_secret": data.secrets["revenue-cycle"]})
    assert forged.status_code == 403

    client.get("/ui/sign-in")
    right = client.post("/ui/sign-in", data={
        "csrf": client.cookies[SIGN_IN_COOKIE], "client_id": "revenue-cycle",
        "client_secret": data.secrets["revenue-cycle"], "next": "/ui/queues"})
    assert right.status_code == 303
    assert right.headers["location"] == "/ui/queues"
    cookie = next(value for value in right.headers.get_list("set-cookie")
                  if value.startswith(SESSION_COOKIE + "=")).lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "path=/ui" in cookie
    assert "ui.sign_in" in audit_actions(engine)

    page = client.get("/ui/queues")
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    out = client.post("/ui/sign-out", data={"csrf": csrf_of(page.text)})
    assert out.status_code == 303
    assert "ui.sign_out" in audit_actions(engine)
    assert client.get("/ui/queues").status_code == 303


def test_open_redirect_after_sign_in_is_ignored(app, data: UiData) -> None:
    client = TestClient(app, follow_redirects=False)
    client.get("/ui/sign-in")
    answer = client.post("/ui/sign-in", data={
        "csrf": client.cookies[SIGN_IN_COOKIE], "client_id": "admin",
        "client_secret": data.secrets["admin"], "next": "//elsewhere.example/ui/"})
    assert answer.headers["location"] == "/ui/"


def test_pages_without_session_go_to_sign_in(app) -> None:
    client = TestClient(app, follow_redirects=False)
    for path in ("/ui/queues", "/ui/messages", "/ui/deliveries", "/ui/dashboard",
                 "/ui/reconciliation", "/ui/work-items/1"):
        answer = client.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/ui/sign-in?next=")


def test_tampered_cookie_is_no_session(app, data: UiData) -> None:
    client = sign_in(app, "admin", data.secrets["admin"])
    value = client.cookies[SESSION_COOKIE]
    body, mac = value.split(".")
    client.cookies.set(SESSION_COOKIE, body + "x." + mac, path="/ui")
    assert client.get("/ui/queues").status_code == 303


def test_disabled_client_and_revoked_key_end_session(
    app, data: UiData, engine: Engine
) -> None:
    key = create_api_key(engine, "auditor")
    client = TestClient(app, follow_redirects=False)
    client.get("/ui/sign-in")
    answer = client.post("/ui/sign-in", data={
        "csrf": client.cookies[SIGN_IN_COOKIE], "api_key": key})
    assert answer.status_code == 303
    assert client.get("/ui/messages").status_code == 200
    revoke_api_key(engine, key.split("_")[1])
    assert client.get("/ui/messages").status_code == 303

    finance = sign_in(app, "finance", data.secrets["finance"])
    assert finance.get("/ui/queues").status_code == 200
    with engine.begin() as conn:
        conn.execute(update(api_clients).where(api_clients.c.client_id == "finance")
                     .values(disabled_at=api_clients.c.created_at))
    assert finance.get("/ui/queues").status_code == 303


@pytest.mark.parametrize(("role", "path", "allowed"), [
    ("supply-chain", "/ui/messages", False),
    ("supply-chain", "/ui/queues", True),
    ("supply-chain", "/ui/deliveries", False),
    ("revenue-cycle", "/ui/dashboard", False),
    ("revenue-cycle", "/ui/reconciliation", False),
    ("finance", "/ui/reconciliation", True),
    ("finance", "/ui/messages", False),
    ("auditor", "/ui/dashboard", True),
    ("integration-analyst", "/ui/deliveries", True),
])
def test_page_scope_matrix(app, data: UiData, role: str, path: str, allowed: bool) -> None:
    client = sign_in(app, role, data.secrets[role])
    answer = client.get(path)
    assert answer.status_code == (200 if allowed else 403), answer.text[:300]
    start = client.get("/ui/queues" if role != "auditor" else "/ui/dashboard")
    assert (f'href="{path}"' in start.text) is allowed


def test_actions_need_scope_and_csrf(app, data: UiData, engine: Engine) -> None:
    item = data.procurement_item
    revenue = sign_in(app, "revenue-cycle", data.secrets["revenue-cycle"])
    page = revenue.get(f"/ui/work-items/{data.unknown_code_item}")
    token = csrf_of(page.text)
    refused = revenue.post(f"/ui/work-items/{item}/approve", data={"csrf": token})
    assert refused.status_code == 403

    # Finance can read the supply-chain step but does not decide it.
    finance = sign_in(app, "finance", data.secrets["finance"])
    page = finance.get(f"/ui/work-items/{item}")
    assert page.status_code == 200
    assert "/approve" not in page.text
    other_team = finance.post(f"/ui/work-items/{item}/approve",
                              data={"csrf": csrf_of(page.text)})
    assert other_team.status_code == 403

    supply = sign_in(app, "supply-chain", data.secrets["supply-chain"])
    page = supply.get(f"/ui/work-items/{item}")
    assert "/approve" in page.text
    assert "Fix and resume" not in page.text
    no_token = supply.post(f"/ui/work-items/{item}/approve", data={})
    assert no_token.status_code == 403
    with engine.connect() as conn:
        status = conn.execute(select(work_items.c.status)
                              .where(work_items.c.id == item)).scalar_one()
    assert status == "open"


def test_fix_and_resume_posts_the_charge(app, data: UiData, engine: Engine) -> None:
    client = sign_in(app, "revenue-cycle", data.secrets["revenue-cycle"])
    item = data.unknown_code_item
    page = client.get(f"/ui/work-items/{item}")
    assert page.status_code == 200
    assert "<mark>99999^UNKNOWN VISIT^CPT</mark>" in page.text
    assert "FT1-7" in page.text
    corrected = UNKNOWN_CPT_DFT.decode().replace("99999^UNKNOWN VISIT",
                                                 "99213^OFFICE VISIT EST")
    answer = client.post(f"/ui/work-items/{item}/resolve", data={
        "csrf": csrf_of(page.text), "note": "CPT corrected after checking the chart",
        "corrected_message": corrected.replace("\r", "\r\n")})
    assert answer.status_code == 303
    with engine.connect() as conn:
        row = conn.execute(select(work_items).where(work_items.c.id == item)).one()
        copy = conn.execute(select(messages).where(
            messages.c.replay_of == row.message_id)).one()
        charge = conn.execute(select(charge_lines).where(
            charge_lines.c.source_message_id == copy.id)).one()
    assert row.status == "resolved"
    assert row.resolved_by == "client:revenue-cycle"
    assert copy.state == "processed"
    assert str(charge.amount) == "135.50"
    assert "work_item.resolve" in audit_actions(engine)
    after = client.get(f"/ui/work-items/{item}")
    assert "Correction outcome" in after.text
    assert f"#{charge.id}" in after.text
    assert "resolved" in after.text


def test_claim_reassign_and_reject(app, data: UiData, engine: Engine) -> None:
    client = sign_in(app, "admin", data.secrets["admin"])
    item = data.unknown_code_item
    token = csrf_of(client.get(f"/ui/work-items/{item}").text)
    assert client.post(f"/ui/work-items/{item}/claim",
                       data={"csrf": token}).status_code == 303
    assert client.post(f"/ui/work-items/{item}/reassign", data={
        "csrf": token, "assignee": "rc-analyst-2", "note": "coding question"}
    ).status_code == 303
    empty = client.post(f"/ui/work-items/{item}/reject", data={"csrf": token})
    assert empty.status_code == 422
    assert client.post(f"/ui/work-items/{item}/reject", data={
        "csrf": token, "reason": "service not performed"}).status_code == 303
    again = client.post(f"/ui/work-items/{item}/reject", data={
        "csrf": token, "reason": "twice"})
    assert again.status_code == 409
    history = client.get(f"/ui/work-items/{item}").text
    for action in ("claimed", "reassigned", "rejected"):
        assert f"<td>{action}</td>" in history
    actions = audit_actions(engine)
    for action in ("work_item.claim", "work_item.reassign", "work_item.reject"):
        assert action in actions


def test_queue_filters_and_countdown(app, data: UiData) -> None:
    client = sign_in(app, "revenue-cycle", data.secrets["revenue-cycle"])
    page = client.get("/ui/queues", params={"reason": "unknown_code"})
    assert page.status_code == 200
    assert f'href="/ui/work-items/{data.unknown_code_item}"' in page.text
    assert "approval_required" not in page.text  # the supply-chain step is not visible
    hidden = client.get(f"/ui/work-items/{data.procurement_item}")
    assert hidden.status_code == 404


def test_message_search_page_and_replay(app, data: UiData, engine: Engine) -> None:
    client = sign_in(app, "integration-analyst", data.secrets["integration-analyst"])
    found = client.get("/ui/messages", params={"control_id": "CTLWEB1"})
    assert found.status_code == 200
    with engine.connect() as conn:
        message_id = conn.execute(select(messages.c.id).where(
            messages.c.dedup_key.like("%|CTLWEB1"))).scalar_one()
    assert f'href="/ui/messages/{message_id}"' in found.text
    page = client.get(f"/ui/messages/{message_id}")
    assert page.status_code == 200
    assert "Lineage" in page.text
    assert "unknown_code" in page.text
    replay = client.post(f"/ui/messages/{message_id}/replay",
                         data={"csrf": csrf_of(page.text)})
    assert replay.status_code == 303
    new_id = int(replay.headers["location"].rsplit("/", 1)[1])
    with engine.connect() as conn:
        copy = conn.execute(select(messages).where(messages.c.id == new_id)).one()
    assert copy.replay_of == message_id
    assert "message.replay" in audit_actions(engine)
    bad = client.get("/ui/messages", params={"type": "not a type!"})
    assert bad.status_code == 422


def test_dead_letters_bulk_replay(app, data: UiData, engine: Engine) -> None:
    client = sign_in(app, "integration-analyst", data.secrets["integration-analyst"])
    page = client.get("/ui/deliveries")
    assert page.status_code == 200
    with engine.connect() as conn:
        dead = list(conn.execute(select(deliveries.c.id).where(
            deliveries.c.state == "dead").order_by(deliveries.c.id)).scalars())
    assert len(dead) >= 2
    assert f'value="{dead[0]}"' in page.text
    token = csrf_of(page.text)
    one = client.post("/ui/deliveries/replay", data={"csrf": token, "ids": [dead[0]]})
    assert one.status_code == 303
    assert "replayed=1" in one.headers["location"]
    rest = client.post("/ui/deliveries/replay", data={"csrf": token, "destination": "erp"})
    assert f"replayed={len(dead) - 1}" in rest.headers["location"]
    with engine.connect() as conn:
        replays = conn.execute(select(deliveries.c.replay_of).where(
            deliveries.c.state == "pending")).scalars().all()
    assert sorted(replays) == dead
    assert "delivery.replay" in audit_actions(engine)


def test_dashboard_draws_each_chart(app, data: UiData) -> None:
    client = sign_in(app, "admin", data.secrets["admin"])
    page = client.get("/ui/dashboard", params={"minutes": "3"})
    assert page.status_code == 200
    assert page.text.count("<svg") == 5
    for heading in ("Throughput", "Latency per stage", "Exceptions by reason",
                    "Billing lag", "Re-keying effort removed"):
        assert heading in page.text
    assert "× 3.0 minutes per manual entry" in page.text
    assert "unknown_code" in page.text


def test_reconciliation_page_csv_and_print(app, data: UiData) -> None:
    client = sign_in(app, "finance", data.secrets["finance"])
    page = client.get("/ui/reconciliation")
    assert page.status_code == 200
    assert 'id="unexplained-count"' in page.text
    unexplained = re.search(r'id="unexplained-count">(\d+)<', page.text).group(1)
    assert int(unexplained) > 0  # the dead letters at erp are unexplained
    assert 'href="/ui/messages/' in page.text
    exported = client.get("/ui/reconciliation.csv", params={"unexplained": "true"})
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(rows) == int(unexplained)
    assert {row["kind"] for row in rows} == {"journal_not_delivered"}
    printed = client.get("/ui/reconciliation", params={"print_view": "true"})
    assert 'class="print-view"' in printed.text
