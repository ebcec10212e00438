"""Process metrics in the Prometheus text format, read from the database at scrape time.

The database is the queue, so it is also the source of truth for
throughput, backlog and latency: every figure here is a query, and every
process that shares the database reports the same numbers. Families:

- ``carebridge_messages{source,state}``: stored messages;
- ``carebridge_stage_latency_seconds{stage}``: histograms of the time from
  arrival to processing (``process``), from processing to the posted
  journal (``post``) and from the journal to its delivery (``deliver``);
- ``carebridge_backlog{queue}`` and ``carebridge_backlog_oldest_age_seconds{queue}``:
  messages waiting, deliveries waiting per destination, open work items per team;
- ``carebridge_deliveries{destination,state}``;
- ``carebridge_exceptions{reason,team,department}``: work items;
- ``carebridge_sla_breaches{team}``: open work items past their deadline;
- ``carebridge_postings{kind}``: charge lines and supply issues journaled.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, and_, case, func, select
from sqlalchemy.sql.elements import ColumnElement

from carebridge.store.schema import (
    charge_lines,
    deliveries,
    encounters,
    journals,
    messages,
    services,
    supply_issues,
    work_items,
)

logger = logging.getLogger(__name__)

LATENCY_BUCKETS: Sequence[float] = (
    0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600,
)
"""Upper bounds in seconds: clinical-to-finance lags run from sub-second to days."""

OPEN_STATES = ("open", "claimed")
"""Work-item states that still need a person."""


def seconds_between(engine: Engine, start: Any, end: Any) -> ColumnElement[Any]:
    """``end - start`` in seconds as a SQL expression, on SQLite and on PostgreSQL."""
    if engine.dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


class DatabaseCollector(Collector):
    """Collects every family above from one database on each scrape."""

    def __init__(self, engine: Engine, *, now: dt.datetime | None = None) -> None:
        self.engine = engine
        self._now = now

    def now(self) -> dt.datetime:
        return self._now or dt.datetime.now(dt.UTC)

    def collect(self) -> Iterator[Any]:
        with self.engine.connect() as conn:
            yield self._messages(conn)
            yield from self._latencies(conn)
            yield from self._backlog(conn)
            yield self._deliveries(conn)
            yield self._exceptions(conn)
            yield self._sla(conn)
            yield self._postings(conn)

    def _messages(self, conn: Any) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "carebridge_messages", "Stored messages by source and state.",
            labels=["source", "state"])
        rows = conn.execute(
            select(messages.c.source, messages.c.state, func.count())
            .group_by(messages.c.source, messages.c.state)
        )
        for source, state, count in rows:
            family.add_metric([source, state], count)
        return family

    def _histogram(self, conn: Any, seconds: ColumnElement[Any], source: Any,
                   *where: ColumnElement[bool]) -> tuple[list[tuple[str, float]], float]:
        """Cumulative bucket counts and the sum of ``seconds`` over ``source``."""
        columns = [
            func.sum(case((seconds <= bound, 1), else_=0)).label(f"b{index}")
            for index, bound in enumerate(LATENCY_BUCKETS)
        ]
        query = select(func.count().label("n"), func.sum(seconds).label("total"), *columns)
        row = conn.execute(query.select_from(source).where(*where)).mappings().one()
        buckets = [(str(bound), float(row[f"b{index}"] or 0))
                   for index, bound in enumerate(LATENCY_BUCKETS)]
        buckets.append(("+Inf", float(row["n"] or 0)))
        return buckets, float(row["total"] or 0.0)

    def _latencies(self, conn: Any) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "carebridge_stage_latency_seconds",
            "Time spent per stage: process (arrival to processed), post (processed "
            "to journal, per charge line), deliver (outbox row created to delivered).",
            labels=["stage"])
        engine = self.engine
        process = seconds_between(engine, messages.c.received_at, messages.c.processed_at)
        buckets, total = self._histogram(
            conn, process, messages, messages.c.processed_at.is_not(None))
        family.add_metric(["process"], buckets, total)
        post = seconds_between(engine, messages.c.processed_at, journals.c.created_at)
        joined = charge_lines.join(journals, journals.c.id == charge_lines.c.journal_id).join(
            messages, messages.c.id == charge_lines.c.source_message_id)
        buckets, total = self._histogram(
            conn, post, joined, messages.c.processed_at.is_not(None))
        family.add_metric(["post"], buckets, total)
        deliver = seconds_between(engine, deliveries.c.created_at, deliveries.c.delivered_at)
        buckets, total = self._histogram(
            conn, deliver, deliveries, deliveries.c.delivered_at.is_not(None))
        family.add_metric(["deliver"], buckets, total)
        yield family

    def _backlog(self, conn: Any) -> Iterator[GaugeMetricFamily]:
        size = GaugeMetricFamily(
            "carebridge_backlog", "Items waiting, per queue.", labels=["queue"])
        age = GaugeMetricFamily(
            "carebridge_backlog_oldest_age_seconds",
            "Age of the oldest waiting item, per queue (0 when empty).", labels=["queue"])
        now = self.now()
        queues: list[tuple[str, int, dt.datetime | None]] = []
        count, oldest = conn.execute(
            select(func.count(), func.min(messages.c.received_at))
            .where(messages.c.state == "received")
        ).one()
        queues.append(("messages", count, oldest))
        rows = conn.execute(
            select(deliveries.c.destination, func.count(), func.min(deliveries.c.created_at))
            .where(deliveries.c.state.in_(("pending", "failed")))
            .group_by(deliveries.c.destination)
        )
        queues.extend((f"deliveries:{name}", n, first) for name, n, first in rows)
        rows = conn.execute(
            select(work_items.c.team, func.count(), func.min(work_items.c.created_at))
            .where(work_items.c.status.in_(OPEN_STATES))
            .group_by(work_items.c.team)
        )
        queues.extend((f"work_items:{team}", n, first) for team, n, first in rows)
        for queue, n, first in queues:
            size.add_metric([queue], n)
            first = _utc(first)
            age.add_metric([queue], max(0.0, (now - first).total_seconds()) if first else 0.0)
        yield size
        yield age

    def _deliveries(self, conn: Any) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "carebridge_deliveries", "Outbox rows by destination and state.",
            labels=["destination", "state"])
        rows = conn.execute(
            select(deliveries.c.destination, deliveries.c.state, func.count())
            .group_by(deliveries.c.destination, deliveries.c.state)
        )
        for destination, state, count in rows:
            family.add_metric([destination, state], count)
        return family

    def _exceptions(self, conn: Any) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "carebridge_exceptions",
            "Work items by reason, team and department (of the service's encounter; "
            "'none' when the item is about a whole message).",
            labels=["reason", "team", "department", "status"])
        department = func.coalesce(encounters.c.department, "none")
        joined = work_items.outerjoin(
            services, and_(services.c.work_item_id == work_items.c.id)
        ).outerjoin(encounters, encounters.c.encounter_id == services.c.encounter_id)
        rows = conn.execute(
            select(work_items.c.reason, work_items.c.team, department, work_items.c.status,
                   func.count(func.distinct(work_items.c.id)))
            .select_from(joined)
            .group_by(work_items.c.reason, work_items.c.team, department, work_items.c.status)
        )
        for reason, team, dept, status, count in rows:
            family.add_metric([reason, team, dept, status], count)
        return family

    def _sla(self, conn: Any) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "carebridge_sla_breaches", "Open work items past their deadline.",
            labels=["team"])
        rows = conn.execute(
            select(work_items.c.team, func.count())
            .where(work_items.c.status.in_(OPEN_STATES),
                   work_items.c.due_at.is_not(None),
                   work_items.c.due_at < self.now())
            .group_by(work_items.c.team)
        )
        for team, count in rows:
            family.add_metric([team], count)
        return family

    def _postings(self, conn: Any) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "carebridge_postings", "Charge lines and supply issues, journaled or not.",
            labels=["kind", "journaled"])
        for kind, table in (("charge", charge_lines), ("supply_issue", supply_issues)):
            rows = conn.execute(
                select(table.c.journal_id.is_not(None), func.count())
                .group_by(table.c.journal_id.is_not(None))
            )
            for journaled, count in rows:
                family.add_metric([kind, "yes" if journaled else "no"], count)
        return family
