"""The figures behind the dashboard, read from the database like ``/metrics``.

Each function returns plain numbers for one chart. Samples are capped at
:data:`SAMPLE_LIMIT` of the newest rows, so a page stays fast on a large
database; percentiles are then those of the newest rows.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, Table, func, inspect, select

from carebridge.metrics import OPEN_STATES, seconds_between
from carebridge.store.schema import (
    charge_lines,
    deliveries,
    journals,
    messages,
    supply_issues,
    work_items,
)

SAMPLE_LIMIT = 50_000

DEFAULT_MINUTES_PER_MANUAL_ENTRY = 2.0
"""Minutes a person would spend keying one charge line, stock issue or journal
by hand; an estimate that the dashboard's form can change per view."""

PERIODS: dict[str, tuple[dt.timedelta, int]] = {
    "hour": (dt.timedelta(hours=1), 48),
    "day": (dt.timedelta(days=1), 30),
    "week": (dt.timedelta(weeks=1), 26),
}
"""Throughput periods: bucket size and how many buckets are shown."""

PERCENTILES = (50, 90, 99)


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _bucket_start(moment: dt.datetime, period: str) -> dt.datetime:
    moment = _utc(moment).replace(minute=0, second=0, microsecond=0)
    if period in ("day", "week"):
        moment = moment.replace(hour=0)
    if period == "week":
        moment -= dt.timedelta(days=moment.weekday())
    return moment


def _hour_column(engine: Engine, column: Any) -> Any:
    if engine.dialect.name == "sqlite":
        return func.strftime("%Y-%m-%d %H:00:00", column)
    return func.date_trunc("hour", func.timezone("UTC", column))


def _as_datetime(value: Any) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return _utc(value)


def throughput(engine: Engine, conn: Connection, period: str,
               now: dt.datetime) -> dict[str, Any]:
    """Count messages received and processed per bucket of ``period``, oldest first."""
    size, buckets = PERIODS[period]
    last = _bucket_start(now, period)
    starts = [last - size * k for k in range(buckets - 1, -1, -1)]
    since = starts[0]
    counts: dict[str, Counter[dt.datetime]] = {}
    for name, column in (("received", messages.c.received_at),
                         ("processed", messages.c.processed_at)):
        hour = _hour_column(engine, column)
        rows = conn.execute(select(hour, func.count()).where(column >= since)
                            .group_by(hour))
        tally: Counter[dt.datetime] = Counter()
        for value, number in rows:
            if value is not None:
                tally[_bucket_start(_as_datetime(value), period)] += number
        counts[name] = tally
    labels = [start.strftime("%Y-%m-%d %H:00" if period == "hour" else "%Y-%m-%d")
              for start in starts]
    return {"labels": labels,
            "received": [counts["received"][s] for s in starts],
            "processed": [counts["processed"][s] for s in starts]}


def percentile(sorted_values: Sequence[float], percent: float) -> float | None:
    """Return the nearest-rank percentile of already sorted values, or ``None``."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _sample(conn: Connection, seconds: Any, source: Any, order: Any,
            *where: Any) -> list[float]:
    rows = conn.execute(select(seconds).select_from(source).where(*where)
                        .order_by(order.desc()).limit(SAMPLE_LIMIT)).scalars()
    return sorted(float(v) for v in rows if v is not None)


def stage_latencies(engine: Engine, conn: Connection) -> list[dict[str, Any]]:
    """Return p50, p90 and p99 in seconds of the stages that ``/metrics`` measures."""
    process = seconds_between(engine, messages.c.received_at, messages.c.processed_at)
    post = seconds_between(engine, messages.c.processed_at, journals.c.created_at)
    deliver = seconds_between(engine, deliveries.c.created_at, deliveries.c.delivered_at)
    posted = charge_lines.join(journals, journals.c.id == charge_lines.c.journal_id).join(
        messages, messages.c.id == charge_lines.c.source_message_id)
    samples = {
        "process": _sample(conn, process, messages, messages.c.id,
                           messages.c.processed_at.is_not(None)),
        "post": _sample(conn, post, posted, charge_lines.c.id,
                        messages.c.processed_at.is_not(None)),
        "deliver": _sample(conn, deliver, deliveries, deliveries.c.id,
                           deliveries.c.delivered_at.is_not(None)),
    }
    return [{"stage": stage, "count": len(values),
             **{f"p{p}": percentile(values, p) for p in PERCENTILES}}
            for stage, values in samples.items()]


def exceptions_by_reason(conn: Connection, active_only: bool) -> list[dict[str, Any]]:
    """Return work items per reason, largest first, with the cumulative share in percent."""
    query = select(work_items.c.reason, func.count()).group_by(work_items.c.reason)
    if active_only:
        query = query.where(work_items.c.status.in_(OPEN_STATES))
    rows = sorted(conn.execute(query).all(), key=lambda row: (-row[1], row[0]))
    total = sum(number for _, number in rows) or 1
    result, running = [], 0
    for reason, number in rows:
        running += number
        result.append({"reason": reason, "count": number,
                       "cumulative_percent": 100.0 * running / total})
    return result


def _days(values: list[float]) -> dict[str, Any]:
    values.sort()
    return {"count": len(values), "median": percentile(values, 50),
            "p90": percentile(values, 90)}


def billing_lag(conn: Connection) -> list[dict[str, Any]]:
    """Return the lag in days of each billing step: median and 90th percentile.

    Steps: service date to charge (the charge is priced when its message is
    processed), charge to journal, journal to its first confirmed delivery,
    and charge to claim when a ``claims`` table exists.
    """
    rows = conn.execute(
        select(charge_lines.c.service_date, messages.c.processed_at,
               journals.c.created_at.label("journaled_at"))
        .select_from(charge_lines.join(messages,
                                       messages.c.id == charge_lines.c.source_message_id)
                     .outerjoin(journals, journals.c.id == charge_lines.c.journal_id))
        .where(messages.c.processed_at.is_not(None))
        .order_by(charge_lines.c.id.desc()).limit(SAMPLE_LIMIT)).all()
    to_charge, to_journal = [], []
    for row in rows:
        processed = _as_datetime(row.processed_at)
        start = dt.datetime.combine(row.service_date, dt.time(), dt.UTC)
        to_charge.append((processed - start).total_seconds() / 86400)
        if row.journaled_at is not None:
            to_journal.append(
                (_as_datetime(row.journaled_at) - processed).total_seconds() / 86400)
    delivered = conn.execute(
        select(journals.c.created_at, func.min(deliveries.c.delivered_at))
        .join(deliveries, (deliveries.c.record_id == journals.c.id)
              & (deliveries.c.kind == "journal"))
        .where(deliveries.c.delivered_at.is_not(None))
        .group_by(journals.c.id, journals.c.created_at).limit(SAMPLE_LIMIT)).all()
    to_ledger = [(_as_datetime(done) - _as_datetime(created)).total_seconds() / 86400
                 for created, done in delivered]
    steps = [
        {"step": "service → charge", **_days(to_charge)},
        {"step": "charge → journal", **_days(to_journal)},
        {"step": "journal → ERP", **_days(to_ledger)},
    ]
    claim = _claim_lag(conn)
    if claim is not None:
        steps.append({"step": "charge → claim", **_days(claim)})
    return steps


def _claim_lag(conn: Connection) -> list[float] | None:
    """Return days from an encounter's last charge to its claim, if claims are stored."""
    tables = inspect(conn)
    if not tables.has_table("claims"):
        return None
    columns = {column["name"] for column in tables.get_columns("claims")}
    if not {"encounter_id", "created_at"} <= columns:
        # NOTE: a claims table of another shape is not measured yet.
        return None
    claims = Table("claims", MetaData(), autoload_with=conn)
    last_charge = (
        select(charge_lines.c.encounter_id, func.max(messages.c.processed_at).label("at"))
        .join(messages, messages.c.id == charge_lines.c.source_message_id)
        .group_by(charge_lines.c.encounter_id).subquery())
    rows = conn.execute(
        select(last_charge.c.at, claims.c.created_at)
        .join(claims, claims.c.encounter_id == last_charge.c.encounter_id)
        .limit(SAMPLE_LIMIT)).all()
    return [(_as_datetime(made) - _as_datetime(at)).total_seconds() / 86400
            for at, made in rows if at is not None and made is not None]


def rekeying_effort(engine: Engine, conn: Connection, minutes_per_entry: float,
                    now: dt.datetime, weeks: int = 12) -> dict[str, Any]:
    """Return the entries posted per week and the hours of manual keying they replace.

    An entry is a charge line, a stock issue or a journal, each of which a
    person would otherwise key into the billing system or the ERP. Charge
    lines and stock issues count in the week their message was processed,
    journals in the week they were created.
    """
    last = _bucket_start(now, "week")
    starts = [last - dt.timedelta(weeks=k) for k in range(weeks - 1, -1, -1)]
    tally: Counter[dt.datetime] = Counter()
    for table in (charge_lines, supply_issues):
        hour = _hour_column(engine, messages.c.processed_at)
        rows = conn.execute(
            select(hour, func.count())
            .select_from(table.join(messages, messages.c.id == table.c.source_message_id))
            .where(messages.c.processed_at >= starts[0]).group_by(hour))
        for value, number in rows:
            tally[_bucket_start(_as_datetime(value), "week")] += number
    hour = _hour_column(engine, journals.c.created_at)
    for value, number in conn.execute(select(hour, func.count())
                                      .where(journals.c.created_at >= starts[0])
                                      .group_by(hour)):
        tally[_bucket_start(_as_datetime(value), "week")] += number
    entries = [tally[start] for start in starts]
    hours = [number * minutes_per_entry / 60 for number in entries]
    return {"labels": [start.strftime("%Y-%m-%d") for start in starts],
            "entries": entries, "hours": hours,
            "average_hours": sum(hours) / len(hours) if hours else 0.0}
