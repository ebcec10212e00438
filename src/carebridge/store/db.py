"""Database engines and schema migrations.

SQLite in WAL mode by default, any SQLAlchemy URL otherwise (PostgreSQL
through psycopg 3). The schema is brought to the newest Alembic revision
when a database is opened; the revisions live in
``carebridge/store/migrations/versions``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

DEFAULT_DATABASE = Path("carebridge.db")

MIGRATIONS = "carebridge.store:migrations"
"""Alembic's ``script_location``, as a package resource so it works installed."""

BASELINE_REVISION = "0001"
"""The revision whose schema carebridge 0.1.0 created without Alembic."""

# Any constant works; it only has to be the same in every carebridge process.
_PG_MIGRATION_LOCK = 0x63617265


def sqlite_url(path: Path) -> str:
    """Return the SQLAlchemy URL of a SQLite file at ``path``."""
    return f"sqlite:///{path.resolve()}"


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the single writer; synchronous=FULL makes a
    # commit durable across power loss, which "durable before acknowledged"
    # depends on. busy_timeout waits for the writer lock instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
    # Let SQLAlchemy's "begin" event open every transaction (see below).
    dbapi_connection.isolation_level = None


def _begin_immediate(conn: Connection) -> None:
    # A deferred transaction that reads and then writes cannot wait for the
    # lock: SQLite fails it at once with "database is locked" when another
    # process wrote meanwhile. Taking the write lock at BEGIN makes a second
    # writer wait (up to busy_timeout) instead, and makes a claim-then-update
    # batch safe across processes.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


POOL_RECYCLE_SECONDS = 1800
"""Age at which a PostgreSQL connection is closed instead of reused."""


def open_engine(url: str, *, create: bool = True) -> Engine:
    """Open the database at ``url`` and, when ``create``, migrate it to the newest schema.

    Args:
        url: a SQLAlchemy URL, e.g. ``sqlite:///carebridge.db`` or
            ``postgresql+psycopg://user@host/db``.
        create: create the schema, or upgrade it, to the newest Alembic
            revision (see :func:`upgrade_engine`).
    """
    parsed = make_url(url)
    # hide_parameters keeps bound values (patient identifiers among them) out
    # of the text of every database error, and so out of logs and stderr.
    options: dict[str, object] = {}
    if parsed.get_backend_name() == "postgresql":
        # The server plans a session's foreign-key checks and prepared
        # statements once, with the table statistics of that moment. A worker
        # that connected while the journals table was nearly empty kept
        # checking each new journal line's foreign key with a sequential
        # scan. Connections older than this are replaced when next taken.
        options["pool_recycle"] = POOL_RECYCLE_SECONDS
    engine = create_engine(url, hide_parameters=True, **options)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_immediate)
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    if create:
        upgrade_engine(engine)
    log.info(
        "database opened",
        extra={"action": "db_open", "backend": parsed.get_backend_name()},
    )
    return engine


@contextmanager
def planned_each_time(conn: Connection) -> Iterator[None]:
    """Have PostgreSQL plan each statement run on ``conn`` afresh.

    psycopg prepares a statement on the server after its fifth run, and the
    server then keeps one generic plan for it. A step that runs the same
    look-ups batch after batch while a bulk load fills the tables keeps the
    plan chosen when they were small: the claims step's read of 200
    encounters' claims became a scan of every claim. Other databases are
    left as they are.
    """
    if conn.dialect.name != "postgresql":
        yield
        return
    driver = conn.connection.driver_connection
    before = driver.prepare_threshold
    driver.prepare_threshold = None
    try:
        yield
    finally:
        driver.prepare_threshold = before


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """Build the Alembic configuration in code; no ``alembic.ini`` is needed.

    Args:
        connection: run migrations on this connection, inside its transaction.
        url: otherwise open this database (used by Alembic's own commands,
            e.g. ``revision --autogenerate``).
    """
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    if url is not None:
        # ConfigParser treats % as interpolation; a URL-encoded password has them.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """Return the newest revision of the bundled migrations."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the migrations folder has no revision"
    return head


def current_revision(engine: Engine) -> str | None:
    """Return the database's Alembic revision, or ``None`` if it has none."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_engine(engine: Engine, revision: str = "head") -> str | None:
    """Migrate the database of ``engine`` to ``revision`` and return its revision.

    A database already at the head is only read, which keeps opening it
    cheap. A database created by carebridge 0.1.0 (tables but no revision)
    is stamped with the baseline revision first, so its tables are kept.
    On PostgreSQL the whole upgrade is one transaction under an advisory
    lock, so processes that open a new database together do not race.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        before = MigrationContext.configure(conn).get_current_revision()
        target = head_revision() if revision == "head" else revision
        if before == target:
            return before
        config = alembic_config(conn)
        if before is None and inspect(conn).has_table("messages"):
            command.stamp(config, BASELINE_REVISION)
            log.info(
                "database stamped",
                extra={"action": "db_stamp", "revision": BASELINE_REVISION},
            )
        command.upgrade(config, target)
        after = MigrationContext.configure(conn).get_current_revision()
    log.info(
        "database migrated",
        extra={"action": "db_upgrade", "from_revision": before, "to_revision": after},
    )
    return after


def upgrade_database(url: str, revision: str = "head") -> str | None:
    """Open the database at ``url``, migrate it to ``revision`` and return its revision.

    This is what ``carebridge db upgrade --db URL`` runs.
    """
    engine = open_engine(url, create=False)
    try:
        return upgrade_engine(engine, revision)
    finally:
        engine.dispose()
