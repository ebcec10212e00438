"""``carebridge reconcile``: the reconciliation report on the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from carebridge.reconcile import reconcile
from carebridge.store.db import open_engine


@click.command("reconcile", short_help="Check that documented events became postings.")
@click.option("--db", "db_url", required=True, help="SQLAlchemy URL of the database.")
@click.option("--destination", "destinations", multiple=True,
              help="A destination that must have confirmed every journal (repeatable).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write every difference to this CSV file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def reconcile_command(db_url: str, destinations: tuple[str, ...], csv_path: Path | None,
                      as_json: bool) -> None:
    """Compare documented services, supplies and messages with charges, stock
    issues, journals and deliveries, per day and department.

    Each difference names its record and source message, and is either
    explained (a work item, a parked charge, a delivery in the outbox) or
    unexplained. Exits 1 when any difference is unexplained.
    """
    report = reconcile(open_engine(db_url), destinations=destinations)
    if csv_path is not None:
        csv_path.write_text(report.to_csv(), encoding="utf-8")
    if as_json:
        click.echo(json.dumps(report.as_dict(), default=str))
    else:
        click.echo(f"checked: {', '.join(f'{k} {v}' for k, v in report.checked.items())}")
        click.echo(f"differences: {len(report.differences)} "
                   f"({report.unexplained} unexplained)")
        for row in report.by_day_and_department():
            click.echo(f"  {row['day']}  {row['department']:<12} "
                       f"explained {row['explained']:>5}  unexplained {row['unexplained']:>3}")
        for difference in report.differences:
            if not difference.explained:
                click.echo(f"UNEXPLAINED {difference.kind}: {difference.record} "
                           f"(message {difference.message_id}): {difference.explanation}")
    if report.unexplained:
        sys.exit(1)
