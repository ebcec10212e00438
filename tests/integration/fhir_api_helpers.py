"""Shared set-up of the FHIR API tests: configuration, clients and a served API."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, select

from carebridge.api.security import Role, create_api_key, create_client
from carebridge.api.server import ApiThread
from carebridge.config.model import Configuration, SigningKey
from carebridge.store.schema import charge_lines

SIGNING_SECRET = "fhir-test-signing-secret-of-more-than-32-bytes-42"
SYNTHEA_BUNDLES = sorted(
    (Path(__file__).resolve().parents[2] / "src/carebridge/demo/data/synthea/fhir")
    .glob("*.json")
)


def api_configuration(config: Configuration, tmp_path: Path, **changes: object) -> Configuration:
    """The demo configuration with an HS256 signing key in a file and ``changes`` to ``api``."""
    key_file = tmp_path / "signing.key"
    key_file.write_text(SIGNING_SECRET)
    api = dataclasses.replace(
        config.api, signing_keys=(SigningKey("k1", "HS256", secret_file=key_file),),
        rate_limit_per_minute=100_000, **changes,
    )
    return dataclasses.replace(config, api=api)


def interface_key(engine: Engine, client_id: str = "ehr", role: Role = Role.INTERFACE) -> str:
    """Create a client with ``role`` and return an API key for it."""
    create_client(engine, client_id, frozenset({role}))
    return create_api_key(engine, client_id)


@contextmanager
def served(engine: Engine, config: Configuration) -> Iterator[str]:
    """Serve the API on a free loopback port; yield its ``/fhir`` base URL."""
    api = ApiThread(engine, config, "127.0.0.1", 0)
    api.start()
    try:
        yield f"http://127.0.0.1:{api.port}/fhir"
    finally:
        api.stop()


def charges(engine: Engine) -> list[tuple[str, ...]]:
    """Every charge line as comparable text, sorted, without row and message ids."""
    columns = (
        charge_lines.c.service_key, charge_lines.c.charge_code, charge_lines.c.revenue_code,
        charge_lines.c.hcpcs, charge_lines.c.units, charge_lines.c.unit_price,
        charge_lines.c.amount, charge_lines.c.currency, charge_lines.c.service_date,
        charge_lines.c.department, charge_lines.c.patient_id, charge_lines.c.encounter_id,
    )
    with engine.connect() as conn:
        rows = conn.execute(select(*columns)).all()
    return sorted(tuple(str(value) for value in row) for row in rows)
