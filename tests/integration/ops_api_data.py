"""Real data for the operations API tests: demo messages run through the engine.

:func:`load_demo_subset` stores and processes the bundled HL7 v2 samples, a
part of the Synthea CSV export (with one supply row changed to an item the
item master lacks, so supply chain has a work item) and one DFT^P03 whose
CPT code is unknown. Journals are posted and delivered to a destination
that refuses connections, so some deliveries are dead and others wait.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from carebridge.api.app import create_app
from carebridge.api.security import create_api_key, create_client, parse_roles
from carebridge.config.model import Configuration, DestinationConfig
from carebridge.engine.deliveries import run_deliveries
from carebridge.engine.intake import store_inputs
from carebridge.engine.posting import post_journals
from carebridge.engine.processor import process_pending
from carebridge.ingest.files.sources import discover, split_path
from carebridge.store.db import open_engine, sqlite_url

from ..conftest import BACKENDS, _postgres_schema_url
from .conftest import DEMO, hl7

AS_OF = dt.date(2025, 6, 1)
SYNTHEA_PROCEDURE_ROWS = 300
UNKNOWN_SUPPLY_CODE = "999999999"

UNKNOWN_CPT_DFT = hl7(
    "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|CTLOPS1|P|2.5",
    "EVN|P03|20240501120000",
    "PID|1||MRNOPS1^^^SENDFAC^MR||TESTPATIENT^OMEGA",
    "PV1|1|O|CLINIC1||||||||||||||||VISOPS1",
    "FT1|1|TXNOPS1||20240501|20240501|CG|99999^UNKNOWN VISIT^CPT|||1|135.50&USD|135.50&USD",
)
"""A charge whose CPT code has no chargemaster item: an unknown_code work item.
Replacing 99999 with 99213 makes it chargeable at 135.50."""

CORRECTED_DFT = UNKNOWN_CPT_DFT.replace(b"99999^UNKNOWN VISIT", b"99213^OFFICE VISIT EST")


def unreachable_url() -> str:
    """Return an HTTP URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/journals"


def with_unreachable_destination(config: Configuration) -> Configuration:
    destination = DestinationConfig(
        "erp", "http", ("journal",), {"url": unreachable_url(), "timeout_seconds": 2.0},
        max_attempts=1, circuit_failure_threshold=1000, batch_size=100,
    )
    return dataclasses.replace(config, destinations=(destination,))


def _inputs(tmp_path: Path) -> list[Path]:
    synthea = tmp_path / "synthea"
    synthea.mkdir()
    source = DEMO / "data" / "synthea" / "csv"
    for name in ("patients.csv", "encounters.csv"):
        shutil.copy(source / name, synthea / name)
    lines = (source / "procedures.csv").read_text().splitlines(keepends=True)
    (synthea / "procedures.csv").write_text("".join(lines[: SYNTHEA_PROCEDURE_ROWS + 1]))
    supplies = (source / "supplies.csv").read_text().splitlines(keepends=True)
    header, first, *rest = supplies
    cells = first.split(",")
    code_column = header.split(",").index("CODE")
    cells[code_column] = UNKNOWN_SUPPLY_CODE
    (synthea / "supplies.csv").write_text("".join([header, ",".join(cells), *rest]))
    dft = tmp_path / "unknown-cpt.hl7"
    dft.write_bytes(UNKNOWN_CPT_DFT)
    return [DEMO / "data" / "hl7v2", synthea, dft]


def load_demo_subset(engine: Engine, config: Configuration, tmp_path: Path) -> None:
    """Store, process and post the test data, then run one delivery pass of 5."""
    for path in discover(_inputs(tmp_path)).files:
        store_inputs(engine, split_path(path), source="files")
    process_pending(engine, config, as_of=AS_OF)
    post_journals(engine, config)
    run_deliveries(engine, config, owner="test", limit=5)


@dataclass
class Api:
    """A test client of the API on a loaded database, with an API key per role."""

    client: TestClient
    keys: dict[str, str]
    engine: Engine
    config: Configuration

    def get(self, role: str, path: str, **params):
        # httpx replaces the query of ``path`` (a next link) when params are given.
        return self.client.get(path, params=params or None,
                               headers={"X-API-Key": self.keys[role]})

    def post(self, role: str, path: str, body: dict | None = None):
        return self.client.post(path, json=body, headers={"X-API-Key": self.keys[role]})


ROLES = ("admin", "integration-analyst", "revenue-cycle", "supply-chain", "finance",
         "auditor")


def api_for(engine: Engine, config: Configuration) -> Api:
    keys = {}
    for role in ROLES:
        create_client(engine, role, parse_roles(role))
        keys[role] = create_api_key(engine, role)
    return Api(TestClient(create_app(engine, config)), keys, engine, config)


@pytest.fixture(scope="module", params=BACKENDS)
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        config: Configuration) -> Iterator[Api]:
    """The API on one database per test module and backend, loaded once.

    Loading takes seconds, so the tests of a module share it. Each test
    therefore checks counts as differences and changes only records that
    no other test of its module looks at.
    """
    folder = tmp_path_factory.mktemp("ops-api")
    configured = with_unreachable_destination(config)
    schema = None
    if request.param == "sqlite":
        url = sqlite_url(folder / "ops.db")
    else:
        admin: Engine = request.getfixturevalue("pg_admin")
        schema = f"test_{uuid.uuid4().hex[:16]}"
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = _postgres_schema_url(admin, schema)
    engine = open_engine(url)
    try:
        load_demo_subset(engine, configured, folder)
        yield api_for(engine, configured)
    finally:
        engine.dispose()
        if schema is not None:
            with admin.begin() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '10s'"))
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
