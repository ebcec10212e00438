"""Alembic migrations on SQLite and PostgreSQL: they build exactly schema.py's tables."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, String, cast, insert, inspect, select, text
from sqlalchemy.engine import Dialect

from carebridge.store.db import (
    BASELINE_REVISION,
    alembic_config,
    current_revision,
    head_revision,
    open_engine,
    upgrade_database,
    upgrade_engine,
)
from carebridge.store.migrations import compare_type
from carebridge.store.schema import journals, metadata

VERSION_TABLE = "alembic_version"


def _describe(diff: Any, dialect: Dialect) -> str:
    """Say in words what one ``compare_metadata`` difference means."""
    if isinstance(diff, list):
        return "; ".join(_describe(item, dialect) for item in diff)
    kind = diff[0]
    if kind == "add_table":
        return f"table {diff[1].name} is in schema.py but no revision creates it"
    if kind == "remove_table":
        return f"table {diff[1].name} is made by the revisions but is not in schema.py"
    if kind == "add_column":
        return f"column {diff[2]}.{diff[3].name} is in schema.py but no revision creates it"
    if kind == "remove_column":
        return f"column {diff[2]}.{diff[3].name} is made by the revisions but not in schema.py"
    if kind.startswith("modify_"):
        _, _, table, column, _, database, models = diff
        if kind == "modify_type":
            database, models = database.compile(dialect), models.compile(dialect)
        aspect = kind.removeprefix("modify_")
        return (
            f"column {table}.{column} {aspect}: the revisions give {database}, "
            f"schema.py says {models}"
        )
    if kind in ("add_index", "remove_index"):
        index = diff[1]
        where = "schema.py only" if kind == "add_index" else "the revisions only"
        return f"index {index.table.name}.{index.name} ({where})"
    if kind in ("add_constraint", "remove_constraint", "add_fk", "remove_fk"):
        constraint = diff[1]
        columns = ", ".join(column.name for column in constraint.columns)
        where = "schema.py only" if kind.startswith("add") else "the revisions only"
        return f"{kind} on {constraint.table.name}({columns}) ({where})"
    return repr(diff)


def _partitions(conn: Connection) -> set[str]:
    """Names of the PostgreSQL partitions in the current schema (none on SQLite)."""
    if conn.dialect.name != "postgresql":
        return set()
    return set(conn.execute(text(
        "SELECT relname FROM pg_class WHERE relispartition "
        "AND relnamespace = current_schema()::regnamespace"
    )).scalars())


def assert_matches_models(engine: Engine) -> None:
    """Fail, naming every table and column that differs, unless the schemas agree.

    PostgreSQL partitions (the monthly tables of ``message_bodies``) are
    left out: they are data, made at run time, and their columns are the
    partitioned table's, which is compared.
    """
    with engine.connect() as conn:
        partitions = _partitions(conn)

        def include_name(name: str | None, type_: str, _parents: Any) -> bool:
            return not (type_ == "table" and name in partitions)

        context = MigrationContext.configure(
            conn, opts={"compare_type": compare_type, "include_name": include_name}
        )
        differences = compare_metadata(context, metadata)
    assert not differences, (
        "the migrated database differs from src/carebridge/store/schema.py; add a "
        "revision (src/carebridge/store/migrations/versions/README.md):\n  - "
        + "\n  - ".join(_describe(diff, engine.dialect) for diff in differences)
    )


def user_tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {VERSION_TABLE}


def test_empty_database_upgrades_to_models(db_url: str) -> None:
    assert upgrade_database(db_url) == head_revision()

    engine = open_engine(db_url, create=False)
    try:
        assert current_revision(engine) == head_revision()
        assert_matches_models(engine)
    finally:
        engine.dispose()


def test_downgrade_then_upgrade_again(db_url: str) -> None:
    engine = open_engine(db_url)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert user_tables(engine) == set()
        assert current_revision(engine) is None

        assert upgrade_engine(engine) == head_revision()
        assert_matches_models(engine)
    finally:
        engine.dispose()


def test_reopen_keeps_rows(db_url: str) -> None:
    first = open_engine(db_url)
    try:
        with first.begin() as conn:
            conn.execute(text("INSERT INTO runs (command, started_at) VALUES ('t', :at)"),
                         {"at": dt.datetime(2024, 5, 1, tzinfo=dt.UTC)})
    finally:
        first.dispose()
    again = open_engine(db_url)
    try:
        with again.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM runs")).scalar_one() == 1
        assert current_revision(again) == head_revision()
    finally:
        again.dispose()


# Rows as carebridge 0.1.0 wrote them, one per table that later revisions
# change or that has foreign keys to such a table.
BASELINE_ROWS = [
    "INSERT INTO runs (id, command, started_at) VALUES (1, 'old', :at)",
    "INSERT INTO messages (id, source, format, received_at, content_sha256, dedup_key,"
    " occurrence, raw, state, run_id) VALUES (1, 'files', 'hl7v2', :at, 'ab', 'k1', 1,"
    " :raw, 'processed', 1)",
    "INSERT INTO patients (patient_id, family_name, source_message_id, updated_message_id)"
    " VALUES ('P1', 'TESTPATIENT', 1, 1)",
    "INSERT INTO services (id, service_key, message_id, origin, kind, quantity, outcome)"
    " VALUES (1, 's1', 1, 'clinical', 'procedure', '1', 'charged')",
    "INSERT INTO charge_lines (service_key, service_id, charge_code, revenue_code, units,"
    " unit_price, amount, currency, service_date, department, gl_account,"
    " source_message_id, chargemaster_version) VALUES ('s1', 1, 'C1', '0510', '1',"
    " '135.50', '135.50', 'USD', :day, 'CLINIC', '4000', 1, 'v1')",
    "INSERT INTO supply_usages (id, usage_key, message_id, outcome)"
    " VALUES (1, 'u1', 1, 'issued')",
]


def test_pre_alembic_database_keeps_rows(db_url: str) -> None:
    # carebridge 0.1.0 made the baseline tables with create_all and kept no
    # revision; opening such a database must keep its tables and rows.
    engine = open_engine(db_url, create=False)
    try:
        upgrade_engine(engine, BASELINE_REVISION)
        with engine.begin() as conn:
            values = {"at": dt.datetime(2024, 5, 1, tzinfo=dt.UTC), "raw": b"MSH|",
                      "day": dt.date(2024, 5, 1)}
            for statement in BASELINE_ROWS:
                conn.execute(text(statement), values)
            conn.execute(text(f"DROP TABLE {VERSION_TABLE}"))
        assert current_revision(engine) is None

        assert upgrade_engine(engine) == head_revision()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT command FROM runs")).scalars().all() == ["old"]
            assert conn.execute(text("SELECT lane FROM messages")).scalar_one() == 0
            assert conn.execute(
                text("SELECT family_name FROM patients")
            ).scalar_one() == "TESTPATIENT"
            assert conn.execute(text("SELECT count(*) FROM charge_lines")).scalar_one() == 1
            assert conn.execute(text("SELECT raw FROM message_bodies")).scalar_one() == b"MSH|"
        assert_matches_models(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("amount", ["135.50", "0.10", "-42.00", "1234567890.12", "3"])
def test_decimal_keeps_its_scale(engine: Engine, amount: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(journals).values(
                journal_key=f"test:{amount}",
                posting_batch=1,
                posting_date=dt.date(2024, 5, 1),
                department="TEST",
                cost_center="TEST",
                currency="USD",
                total_debit=Decimal(amount),
                total_credit=Decimal(amount),
                created_at=dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
            )
        )
    with engine.connect() as conn:
        read, stored = conn.execute(
            select(journals.c.total_debit, cast(journals.c.total_debit, String))
        ).one()
    assert isinstance(read, Decimal)
    assert str(read) == amount
    assert stored == amount
