"""Database fixtures shared by the test suites: one database per test, per backend.

``db_url`` runs a test once on SQLite and once on PostgreSQL. The PostgreSQL
run needs ``CAREBRIDGE_TEST_PG_URL``, a SQLAlchemy URL of a database the
tests may create schemas in, e.g.
``postgresql+psycopg://carebridge:secret@127.0.0.1:5432/carebridge_test``;
``.ci/run`` starts such a cluster and sets it. Without it the PostgreSQL
runs are skipped; with it set but unreachable they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from carebridge.store.db import sqlite_url

PG_URL_VARIABLE = "CAREBRIDGE_TEST_PG_URL"

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"postgresql: runs on the PostgreSQL database named by {PG_URL_VARIABLE}"
    )
    config.addinivalue_line("markers", "tryton: starts a real trytond server on loopback")


SLOW_MODULES = (
    "tests/integration/test_tryton_erp.py",
    "tests/integration/test_crash_scale.py",
    "tests/acceptance/test_demo.py",
    "tests/integration/test_claims_demo.py",
    "tests/integration/test_crash_restart.py",
)
"""Modules that run for minutes, slowest first. ``make test`` runs the suite in
two processes (pytest-xdist, one module per process at a time, in collection
order), so these start first and the short modules fill in around them."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return SLOW_MODULES.index(path) if path in SLOW_MODULES else len(SLOW_MODULES)

    items.sort(key=rank)  # stable: the order within each module is kept


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """An engine on the test PostgreSQL database, used to create and drop schemas."""
    url = os.environ.get(PG_URL_VARIABLE)
    if not url:
        pytest.skip(f"PostgreSQL tests need {PG_URL_VARIABLE} (set by .ci/run)")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        engine.dispose()
        pytest.fail(
            f"{PG_URL_VARIABLE} is set but the database cannot be reached: "
            f"{exc.orig or exc}",
            pytrace=False,
        )
    yield engine
    engine.dispose()


def _postgres_schema_url(admin: Engine, schema: str) -> str:
    # libpq's "options" makes every connection of the URL start with the
    # schema as its search_path, so unqualified table names land there.
    url = admin.url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database of its own for this test, on each backend.

    On PostgreSQL each test gets a fresh schema, dropped afterwards. A
    schema isolates the test as well as a database would, and creating one
    needs no CREATEDB right.
    """
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "test.db")
        return
    admin: Engine = request.getfixturevalue("pg_admin")
    schema = f"test_{uuid.uuid4().hex[:16]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield _postgres_schema_url(admin, schema)
    finally:
        with admin.begin() as conn:
            # A connection the test leaked would block the drop for ever.
            conn.execute(text("SET LOCAL lock_timeout = '10s'"))
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
