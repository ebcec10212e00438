"""Large transaction Bundles validate alike in worker processes and in the API's own process.

An API on a thread of ``carebridge serve`` validates Bundles of
``PARALLEL_MIN_ENTRIES`` or more entries in worker processes; the API
processes of ``serve --api-workers N`` validate them themselves. Both must
reject unknown elements and decimals sent as text at the same element path,
and keep decimals exactly as sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from carebridge.api.app import create_app
from carebridge.api.fhir import validation
from carebridge.config.model import Configuration
from carebridge.store.schema import fhir_resources
from tests.integration.fhir_api_helpers import api_configuration, interface_key

FHIR = "application/fhir+json"
ENTRIES = validation.PARALLEL_MIN_ENTRIES + 6


@pytest.fixture(params=[True, False], ids=["worker-processes", "this-process"])
def api(request: pytest.FixtureRequest, engine: Engine, config: Configuration,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setattr(validation, "_parallel", request.param)
    return TestClient(create_app(engine, api_configuration(config, tmp_path)))


@pytest.fixture()
def headers(engine: Engine) -> dict[str, str]:
    return {"X-API-Key": interface_key(engine), "Content-Type": FHIR}


def transaction(resources: list[str]) -> bytes:
    """A transaction Bundle creating ``resources``, each given as its JSON text.

    Text, not dicts, so that a decimal such as ``135.50`` reaches the server
    exactly as written.
    """
    entries = ",".join(
        f'{{"resource":{resource},"request":{{"method":"POST",'
        f'"url":"{json.loads(resource)["resourceType"]}"}}}}'
        for resource in resources
    )
    return f'{{"resourceType":"Bundle","type":"transaction","entry":[{entries}]}}'.encode()


def patients(count: int) -> list[str]:
    return [json.dumps({"resourceType": "Patient", "name": [{"family": f"Bulk{number}"}]})
            for number in range(count)]


def stored(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(fhir_resources)).scalar_one()


def issue(response: Any) -> dict[str, Any]:
    return response.json()["issue"][0]


def test_unknown_element_path_reported(api: TestClient, headers: dict[str, str],
                                       engine: Engine) -> None:
    resources = patients(ENTRIES)
    resources[ENTRIES - 3] = '{"resourceType":"Patient","nickname":"Bulky"}'
    response = api.post("/fhir", headers=headers, content=transaction(resources))
    assert response.status_code == 400
    assert issue(response)["expression"] == [f"Bundle.entry[{ENTRIES - 3}].resource.nickname"]
    assert "unknown element 'nickname'" in issue(response)["diagnostics"]
    assert stored(engine) == 0


def test_decimal_as_text_rejected(api: TestClient, headers: dict[str, str],
                                  engine: Engine) -> None:
    resources = patients(ENTRIES)
    resources[ENTRIES - 2] = ('{"resourceType":"Observation","status":"final",'
                              '"code":{"text":"weight"},'
                              '"valueQuantity":{"value":"72.50","unit":"kg"}}')
    response = api.post("/fhir", headers=headers, content=transaction(resources))
    assert response.status_code == 400
    assert issue(response)["expression"] == [
        f"Bundle.entry[{ENTRIES - 2}].resource.valueQuantity.value"]
    assert stored(engine) == 0


def test_decimals_stored_as_sent(api: TestClient, headers: dict[str, str],
                                 engine: Engine) -> None:
    resources = patients(ENTRIES)
    resources[ENTRIES - 1] = ('{"resourceType":"Observation","status":"final",'
                              '"code":{"text":"weight"},'
                              '"valueQuantity":{"value":72.50,"unit":"kg"}}')
    response = api.post("/fhir", headers=headers, content=transaction(resources))
    assert response.status_code == 200
    location = response.json()["entry"][ENTRIES - 1]["response"]["location"]
    resource_id = location.split("/")[1]
    with engine.connect() as conn:
        content = conn.execute(select(fhir_resources.c.content)
                               .where(fhir_resources.c.resource_id == resource_id)).scalar_one()
    assert '"value":72.50' in content
    assert stored(engine) == ENTRIES
