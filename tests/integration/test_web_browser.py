"""The web UI in a real browser: Debian's Chromium, headless, driven by Playwright.

A real server (uvicorn on a loopback port) serves a database loaded with
the bundled HL7 v2 samples and Synthea CSV export. Journals went to a
destination that returned 503, so they are dead letters. Screenshots of
the main pages go to tests/artifacts/screenshots/.

The tests skip when /usr/bin/chromium is missing, except under CI
(``CI`` set), where ``.ci/run`` installs it and a missing browser fails.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from carebridge.api.server import ApiThread
from carebridge.config.model import Configuration
from carebridge.engine.deliveries import run_deliveries
from carebridge.store.db import open_engine, sqlite_url
from carebridge.store.schema import (
    charge_lines,
    deliveries,
    messages,
    procurement_requests,
    work_items,
)
from carebridge.workflows.steps import run_workflow_steps

from .http_destination_server import TestDestination
from .web_ui_data import UiData, load_ui_data

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
VIEWPORT = {"width": 1280, "height": 800}

if not CHROMIUM.exists() and os.environ.get("CI"):
    pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium package",
                pytrace=False)
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium)")

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


class Site:
    """The running server, its database and destination, and the prepared data."""

    def __init__(self, engine: Engine, data: UiData, destination: TestDestination,
                 server: ApiThread) -> None:
        self.engine = engine
        self.data = data
        self.destination = destination
        self.url = f"http://127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, config: Configuration) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("web-browser")
    engine = open_engine(sqlite_url(folder / "ui.db"))
    destination = TestDestination().start()
    destination.always(503, "ERP maintenance window")
    data = load_ui_data(engine, config, folder, destination.url, synthea=True)
    server = ApiThread(engine, data.config, "127.0.0.1", 0)
    server.start()
    yield Site(engine, data, destination, server)
    server.stop()
    destination.stop()
    engine.dispose()


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                              args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser) -> Iterator[object]:
    context = browser.new_context(viewport=VIEWPORT)
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    yield tab
    context.close()


def shoot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)


def sign_in(page, site: Site, role: str, target: str = "/ui/") -> None:
    page.goto(f"{site.url}{target}")
    page.get_by_label("Client id").fill(role)
    page.get_by_label("Secret").fill(site.data.secrets[role])
    page.get_by_label("Secret").press("Enter")
    page.wait_for_selector("form.sign-out")


def test_sign_in_with_keyboard_and_open_queue(page, site: Site) -> None:
    page.goto(f"{site.url}/ui/sign-in")
    assert page.evaluate("document.activeElement.id") == "client_id"
    shoot(page, "sign-in")
    sign_in(page, site, "revenue-cycle", "/ui/queues")
    assert page.url.endswith("/ui/queues")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to main content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    assert page.get_by_role("heading", name="Work queues").is_visible()
    page.get_by_role("link", name=re.compile(r"^revenue_cycle")).click()
    page.wait_for_url(re.compile(r"team=revenue_cycle"))
    page.get_by_label("Reason").select_option("unknown_code")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"reason=unknown_code"))
    rows = page.locator("table.data tbody tr")
    expect(rows.first).to_be_visible()
    expect(page.locator("table.data .sla").first).to_be_visible()
    shoot(page, "queue")


def test_fix_work_item_and_watch_it_finish(page, site: Site) -> None:
    item = site.data.unknown_code_item
    sign_in(page, site, "revenue-cycle", f"/ui/work-items/{item}")
    assert page.locator("pre.raw mark").first.inner_text() == "99999^UNKNOWN VISIT^CPT"
    shoot(page, "work-item")
    editor = page.get_by_label("Corrected message")
    editor.fill(editor.input_value().replace("99999^UNKNOWN VISIT", "99213^OFFICE VISIT EST"))
    page.get_by_label("Note").first.fill("CPT corrected after checking the chart")
    page.get_by_role("button", name="Save correction and resume").click()
    outcome = page.locator("#correction-state")
    outcome.wait_for()
    assert "processed" in outcome.inner_text()
    assert "135.50" in page.locator("#correction-charges").inner_text()
    assert "resolved" in page.locator("#history").inner_text()
    shoot(page, "work-item-fixed")
    with site.engine.connect() as conn:
        row = conn.execute(select(work_items).where(work_items.c.id == item)).one()
        copy = conn.execute(select(messages.c.id, messages.c.state).where(
            messages.c.replay_of == row.message_id)).one()
        charged = conn.execute(select(charge_lines.c.amount).where(
            charge_lines.c.source_message_id == copy.id)).scalars().all()
    assert row.status == "resolved"
    assert copy.state == "processed"
    assert [str(amount) for amount in charged] == ["135.50"]


def test_approve_procurement_step(page, site: Site) -> None:
    item = site.data.procurement_item
    sign_in(page, site, "supply-chain", "/ui/queues?team=supply_chain")
    page.get_by_role("link", name=f"#{item}").click()
    page.wait_for_url(f"**/ui/work-items/{item}")
    expect(page.locator(".rule")).to_contain_text("approve the purchase of 100 SUP-100232")
    page.get_by_label("Approval note").fill("within the capital budget")
    page.get_by_role("button", name="Approve").click()
    page.wait_for_selector("#history >> text=approved")
    expect(page.locator("dl.facts")).to_contain_text("approved")
    shoot(page, "procurement-approved")
    with site.engine.connect() as conn:
        status = conn.execute(select(work_items.c.status)
                              .where(work_items.c.id == item)).scalar_one()
    assert status == "approved"
    # The procurement workflow takes the decision up and places the order.
    run_workflow_steps(site.engine, site.data.config)
    with site.engine.connect() as conn:
        request_status = conn.execute(select(procurement_requests.c.status)
                                      .where(procurement_requests.c.request_key == "web-test-1")
                                      ).scalar_one()
    assert request_status == "ordered"


def test_replay_dead_letter(page, site: Site) -> None:
    with site.engine.connect() as conn:
        dead = list(conn.execute(select(deliveries.c.id).where(
            deliveries.c.state == "dead").order_by(deliveries.c.id)).scalars())
    assert dead
    sign_in(page, site, "integration-analyst", "/ui/deliveries")
    shoot(page, "dead-letters")
    newest = dead[-1]  # the page lists the newest first
    page.get_by_label(f"Replay delivery {newest}").check()
    page.get_by_role("button", name="Replay selected").click()
    assert "1 dead delivery queued again" in page.locator("#replayed").inner_text()
    site.destination.always(None)
    run_deliveries(site.engine, site.data.config, owner="browser-test")
    with site.engine.connect() as conn:
        replay = conn.execute(select(deliveries).where(
            deliveries.c.replay_of == newest)).one()
    assert replay.state == "delivered"
    page.goto(f"{site.url}/ui/deliveries?state=delivered")
    assert f"replays #{newest}" in page.locator("#delivery-rows").inner_text()
    page.get_by_role("button", name=re.compile(r"^Replay all \d+ dead")).click()
    assert "queued again" in page.locator("#replayed").inner_text()
    shoot(page, "deliveries-replayed")


def test_message_lineage_dashboard_and_reconciliation(page, site: Site) -> None:
    sign_in(page, site, "admin", "/ui/messages?control_id=CTLWEB2")
    page.locator("table.data tbody a").first.click()
    page.get_by_role("heading", name="Lineage").wait_for()
    expect(page.locator("#charges")).to_be_visible()
    shoot(page, "message")
    page.get_by_role("link", name="Dashboard").click()
    page.wait_for_url("**/ui/dashboard")
    expect(page.locator("svg.chart")).to_have_count(5)
    shoot(page, "dashboard")
    page.get_by_role("link", name="Reconciliation").click()
    page.wait_for_url("**/ui/reconciliation*")
    expect(page.locator("#unexplained-count")).to_be_visible()
    shoot(page, "reconciliation")
    page.emulate_media(media="print")
    assert not page.locator(".site-header").is_visible()


def test_role_without_scope_is_refused(page, site: Site) -> None:
    sign_in(page, site, "supply-chain", "/ui/queues")
    navigation = page.get_by_role("navigation", name="Main").inner_text()
    assert "Messages" not in navigation
    assert "Deliveries" not in navigation
    answer = page.goto(f"{site.url}/ui/messages")
    assert answer.status == 403
    assert "messages:read" in page.locator("main").inner_text()
    shoot(page, "refused")
