"""``/metrics`` parses as Prometheus text and agrees with the database after a run."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select, update

from carebridge.api.app import create_app
from carebridge.api.security import Role, create_api_key, create_client
from carebridge.config.model import Configuration
from carebridge.engine.job import JobOptions, run_job
from carebridge.store.schema import charge_lines, messages, work_items

from .conftest import DEMO


def scrape(engine: Engine, config: Configuration) -> dict[str, list]:
    create_client(engine, "prometheus", frozenset({Role.AUDITOR}))
    key = create_api_key(engine, "prometheus")
    answer = TestClient(create_app(engine, config)).get("/metrics", headers={"X-API-Key": key})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    families: dict[str, list] = {}
    for family in text_string_to_metric_families(answer.text):
        families[family.name] = family.samples
    return families


def test_metrics_agree_with_the_database_after_a_demo_run(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    data = DEMO / "data"
    run_job(engine, config, JobOptions(
        paths=[data / "hl7v2", data / "synthea" / "csv"], out_dir=tmp_path / "out"))
    # One work item is overdue, so the SLA family has something to count.
    with engine.begin() as conn:
        first = conn.execute(select(func.min(work_items.c.id))).scalar_one()
        conn.execute(update(work_items).where(work_items.c.id == first).values(
            due_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)))
    families = scrape(engine, config)

    with engine.connect() as conn:
        by_state = dict(conn.execute(
            select(messages.c.state, func.count()).group_by(messages.c.state)).all())
        by_reason = dict(conn.execute(
            select(work_items.c.reason, func.count()).group_by(work_items.c.reason)).all())
        charged = conn.execute(select(func.count()).select_from(charge_lines)).scalar_one()
        total = conn.execute(select(func.count()).select_from(messages)).scalar_one()

    scraped_states: dict[str, float] = {}
    for sample in families["carebridge_messages"]:
        state = sample.labels["state"]
        scraped_states[state] = scraped_states.get(state, 0) + sample.value
    assert scraped_states == by_state

    scraped_reasons: dict[str, float] = {}
    for sample in families["carebridge_exceptions"]:
        reason = sample.labels["reason"]
        scraped_reasons[reason] = scraped_reasons.get(reason, 0) + sample.value
    assert scraped_reasons == by_reason

    latency = {(s.name, s.labels["stage"], s.labels.get("le")): s.value
               for s in families["carebridge_stage_latency_seconds"]}
    assert latency[("carebridge_stage_latency_seconds_count", "process", None)] == total
    assert latency[("carebridge_stage_latency_seconds_count", "post", None)] == charged
    assert latency[("carebridge_stage_latency_seconds_bucket", "process", "+Inf")] == total

    postings = {(s.labels["kind"], s.labels["journaled"]): s.value
                for s in families["carebridge_postings"]}
    assert postings[("charge", "yes")] == charged
    assert ("charge", "no") not in postings

    backlog = {s.labels["queue"]: s.value for s in families["carebridge_backlog"]}
    assert backlog["messages"] == 0
    breaches = sum(s.value for s in families["carebridge_sla_breaches"])
    assert breaches == 1
