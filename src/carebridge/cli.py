"""The ``carebridge`` command."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import NoSuchModuleError, OperationalError, SQLAlchemyError

from carebridge.config import load_chargemaster, load_configuration
from carebridge.config.chargemaster import FORMATS as CHARGEMASTER_FORMATS
from carebridge.engine.deliveries import delivery_summary, replay
from carebridge.engine.intake import store_inputs
from carebridge.engine.job import JobOptions, inputs_of, run_job
from carebridge.engine.retention import prune as prune_content
from carebridge.engine.worker import Worker, WorkerOptions, WorkerStats
from carebridge.ingest.files.sources import discover
from carebridge.ingest.hl7v2.mllp import ListenerThread
from carebridge.errors import CarebridgeError
from carebridge.logs import configure as configure_logging
from carebridge.store.db import (
    DEFAULT_DATABASE,
    current_revision,
    head_revision,
    open_engine,
    sqlite_url,
    upgrade_database,
)

log = logging.getLogger(__name__)


def bundled(*parts: str) -> Path:
    """Return the path of a file or folder shipped in the package."""
    return Path(str(resources.files("carebridge").joinpath(*parts)))


DEMO_INPUTS = ("synthea/csv", "hl7v2", "synthea/fhir")


class Progress:
    """A progress bar on stderr, one stage at a time; silent when stderr is no TTY."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.stage: str | None = None
        self.bar: Any = None
        self.shown = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.stage = stage
            label = {"ingest": "Storing raw messages", "process": "Processing"}[stage]
            self.bar = click.progressbar(length=max(total, 1), label=label, file=sys.stderr)
            self.bar.__enter__()
            self.shown = 0
        self.bar.update(done - self.shown)
        self.shown = done

    def close(self) -> None:
        """Finish the current bar."""
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def print_summary(summary: dict[str, Any]) -> None:
    """Print a run summary for a person."""
    accounted = summary["services_accounted"]
    charges = summary["charges"]
    supplies = summary["supply_postings"]
    journals = summary["journals"]
    items = summary["work_items"]
    lines = [
        "",
        f"carebridge run {summary['run_id']}  ({summary['database']})",
        f"  messages read        {summary['messages_read']:>8}   "
        f"({summary['duplicates']} duplicates, {summary['messages_failed']} failed)",
    ]
    for fmt, count in summary.get("messages_by_format", {}).items():
        lines.append(f"    {fmt:<28}{count:>6}")
    lines += [
        f"  services             {summary['services']:>8}   = {accounted['charged']} charged"
        f" + {accounted['work_items']} work items + {accounted['duplicates']} duplicates"
        + (f" + {accounted['waiting']} waiting for their encounter"
           if accounted["waiting"] else "")
        +
        f"  [{'holds' if accounted['identity_holds'] else 'BROKEN'}]",
        f"  charge lines         {charges['count']:>8}   total {charges['total']} "
        f"({charges['from_services']} from services, {charges['from_supplies']} from supplies)",
        f"  supply postings      {supplies['count']:>8}   cost {supplies['total_cost']}",
        f"  journals             {journals['count']:>8}   debit {journals['debit_total']}"
        f" credit {journals['credit_total']}"
        f"  [{'balanced' if journals['balanced'] else 'NOT BALANCED'}]",
        f"  work items           {items['total']:>8}",
    ]
    for reason, count in items["by_reason"].items():
        lines.append(f"    {reason:<28}{count:>6}")
    claims = summary.get("claims")
    if claims is not None:
        lines.append(
            f"  claims               {claims['count']:>8}   {claims['validated']} validated"
            f" and released, {claims['held']} held"
        )
    master = summary["chargemaster"]
    lines.append(
        f"  chargemaster         {master['items']:>8}   items, version {master['version']}"
        f" ({master['bad_rows']} bad rows reported at start)"
    )
    erp = summary.get("erp")
    if erp is not None:
        lines.append(
            f"  ERP (Tryton)         {erp['moves']:>8}   moves, {erp['stock_moves']} stock moves,"
            f" {erp['purchase_orders']} purchase orders, {erp['invoices']} invoices"
            f"  [{'matches the ledger' if erp['matches_ledger'] else 'DIFFERS FROM THE LEDGER'}]"
        )
    check = summary.get("ledger_check")
    if check is not None:
        lines.append(f"  ledger check         {'ok' if check['ok'] else 'FAILED'}")
    lines.append(
        f"  elapsed              {summary['elapsed_seconds']:>8} s "
        f"({summary['messages_per_second']} messages/s)"
    )
    skipped = summary.get("files_skipped", [])
    if skipped:
        lines.append(f"  files skipped        {len(skipped):>8}   (listed in the JSON summary)")
    for name, path in summary["outputs"].items():
        lines.append(f"  {name:<21}{path}")
    click.echo("\n".join(lines))


def emit(summary: dict[str, Any], as_json: bool) -> None:
    """Print ``summary`` as one JSON object or as text."""
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print_summary(summary)


def config_option(function: Any) -> Any:
    """Add ``--config DIR`` to a command."""
    return click.option(
        "--config",
        "config_dir",
        type=click.Path(file_okay=False, exists=True, path_type=Path),
        default=None,
        help="Configuration folder (carebridge.yaml and its files). "
        "Default: the configuration bundled with the demo.",
    )(function)


VERBOSE_HELP = (
    "Log more on stderr: -v for warnings, -vv for INFO, -vvv for DEBUG. "
    "With --out, INFO and above also go to OUT/carebridge.log."
)
LEVELS = [logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG]


def verbose_option(function: Any) -> Any:
    """Add ``-v`` to a subcommand, so it works after the command name too."""

    def raise_level(ctx: click.Context, _param: click.Parameter, count: int) -> int:
        if count:
            root = ctx.find_root()
            level = min(root.obj["console_level"], LEVELS[min(count, 3)])
            root.obj["console_level"] = level
            configure_logging(level)
        return count

    return click.option(
        "-v", "--verbose", count=True, expose_value=False, callback=raise_level,
        help=VERBOSE_HELP,
    )(function)


class CarebridgeGroup(click.Group):
    """The command group; turns database and file-system failures into one line.

    Without this, a refused connection or a mistyped URL would print a
    traceback. The message names the problem. SQLAlchemy is configured to
    leave bound parameters out of it, so no message content appears.
    """

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command, reporting database and OS errors as ``error:`` lines."""
        try:
            return super().invoke(ctx)
        except (SQLAlchemyError, NoSuchModuleError) as exc:
            detail = getattr(exc, "orig", None) or exc
            log.error("database error", extra={"action": "db_error",
                                               "error_type": type(detail).__name__})
            click.echo(f"error: database error: {str(detail).strip().splitlines()[0]}; "
                       "check the --db URL and that the database is running", err=True)
            sys.exit(4)
        except ModuleNotFoundError as exc:
            click.echo(f"error: database driver {exc.name} is not installed; carebridge "
                       "supports SQLite (sqlite:///FILE) and PostgreSQL "
                       "(postgresql+psycopg://...)", err=True)
            sys.exit(4)
        except OSError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


def existing_engine(db_url: str) -> Engine:
    """Open a database that must already exist (for maintenance commands).

    A mistyped SQLite path would otherwise create an empty database and
    report that there is nothing to do.
    """
    parsed = make_url(db_url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).is_file():
            click.echo(f"error: database file {parsed.database} not found", err=True)
            sys.exit(2)
    return open_engine(db_url)


@click.group(cls=CarebridgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="carebridge")
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """carebridge turns clinical messages into the finance work they imply.

    It stores each HL7 v2, FHIR R4 or Synthea CSV message verbatim, maps it to
    canonical records, prices services against the chargemaster, issues
    supplies from inventory, and posts balanced journals. What cannot be
    posted becomes a work item with a reason code.
    """
    ctx.obj = {"console_level": LEVELS[min(verbose, 3)]}
    configure_logging(ctx.obj["console_level"])


@main.command(short_help="Run the main job on the bundled public data.")
@verbose_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("carebridge-demo"),
    show_default=True,
    help="Folder for the journal CSV, beancount ledger, charge lines and work items.",
)
@click.option(
    "--db",
    "db_url",
    default=None,
    help="SQLAlchemy URL of the database. Default: a fresh SQLite file "
    "OUT/carebridge.db, replaced on every run. Give a URL to keep data "
    "between runs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--erp/--no-erp", default=True, show_default=True,
              help="Post the journals and supply issues into a Tryton database created "
              "in OUT/tryton (about 40 s more); --no-erp writes the ledger files only.")
@config_option
def demo(out_dir: Path, db_url: str | None, as_json: bool, erp: bool,
         config_dir: Path | None) -> None:
    """Run the main job on the real public data bundled with carebridge.

    Reads Synthea CSV exports and FHIR R4 bundles (synthetic patients) and
    public HL7 v2 samples, then writes priced charges, supply postings and
    balanced journals. The summary shows where every service went:
    services = charged + work items + duplicates.
    """
    fresh = db_url is None
    if db_url is None:
        database = out_dir / "carebridge.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        db_url = sqlite_url(database)
    paths = [bundled("demo", "data", *part.split("/")) for part in DEMO_INPUTS]
    erp_dir = (out_dir / "tryton", fresh) if erp else None
    _run(paths, out_dir, db_url, as_json, config_dir, command="demo", source="demo",
         erp_dir=erp_dir)


@main.command(short_help="Ingest your own HL7 v2, FHIR JSON or Synthea CSV files.")
@verbose_option
@click.argument(
    "paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path)
)
@click.option(
    "--db",
    "db_url",
    default=None,
    help=f"SQLAlchemy URL of the database. Default: SQLite file ./{DEFAULT_DATABASE}.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write the journal CSV, beancount ledger, charges and work items here.",
)
@click.option("--source", default="files", show_default=True,
              help="Source name recorded with every message.")
@click.option("--store-only", is_flag=True,
              help="Only store the messages; leave processing to `carebridge worker`.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@config_option
def ingest(
    paths: tuple[Path, ...],
    db_url: str | None,
    out_dir: Path | None,
    source: str,
    store_only: bool,
    as_json: bool,
    config_dir: Path | None,
) -> None:
    """Ingest your own files: HL7 v2 (.hl7), FHIR JSON (.json), Synthea CSV.

    PATHS are files or folders. Every message is stored before it is
    processed; a message seen before is recorded as a duplicate and not
    posted again.
    """
    if store_only:
        _store_only(list(paths), db_url or sqlite_url(DEFAULT_DATABASE), source, as_json)
        return
    _run(list(paths), out_dir, db_url or sqlite_url(DEFAULT_DATABASE), as_json,
         config_dir, command="ingest", source=source)


def _store_only(paths: list[Path], db_url: str, source: str, as_json: bool) -> None:
    try:
        engine = open_engine(db_url)
        found = discover(paths)
        total = store_inputs(engine, inputs_of(found.files), source=source)
    except CarebridgeError as exc:
        _fail(str(exc), exc.exit_code, as_json)
    except OperationalError as exc:
        _fail(f"database error: {exc.orig}", 4, as_json)
    summary = {"messages_read": total.read, "stored": total.stored,
               "duplicates": total.duplicates, "failed": total.failed,
               "files": len(found.files), "files_skipped": len(found.skipped)}
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(" ".join(f"{key}={value}" for key, value in summary.items()))


def _worker_options(function: Any) -> Any:
    function = click.option(
        "--batch-size", type=click.IntRange(1, 10000), default=500, show_default=True,
        help="Messages claimed and committed together.")(function)
    function = click.option(
        "--no-deliver", is_flag=True, help="Do not send deliveries from this process.")(
        function)
    return config_option(function)


def _start_worker(db_url: str, config_dir: Path | None, options: WorkerOptions,
                  until_idle: bool, *, listen: bool = False,
                  api_address: tuple[str, int] | None = None) -> WorkerStats:
    try:
        config = load_configuration(config_dir or bundled("demo", "config"))
        engine = open_engine(db_url)
    except CarebridgeError as exc:
        _fail(str(exc), exc.exit_code, False)
    worker = Worker(engine, config, options)
    worker.install_signal_handlers()
    listeners = None
    api = None
    try:
        if api_address is not None:
            from carebridge.api.server import ApiThread

            try:
                api = ApiThread(engine, config, *api_address)
            except CarebridgeError as exc:
                _fail(str(exc), exc.exit_code, False)
            api.start()
        if listen and config.listeners:
            # Raises if a port cannot be bound, before any message is accepted.
            listeners = ListenerThread(engine, config.listeners)
            listeners.start()
        return worker.run(until_idle=until_idle)
    finally:
        if listeners is not None:
            # Stops accepting, then commits and acknowledges what is queued.
            listeners.stop()
        if api is not None:
            api.stop()


@main.command(short_help="Run workers only, against a shared database.")
@verbose_option
@click.option("--db", "db_url", required=True,
              help="SQLAlchemy URL of the shared database, e.g. "
              "postgresql+psycopg://user:password@host/carebridge.")
@click.option("--until-idle", is_flag=True,
              help="Exit once no message is left to process (for batch jobs and tests).")
@click.option("--no-claims", is_flag=True,
              help="Do not build or release claims from this process; run at least "
              "one worker without this flag so that claims are billed.")
@_worker_options
def worker(db_url: str, until_idle: bool, no_claims: bool, batch_size: int,
           no_deliver: bool, config_dir: Path | None) -> None:
    """Process stored messages, post journals, bill claims and send deliveries.

    Start as many workers as you like, on any hosts, against one PostgreSQL
    database; they share the work without processing a patient's messages
    out of order. SIGTERM or Ctrl-C stops a worker after its current batch.
    With --no-claims a worker leaves billing to the others, so that
    processing workers are not slowed by claim checks and validation.
    """
    options = WorkerOptions(batch_size=batch_size, deliver=not no_deliver,
                            claims=not no_claims)
    stats = _start_worker(db_url, config_dir, options, until_idle)
    click.echo(f"worker {options.owner}: {stats.processed} processed, "
               f"{stats.failed} failed, {stats.journals} journals")


@main.command(short_help="Run carebridge as one service on the embedded database.")
@verbose_option
@click.option("--db", "db_url", default=None,
              help=f"SQLAlchemy URL of the database. Default: SQLite file ./{DEFAULT_DATABASE}.")
@click.option("--inbox", type=click.Path(file_okay=False, path_type=Path),
              default=Path("inbox"), show_default=True,
              help="Folder watched for files; each is stored, then moved to INBOX/done/.")
@click.option("--host", default=None,
              help="Address the API listens on. Default: api.host in carebridge.yaml "
              "(127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port of the API. Default: api.port in carebridge.yaml (8080).")
@click.option("--no-api", is_flag=True, help="Do not serve the FHIR and operations API.")
@click.option("--api-workers", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Serve the API from N processes of their own, which share the port; "
              "0 serves it from a thread of this process. Processes use more cores "
              "and memory; each keeps its own rate-limit buckets.")
@_worker_options
def serve(db_url: str | None, inbox: Path, host: str | None, port: int | None,
          no_api: bool, api_workers: int, batch_size: int, no_deliver: bool,
          config_dir: Path | None) -> None:
    """Run everything as one service: API, MLLP listeners, inbox, processing, delivery.

    The FHIR R4 and operations API answers on --host and --port
    (``/openapi.json`` describes it), from this process or, with
    --api-workers, from processes of its own. The MLLP listeners configured
    in carebridge.yaml (``listeners:``) send AA only after a message is
    committed. Drop HL7 v2, FHIR JSON or Synthea CSV files into the inbox;
    a file moves to INBOX/done/ only after its messages are committed.
    SIGTERM or Ctrl-C stops the service after the batch in hand.
    """
    import gc
    import signal

    inbox.mkdir(parents=True, exist_ok=True)
    options = WorkerOptions(batch_size=batch_size, deliver=not no_deliver, inbox=inbox)
    db_url = db_url or sqlite_url(DEFAULT_DATABASE)
    api_address = None
    config = None
    if not no_api:
        try:
            config = load_configuration(config_dir or bundled("demo", "config"))
        except CarebridgeError as exc:
            _fail(str(exc), exc.exit_code, False)
        settings = config.api
        if settings.enabled or host is not None or port is not None:
            api_address = (host or settings.host,
                           settings.port if port is None else port)
    # What is alive now (modules, the configuration) lives as long as the
    # service. Frozen, it is skipped by every full garbage collection. Without
    # this the worker spent a third of its CPU time in those on Synthea Bundles.
    gc.collect()
    gc.freeze()
    if api_address is None or not api_workers:
        _start_worker(db_url, config_dir, options, False, listen=True,
                      api_address=api_address)
        return
    from carebridge.api.server import ApiProcesses

    assert config is not None
    # Create or upgrade the schema here, once, before the API processes open it.
    try:
        open_engine(db_url).dispose()
    except CarebridgeError as exc:
        _fail(str(exc), exc.exit_code, False)

    def stop_starting(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    # Until the worker installs its own handlers, SIGTERM or Ctrl-C stops the
    # API processes started so far, then the service.
    signal.signal(signal.SIGTERM, stop_starting)
    signal.signal(signal.SIGINT, stop_starting)
    api = ApiProcesses(db_url, config, *api_address, api_workers)
    try:
        api.start()
        _start_worker(db_url, config_dir, options, False, listen=True)
    finally:
        api.stop()


@main.command(short_help="Archive, then prune message content past its retention.")
@verbose_option
@click.option("--db", "db_url", required=True, help="SQLAlchemy URL of the database.")
@click.option("--archive", "archive_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None,
              help="Folder for the gzipped JSON Lines archive written and verified "
              "before pruning. Default: retention.archive_dir in carebridge.yaml.")
@click.option("--before", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="Prune nothing received in or after this date's month (YYYY-MM-DD).")
@click.option("--dry-run", is_flag=True, help="Count what would be pruned; change nothing.")
@click.option("--vacuum", is_flag=True,
              help="SQLite: rewrite the file once so freed space goes back to the disk.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@config_option
def prune(db_url: str, archive_dir: Path | None, before: dt.datetime | None, dry_run: bool,
          vacuum: bool, as_json: bool, config_dir: Path | None) -> None:
    """Archive and prune raw message content older than the retention policy.

    Content of processed messages goes after retention.content_days; failed
    messages and those with an open work item keep theirs for
    retention.errored_content_days; messages not yet processed are never
    pruned. Message metadata and lineage stay. On PostgreSQL a month's
    content is one partition, dropped at once.
    """
    try:
        config = load_configuration(config_dir or bundled("demo", "config"))
        result = prune_content(
            existing_engine(db_url), config, now=dt.datetime.now(dt.UTC),
            archive_dir=archive_dir, dry_run=dry_run,
            before=before.date() if before else None, vacuum=vacuum,
        )
    except CarebridgeError as exc:
        _fail(str(exc), exc.exit_code, as_json)
    report = {
        "dry_run": result.dry_run, "pruned": result.pruned,
        "pruned_bytes": result.pruned_bytes, "retained": result.retained,
        "months": result.months, "partitions_dropped": result.partitions_dropped,
        "archives": [str(path) for path in result.archives], "space": result.space,
        "size_before": result.size_before, "size_after": result.size_after,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            click.echo(f"{key:<20}{value}")


@main.group()
def db() -> None:
    """Create or upgrade the database schema."""


@db.command("upgrade")
@click.option("--db", "db_url", required=True, help="SQLAlchemy URL of the database.")
def db_upgrade(db_url: str) -> None:
    """Bring the database to the newest schema revision."""
    revision = upgrade_database(db_url)
    click.echo(f"database at revision {revision}")


@db.command("current")
@click.option("--db", "db_url", required=True, help="SQLAlchemy URL of the database.")
def db_current(db_url: str) -> None:
    """Print the database's schema revision and the newest one."""
    revision = current_revision(existing_engine(db_url))
    click.echo(f"database at revision {revision or '(none)'}; newest is {head_revision()}")


@main.group()
def deliveries() -> None:
    """Inspect the outbox and replay dead letters."""


@deliveries.command("list")
@click.option("--db", "db_url", required=True, help="SQLAlchemy URL of the database.")
def deliveries_list(db_url: str) -> None:
    """Print delivery counts by destination and state."""
    with existing_engine(db_url).connect() as conn:
        click.echo(json.dumps(delivery_summary(conn), indent=2, sort_keys=True))


@deliveries.command("replay")
@click.option("--db", "db_url", required=True, help="SQLAlchemy URL of the database.")
@click.option("--id", "delivery_ids", type=int, multiple=True,
              help="Replay this dead delivery; repeat for several.")
@click.option("--destination", default=None, help="Replay the dead letters of one destination.")
@click.option("--all", "all_dead", is_flag=True, help="Replay every dead letter.")
def deliveries_replay(db_url: str, delivery_ids: tuple[int, ...], destination: str | None,
                      all_dead: bool) -> None:
    """Queue dead deliveries again; each replay records the one it copies."""
    if not (delivery_ids or destination or all_dead):
        raise click.UsageError("give --id, --destination or --all")
    with existing_engine(db_url).begin() as conn:
        new_ids = replay(conn, delivery_ids=list(delivery_ids) or None,
                         destination=destination, all_dead=all_dead)
    click.echo(f"{len(new_ids)} deliveries queued again")
    if not new_ids and (delivery_ids or destination):
        click.echo("error: no dead delivery matches the ids or destination given", err=True)
        sys.exit(1)


@main.command(short_help="Check a chargemaster file and list its bad rows.")
@verbose_option
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(CHARGEMASTER_FORMATS),
    required=True,
    help="Layout of the file: CMS price-transparency v3 (tall CSV, wide CSV, "
    "JSON) or a 2019 hospital CDM with a CPT or a revenue-code column.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def chargemaster(path: Path, fmt: str, as_json: bool) -> None:
    """Load a chargemaster file and report its items and every bad row.

    Nothing is stored; use this to check a price list before naming it as the
    house chargemaster in carebridge.yaml. Each bad row is reported with its
    file, line and column, and is never guessed.
    """
    load = load_chargemaster(path, fmt)
    report = {
        "file": str(path),
        "format": fmt,
        "rows_read": load.rows_read,
        "items": len(load.items),
        "blank_rows": load.blank_rows,
        "bad_rows": len(load.errors),
        "errors": [str(error) for error in load.errors],
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(
            f"{path}: {report['items']} items from {report['rows_read']} rows "
            f"({report['blank_rows']} blank, {report['bad_rows']} bad)"
        )
        for error in report["errors"]:
            click.echo(f"  {error}")
    if load.errors:
        sys.exit(1)


@main.command(short_help="Measure the AI-assisted checks on labelled data.")
@verbose_option
@click.option("--patients", type=click.IntRange(min=10), default=100_000, show_default=True,
              help="Size of the generated patient index; the encounter sets scale with it.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the labelled-data generator; the same seed gives the same data.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def evaluate(patients: int, seed: int, as_json: bool) -> None:
    """Measure each AI-assisted check and a simple baseline on labelled data.

    Builds labelled sets from the bundled public data (duplicate patients
    with registration errors, removed charges, altered units and amounts),
    runs duplicate-patient linkage, the missing-charge check and the anomaly
    check with their baselines, and prints precision, recall, F1 and seconds.
    Nothing is downloaded.
    """
    # Imported here: Splink and DuckDB take a second to load.
    from carebridge.checks.evaluate import evaluate as run_evaluation
    from carebridge.checks.evaluate import format_table

    report = run_evaluation(patients, seed)
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else format_table(report))


@main.group()
def checks() -> None:
    """Run the AI-assisted checks and act on their flags.

    The checks only open work items; a merge of duplicate patients happens
    only when a person approves it.
    """


@checks.command("run")
@verbose_option
@click.option("--db", "db_url", required=True, help="SQLAlchemy URL of the database.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def checks_run(db_url: str, as_json: bool) -> None:
    """Flag duplicate patients, missing charges and anomalies as work items, then rank the queue."""
    from carebridge.checks.run import run_checks

    result = run_checks(existing_engine(db_url))
    report = {"patients": result.patients, "encounters": result.encounters,
              "flagged": result.flagged, "opened": result.opened, "ranked": result.ranked}
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    click.echo(f"{result.patients} patients, {result.encounters} encounters checked; "
               f"{result.ranked} open work items ranked")
    for reason, count in sorted(result.flagged.items()):
        click.echo(f"  {reason:<24}{count:>6} flagged, {result.opened[reason]} new work items")


@checks.command("approve-merge")
@click.option("--db", "db_url", required=True, help="SQLAlchemy URL of the database.")
@click.option("--item", "item_id", type=int, required=True,
              help="Id of the duplicate_patient work item.")
@click.option("--actor", required=True, help="Who approves the merge; recorded in its history.")
@click.option("--survivor", default=None,
              help="Patient id that survives. Default: the one registered first.")
def checks_approve_merge(db_url: str, item_id: int, actor: str, survivor: str | None) -> None:
    """Merge the pair of a duplicate-patient work item and re-point the merged records."""
    from carebridge.checks.merge import approve_merge

    try:
        result = approve_merge(existing_engine(db_url), item_id, actor, survivor)
    except CarebridgeError as exc:
        _fail(str(exc), exc.exit_code, False)
    moved = ", ".join(f"{count} {table}" for table, count in sorted(result.repointed.items()))
    click.echo(f"merged {result.merged_patient_id} into {result.surviving_patient_id}; "
               f"re-pointed {moved}")


@checks.command("reject-duplicate")
@click.option("--db", "db_url", required=True, help="SQLAlchemy URL of the database.")
@click.option("--item", "item_id", type=int, required=True,
              help="Id of the duplicate_patient work item.")
@click.option("--actor", required=True, help="Who rejects it; recorded in its history.")
@click.option("--note", default="", help="Why the two records are different patients.")
def checks_reject_duplicate(db_url: str, item_id: int, actor: str, note: str) -> None:
    """Close a duplicate-patient work item as two different patients; merges nothing."""
    from carebridge.checks.merge import reject_duplicate

    try:
        reject_duplicate(existing_engine(db_url), item_id, actor, note)
    except CarebridgeError as exc:
        _fail(str(exc), exc.exit_code, False)
    click.echo(f"work item {item_id} rejected")


def _fail(message: str, exit_code: int, as_json: bool) -> None:
    click.echo(f"error: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": exit_code}))
    sys.exit(exit_code)


def _run(
    paths: list[Path],
    out_dir: Path | None,
    db_url: str,
    as_json: bool,
    config_dir: Path | None,
    *,
    command: str,
    source: str,
    erp_dir: tuple[Path, bool] | None = None,
) -> None:
    progress = Progress(enabled=not as_json)
    if out_dir is not None:
        console_level = click.get_current_context().find_root().obj["console_level"]
        configure_logging(console_level, out_dir / "carebridge.log")
    try:
        config = load_configuration(config_dir or bundled("demo", "config"))
        engine = open_engine(db_url)
        summary = run_job(
            engine, config, JobOptions(paths=paths, out_dir=out_dir, source=source),
            command=command, progress=progress,
        )
    except CarebridgeError as exc:
        progress.close()
        _fail(str(exc), exc.exit_code, as_json)
    except OperationalError as exc:
        progress.close()
        log.error("database error", extra={"action": "db_error",
                                           "error_type": type(exc.orig).__name__})
        _fail(
            f"database error: {exc.orig}; if another carebridge process is writing "
            "to the same SQLite file, wait for it or use PostgreSQL",
            4,
            as_json,
        )
    progress.close()
    if erp_dir is not None:
        summary["erp"] = _post_to_tryton(engine, config, *erp_dir, as_json=as_json)
    emit(summary, as_json)
    if not summary.get("erp", {}).get("matches_ledger", True):
        sys.exit(3)
    if not summary["journals"]["balanced"] or not summary["services_accounted"]["identity_holds"]:
        sys.exit(3)


def _post_to_tryton(engine: Any, config: Any, folder: Path, fresh: bool, *,
                    as_json: bool) -> dict[str, Any]:
    """Run ``demo --erp``: post the run into a Tryton database in ``folder``."""
    from carebridge.erp.demo import post_run_to_tryton
    from carebridge.erp.rpc import TrytonError
    from carebridge.erp.server import TrytonServerError

    try:
        return post_run_to_tryton(engine, config, folder, fresh=fresh)
    except (TrytonError, TrytonServerError, OSError) as exc:
        _fail(f"posting into Tryton failed: {exc}; its log is {folder / 'trytond.log'}",
              5, as_json)
    raise AssertionError("unreachable: _fail exits")


from carebridge.api.commands import api_group, audit_group  # noqa: E402
from carebridge.reconcile_command import reconcile_command  # noqa: E402

main.add_command(api_group)
main.add_command(audit_group)
main.add_command(reconcile_command)

if __name__ == "__main__":
    main()
