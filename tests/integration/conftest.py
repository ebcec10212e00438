"""Fixtures for pipeline tests on real databases: SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import pytest
from sqlalchemy import Engine

from carebridge.config import load_configuration
from carebridge.config.model import Configuration
from carebridge.store.db import open_engine

DEMO = Path(str(resources.files("carebridge").joinpath("demo")))


@pytest.fixture(scope="session")
def config() -> Configuration:
    return load_configuration(DEMO / "config")


@pytest.fixture()
def engine(db_url: str) -> Iterator[Engine]:
    """The carebridge database of one test, migrated to the newest schema.

    Parametrized through ``db_url`` (tests/conftest.py): every test that
    uses it runs on SQLite and on PostgreSQL.
    """
    db = open_engine(db_url)
    yield db
    db.dispose()


def hl7(*segments: str) -> bytes:
    """Join segments with CR, as HL7 v2 requires, and end with a CR."""
    return ("\r".join(segments) + "\r").encode("ascii")


def run_at_once(work: Callable[[], object], threads: int) -> list[BaseException]:
    """Run ``work`` on ``threads`` threads that start together; return what they raised."""
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def run() -> None:
        start.wait()
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - returned for the caller's assert
            errors.append(exc)

    running = [threading.Thread(target=run) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    return errors
