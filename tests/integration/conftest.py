"""Fixtures for pipeline tests on a real SQLite database."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
from sqlalchemy import Engine

from carebridge.config import load_configuration
from carebridge.config.model import Configuration
from carebridge.store.db import open_engine, sqlite_url

DEMO = Path(str(resources.files("carebridge").joinpath("demo")))


@pytest.fixture(scope="session")
def config() -> Configuration:
    return load_configuration(DEMO / "config")


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    db = open_engine(sqlite_url(tmp_path / "test.db"))
    yield db
    db.dispose()


def hl7(*segments: str) -> bytes:
    """Join segments with CR, as HL7 v2 requires, and end with a CR."""
    return ("\r".join(segments) + "\r").encode("ascii")
