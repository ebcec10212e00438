"""The FHIR API on a real uvicorn server: a FHIR client library and concurrent writes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
from fhirclient import client as fhir_client
from fhirclient.models.bundle import Bundle
from sqlalchemy import Engine, func, select

from carebridge.config.model import Configuration
from carebridge.engine.intake import store_inputs
from carebridge.engine.processor import process_pending
from carebridge.ingest.files.sources import split_path
from carebridge.store.db import open_engine, sqlite_url
from carebridge.store.schema import fhir_conditional_keys, fhir_resources, messages
from tests.integration.fhir_api_helpers import (
    SYNTHEA_BUNDLES,
    api_configuration,
    charges,
    interface_key,
    served,
)


def test_fhirclient_bundles_charge_like_files(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    api_config = api_configuration(config, tmp_path)
    key = interface_key(engine)
    with served(engine, api_config) as base:
        smart = fhir_client.FHIRClient(settings={"app_id": "carebridge-tests",
                                                 "api_base": base})
        smart.server.session.headers["X-API-Key"] = key
        smart.prepare()  # reads GET /fhir/metadata without credentials
        assert smart.server.capabilityStatement.fhirVersion == "4.0.1"
        for path in SYNTHEA_BUNDLES:
            bundle = Bundle(json.loads(path.read_bytes()))
            response = smart.server.post_json("", bundle.as_json())
            answer = response.json()
            assert answer["type"] == "transaction-response"
            assert len(answer["entry"]) == len(bundle.entry)
    process_pending(engine, api_config)

    files = open_engine(sqlite_url(tmp_path / "files.db"))
    try:
        inputs = [item for path in SYNTHEA_BUNDLES for item in split_path(path)]
        store_inputs(files, inputs, source="files")
        process_pending(files, config)
        expected = charges(files)
    finally:
        files.dispose()
    posted = charges(engine)
    assert len(expected) > 0
    assert posted == expected


def test_concurrent_conditional_creates_one_resource(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    key = interface_key(engine)
    body = json.dumps({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:example:mrn", "value": "MRN-50"}],
        "name": [{"family": "Concurrent"}],
    })
    statuses: list[int] = []
    ids: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(50)

    def post(base: str) -> None:
        with httpx.Client(timeout=60) as http:
            start.wait()
            response = http.post(
                f"{base}/Patient", content=body,
                headers={"X-API-Key": key, "Content-Type": "application/fhir+json",
                         "If-None-Exist": "identifier=urn:example:mrn|MRN-50"},
            )
        with lock:
            statuses.append(response.status_code)
            ids.append(response.json().get("id", ""))

    with served(engine, api_configuration(config, tmp_path)) as base:
        threads = [threading.Thread(target=post, args=(base,)) for _ in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)

    assert len(statuses) == 50
    assert sorted(set(statuses)) == [200, 201]
    assert statuses.count(201) == 1
    assert len(set(ids)) == 1
    with engine.connect() as conn:
        stored = conn.execute(select(func.count()).select_from(fhir_resources)).scalar()
        keys = conn.execute(select(func.count()).select_from(fhir_conditional_keys)).scalar()
        stored_messages = conn.execute(select(func.count()).select_from(messages)).scalar()
    assert stored == 1
    assert keys == 1
    assert stored_messages == 1
