"""``carebridge reconcile``: the reconciliation report on the command line."""

from __future__ import annotations

import json
import logging
import sys
from importlib import resources
from pathlib import Path

import click

from carebridge.config import load_configuration
from carebridge.destinations.tryton import PasswordUnavailable, TrytonSettings
from carebridge.erp.ledger import TrytonLedger
from carebridge.erp.rpc import TrytonError
from carebridge.reconcile import ErpLedger, reconcile
from carebridge.store.db import open_engine

log = logging.getLogger(__name__)


@click.command("reconcile", short_help="Check that documented events became postings.")
@click.option("--db", "db_url", required=True, help="SQLAlchemy URL of the database.")
@click.option("--destination", "destinations", multiple=True,
              help="A destination that must have confirmed every journal (repeatable).")
@click.option("--erp", "erp_destination", default=None, metavar="NAME",
              help="Also compare every journal with the posted moves in Tryton of the "
                   "destination NAME (type tryton, from --config).")
@click.option("--config", "config_dir",
              type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Configuration folder that defines the --erp destination. "
                   "Default: the configuration bundled with the demo.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write every difference to this CSV file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def reconcile_command(db_url: str, destinations: tuple[str, ...], erp_destination: str | None,
                      config_dir: Path | None, csv_path: Path | None, as_json: bool) -> None:
    """Compare documented services, supplies and messages with charges, stock
    issues, journals and deliveries, per day and department.

    Each difference names its record and source message, and is either
    explained (a work item, a parked charge, a delivery in the outbox) or
    unexplained. With --erp, journals missing from Tryton, posted there with
    other totals, or unknown to carebridge are differences too. Exits 1 when
    any difference is unexplained, and 2 when Tryton cannot be read.
    """
    erp = _tryton_ledger(erp_destination, config_dir) if erp_destination else None
    try:
        report = reconcile(open_engine(db_url), erp=erp, destinations=destinations)
    except TrytonError as exc:
        log.error("Tryton read failed",
                  extra={"action": "reconcile_erp_failed", "destination": erp_destination,
                         "error": type(exc).__name__})
        click.echo(f"error: cannot read the moves of destination {erp_destination} "
                   f"from Tryton: {exc}", err=True)
        sys.exit(2)
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


def _tryton_ledger(name: str, config_dir: Path | None) -> ErpLedger:
    """Return the ledger of the ``tryton`` destination ``name`` in the configuration."""
    config = load_configuration(config_dir or _bundled_config())
    destination = next((d for d in config.destinations if d.name == name), None)
    if destination is None:
        known = ", ".join(d.name for d in config.destinations) or "none"
        raise click.BadParameter(f"destination {name!r} is not configured "
                                 f"(configured: {known})", param_hint="--erp")
    if destination.type != "tryton":
        raise click.BadParameter(f"destination {name!r} is of type {destination.type}; "
                                 "only type tryton can be read back", param_hint="--erp")
    settings = TrytonSettings.model_validate(destination.settings)
    try:
        return TrytonLedger.from_settings(name, settings)
    except PasswordUnavailable as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def _bundled_config() -> Path:
    return Path(str(resources.files("carebridge").joinpath("demo", "config")))
