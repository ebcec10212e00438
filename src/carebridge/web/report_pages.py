"""The dashboard (throughput, latency, exceptions, billing lag, re-keying) and reconciliation."""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from carebridge import audit
from carebridge.api.deps import context
from carebridge.api.security import Scope
from carebridge.reconcile import reconcile
from carebridge.web import dashboard_data as data
from carebridge.web.charts import Series, bar_chart
from carebridge.web.render import SECURITY_HEADERS, current_user, deny, render
from carebridge.web.session import WebUser

logger = logging.getLogger(__name__)

router = APIRouter()

RECONCILIATION_SCOPE = Scope.DELIVERIES_READ
"""Reconciliation compares postings with what reached the ledger, which the
roles that read deliveries (finance, auditor, integration analyst) may see."""

User = Annotated[WebUser | None, Depends(current_user)]

_WORK_ITEM_REF = re.compile(r"work item (\d+)")

MAX_ROWS_SHOWN = 1000
"""Differences listed on the page; the CSV export has every one."""


@router.get("/dashboard")
def dashboard(request: Request, user: User, period: str = "day",
              minutes: float = data.DEFAULT_MINUTES_PER_MANUAL_ENTRY,
              exceptions: str = "active") -> Response:
    """Show the operations charts."""
    if (refusal := deny(request, user, Scope.METRICS_READ)) is not None:
        return refusal
    period = period if period in data.PERIODS else "day"
    minutes = minutes if 0 < minutes <= 120 else data.DEFAULT_MINUTES_PER_MANUAL_ENTRY
    engine = context(request).engine
    now = dt.datetime.now(dt.UTC)
    with engine.connect() as conn:
        flow = data.throughput(engine, conn, period, now)
        latencies = data.stage_latencies(engine, conn)
        reasons = data.exceptions_by_reason(conn, exceptions != "all")
        lag = data.billing_lag(conn)
        effort = data.rekeying_effort(engine, conn, minutes, now)
    charts = {
        "throughput": bar_chart(
            f"Messages per {period}", flow["labels"],
            [Series("received", flow["received"]), Series("processed", flow["processed"])],
            unit="messages"),
        "latency": bar_chart(
            "Latency per stage (log scale)", [row["stage"] for row in latencies],
            [Series(f"p{p}", [row[f"p{p}"] or 0 for row in latencies])
             for p in data.PERCENTILES], unit="seconds", log_scale=True),
        "exceptions": bar_chart(
            "Work items by reason (Pareto)", [row["reason"] for row in reasons],
            [Series("work items", [row["count"] for row in reasons])], unit="items",
            cumulative_percent=[row["cumulative_percent"] for row in reasons]),
        "lag": bar_chart(
            "Billing lag per step", [row["step"] for row in lag],
            [Series("median", [row["median"] or 0 for row in lag]),
             Series("90th percentile", [row["p90"] or 0 for row in lag])], unit="days"),
        "effort": bar_chart(
            "Manual keying removed per week", effort["labels"],
            [Series("hours", effort["hours"])], unit="hours"),
    }
    return render(request, user, "dashboard.html", charts=charts, flow=flow,
                  latencies=latencies, reasons=reasons, lag=lag, effort=effort,
                  period=period, periods=list(data.PERIODS), minutes=minutes,
                  exceptions=exceptions, percentiles=data.PERCENTILES)


def _journal_destinations(request: Request) -> list[str]:
    return [d.name for d in context(request).config.destinations
            if d.enabled and "journal" in d.kinds]


def _report(request: Request, user: WebUser, day: str, department: str,
            unexplained_only: bool) -> tuple[Any, list[Any]]:
    report = reconcile(context(request).engine, destinations=_journal_destinations(request))
    shown = [d for d in report.differences
             if (not day or (d.day or "unknown") == day)
             and (not department or (d.department or "unknown") == department)
             and (not unexplained_only or not d.explained)]
    with context(request).engine.begin() as conn:
        audit.record(conn, user.principal.actor, "reconciliation.read", "report", None,
                     {"differences": len(report.differences),
                      "unexplained": report.unexplained})
    return report, shown


@router.get("/reconciliation")
def reconciliation(request: Request, user: User, day: str = "", department: str = "",
                   unexplained: bool = False, print_view: bool = False) -> Response:
    """Show documented events against postings per day and department."""
    if (refusal := deny(request, user, RECONCILIATION_SCOPE)) is not None:
        return refusal
    report, shown = _report(request, user, day[:20], department[:40], unexplained)
    rows = [{"difference": d, "work_item": _work_item_id(d.explanation)}
            for d in shown[:MAX_ROWS_SHOWN]]
    return render(request, user, "reconciliation.html", report=report, rows=rows,
                  groups=report.by_day_and_department(),
                  filters={"day": day, "department": department,
                           "unexplained": unexplained},
                  matching=len(shown), print_view=print_view,
                  generated=dt.datetime.now(dt.UTC),
                  destinations=_journal_destinations(request))


def _work_item_id(explanation: str) -> int | None:
    found = _WORK_ITEM_REF.search(explanation)
    return int(found.group(1)) if found else None


@router.get("/reconciliation.csv")
def reconciliation_csv(request: Request, user: User, day: str = "", department: str = "",
                       unexplained: bool = False) -> Response:
    """Return the shown differences as CSV, one row per difference."""
    if (refusal := deny(request, user, RECONCILIATION_SCOPE)) is not None:
        return refusal
    report, shown = _report(request, user, day[:20], department[:40], unexplained)
    report.differences = shown
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    headers = {**SECURITY_HEADERS,
               "Content-Disposition": f'attachment; filename="reconciliation-{stamp}.csv"'}
    return Response(report.to_csv(), media_type="text/csv; charset=utf-8",
                    headers=headers)
