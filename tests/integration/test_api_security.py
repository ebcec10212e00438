"""Authentication, authorisation, limits and the audit chain of the API.

The route walks read the app's own OpenAPI schema, so a route added later
is covered without editing this file: it must refuse a caller without
credentials (401) and a caller whose roles lack its scope (403).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text, update

from carebridge import audit
from carebridge.api.app import create_app
from carebridge.api.security import (
    ROLE_SCOPES,
    Role,
    Scope,
    create_api_key,
    create_client,
    revoke_api_key,
)
from carebridge.config.model import ApiSettings, Configuration, SigningKey
from carebridge.store.db import open_engine, sqlite_url
from carebridge.store.schema import audit_events

PUBLIC = {
    ("GET", "/health"),
    ("GET", "/ready"),
    ("POST", "/oauth/token"),
    ("GET", "/fhir/metadata"),
}
SIGNING_SECRET = "test-signing-secret-of-more-than-32-bytes-0123456789"


def with_api(config: Configuration, **changes: Any) -> Configuration:
    return dataclasses.replace(config, api=dataclasses.replace(config.api, **changes))


@pytest.fixture()
def api_config(config: Configuration, tmp_path: Path) -> Configuration:
    key_file = tmp_path / "signing.key"
    key_file.write_text(SIGNING_SECRET)
    return with_api(config, signing_keys=(SigningKey("k1", "HS256", secret_file=key_file),))


@pytest.fixture()
def sqlite_engine(tmp_path: Path) -> Engine:
    engine = open_engine(sqlite_url(tmp_path / "api.db"))
    yield engine
    engine.dispose()


def _routes(routes: list[Any]) -> Iterator[Any]:
    """Yield every route, including those of routers FastAPI keeps nested."""
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:
            yield from contexts()
        else:
            yield route


def route_scopes(app: Any) -> dict[tuple[str, str], Scope | None]:
    """Each (method, path) of the app's schema and the scope its dependencies require."""
    found: dict[tuple[str, str], Scope | None] = {}
    for route in _routes(app.routes):
        if getattr(route, "dependant", None) is None or not route.include_in_schema:
            continue
        scope = None
        pending = list(route.dependant.dependencies)
        while pending:
            dependency = pending.pop()
            scope = getattr(dependency.call, "scope", None) or scope
            pending.extend(dependency.dependencies)
        for method in route.methods:
            found[(method, route.path)] = scope
    documented = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items() for method in operations
    }
    assert set(found) == documented, "the walk and the OpenAPI schema list different routes"
    return found


def concrete(path: str) -> str:
    path = path.replace("{type}", "Patient").replace("{resource_type}", "Patient")
    return re.sub(r"\{[^}]+\}", "1", path)


def call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> Any:
    kwargs: dict[str, Any] = {"headers": headers}
    if method in {"POST", "PUT", "PATCH"}:
        kwargs["json"] = {}
    return client.request(method, concrete(path), **kwargs)


def test_routes_need_credentials(
    sqlite_engine: Engine, api_config: Configuration
) -> None:
    app = create_app(sqlite_engine, api_config)
    routes = route_scopes(app)
    assert len(routes) > len(PUBLIC), "the app serves only public routes"
    client = TestClient(app)
    for (method, path), scope in sorted(routes.items()):
        if (method, path) in PUBLIC:
            assert scope is None, f"{method} {path} is public but requires {scope}"
            continue
        assert scope is not None, f"{method} {path} declares no scope"
        answer = call(client, method, path, {})
        assert answer.status_code == 401, f"{method} {path} answered {answer.status_code}"
        assert answer.headers["www-authenticate"].startswith("Bearer")
        if path.startswith("/fhir"):
            assert answer.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("role", list(Role), ids=[role.value for role in Role])
def test_role_matrix(role: Role, sqlite_engine: Engine, api_config: Configuration) -> None:
    app = create_app(sqlite_engine, api_config)
    create_client(sqlite_engine, f"client-{role.value}", frozenset({role}))
    key = create_api_key(sqlite_engine, f"client-{role.value}")
    client = TestClient(app)
    checked = 0
    for (method, path), scope in sorted(route_scopes(app).items()):
        if scope is None:
            continue
        answer = call(client, method, path, {"X-API-Key": key})
        if scope in ROLE_SCOPES[role]:
            assert answer.status_code not in (401, 403), (
                f"{role.value} holds {scope.value} but {method} {path} "
                f"answered {answer.status_code}"
            )
        else:
            assert answer.status_code == 403, (
                f"{role.value} lacks {scope.value} but {method} {path} "
                f"answered {answer.status_code}"
            )
            assert scope.value in answer.text
        checked += 1
    assert checked > 0


def test_least_privilege_of_the_roles() -> None:
    """Check the role boundaries a hospital's security review checks first."""
    assert ROLE_SCOPES[Role.AUDITOR] == {
        scope for scope in ROLE_SCOPES[Role.AUDITOR] if scope.value.endswith(":read")
    }
    assert Scope.AUDIT_READ not in ROLE_SCOPES[Role.REVENUE_CYCLE]
    assert Scope.MESSAGES_READ not in ROLE_SCOPES[Role.SUPPLY_CHAIN]
    assert Scope.WORK_ITEMS_APPROVE not in ROLE_SCOPES[Role.REVENUE_CYCLE]
    assert Scope.WORK_ITEMS_APPROVE in ROLE_SCOPES[Role.FINANCE]
    assert ROLE_SCOPES[Role.INTERFACE] == {Scope.FHIR_READ, Scope.FHIR_WRITE}
    assert all(Scope.ADMIN not in scopes for role, scopes in ROLE_SCOPES.items()
               if role is not Role.ADMIN)


def token_for(client: TestClient, client_id: str, secret: str) -> str:
    answer = client.post("/oauth/token", data={
        "grant_type": "client_credentials", "client_id": client_id, "client_secret": secret,
    })
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    return body["access_token"]


def test_client_credentials_token_grants_the_roles_scopes(
    sqlite_engine: Engine, api_config: Configuration
) -> None:
    client = TestClient(create_app(sqlite_engine, api_config))
    made = create_client(sqlite_engine, "auditor-1", frozenset({Role.AUDITOR}))
    token = token_for(client, "auditor-1", made.client_secret)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims["scope"].split()) == {scope.value for scope in ROLE_SCOPES[Role.AUDITOR]}
    assert jwt.get_unverified_header(token)["kid"] == "k1"
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/audit/verify", headers=bearer).status_code == 200

    wrong = client.post("/oauth/token", data={
        "grant_type": "client_credentials", "client_id": "auditor-1", "client_secret": "x",
    })
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"
    assert client.post("/oauth/token", data={
        "grant_type": "password", "client_id": "auditor-1", "client_secret": "x",
    }).status_code == 422


def test_expired_forged_and_rotated_tokens(
    sqlite_engine: Engine, api_config: Configuration, tmp_path: Path
) -> None:
    made = create_client(sqlite_engine, "fin", frozenset({Role.FINANCE}))
    old_app = TestClient(create_app(sqlite_engine, api_config))
    old_token = token_for(old_app, "fin", made.client_secret)

    # Rotation: k2 signs new tokens, k1 still checks the old ones.
    new_key = tmp_path / "k2.key"
    new_key.write_text("a-second-signing-secret-with-more-than-32-bytes-xyz")
    rotated = with_api(api_config, signing_keys=(
        SigningKey("k2", "HS256", secret_file=new_key), *api_config.api.signing_keys,
    ))
    client = TestClient(create_app(sqlite_engine, rotated))
    new_token = token_for(client, "fin", made.client_secret)
    assert jwt.get_unverified_header(new_token)["kid"] == "k2"
    for token in (old_token, new_token):
        answer = client.get("/api/v1/deliveries", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text

    # Retired: once k1 is removed its tokens stop working.
    retired = with_api(api_config, signing_keys=(SigningKey("k2", "HS256", secret_file=new_key),))
    client = TestClient(create_app(sqlite_engine, retired))
    answer = client.get("/api/v1/deliveries", headers={"Authorization": f"Bearer {old_token}"})
    assert answer.status_code == 401
    assert "unknown key" in answer.json()["detail"]

    now = int(time.time())
    claims = {"iss": "carebridge", "aud": "carebridge-api", "sub": "fin", "iat": now - 100,
              "exp": now - 10, "scope": "deliveries:read", "roles": ["finance"]}
    expired = jwt.encode(claims, SIGNING_SECRET, algorithm="HS256", headers={"kid": "k1"})
    client = TestClient(create_app(sqlite_engine, api_config))
    answer = client.get("/api/v1/deliveries", headers={"Authorization": f"Bearer {expired}"})
    assert answer.status_code == 401
    assert "expired" in answer.json()["detail"]

    claims["exp"] = now + 600
    claims["scope"] = "admin"
    forged = jwt.encode(claims, "not-the-key-" * 4, algorithm="HS256", headers={"kid": "k1"})
    answer = client.get("/api/v1/deliveries", headers={"Authorization": f"Bearer {forged}"})
    assert answer.status_code == 401


def test_revoked_api_key_is_refused(sqlite_engine: Engine, api_config: Configuration) -> None:
    create_client(sqlite_engine, "ehr", frozenset({Role.INTEGRATION_ANALYST}))
    key = create_api_key(sqlite_engine, "ehr")
    assert revoke_api_key(sqlite_engine, key.split("_")[1])
    client = TestClient(create_app(sqlite_engine, api_config))
    answer = client.get("/api/v1/deliveries", headers={"X-API-Key": key})
    assert answer.status_code == 401
    garbled = client.get("/api/v1/deliveries", headers={"X-API-Key": key[:-3] + "abc"})
    assert garbled.status_code == 401


def test_rate_limit_and_body_limit(sqlite_engine: Engine, api_config: Configuration) -> None:
    limited = with_api(api_config, rate_limit_per_minute=5, max_request_bytes=2048)
    create_client(sqlite_engine, "busy", frozenset({Role.ADMIN}))
    key = create_api_key(sqlite_engine, "busy")
    client = TestClient(create_app(sqlite_engine, limited))
    codes = [client.get("/api/v1/deliveries", headers={"X-API-Key": key}).status_code
             for _ in range(7)]
    assert codes[:5] == [200] * 5
    assert codes[5:] == [429, 429]

    big = b"{" + b" " * 4096 + b"}"
    answer = client.post("/fhir/Patient", content=big, headers={
        "X-API-Key": key, "Content-Type": "application/fhir+json"})
    assert answer.status_code == 413
    assert answer.json()["resourceType"] == "OperationOutcome"


def test_cors_is_closed_by_default(sqlite_engine: Engine, api_config: Configuration) -> None:
    client = TestClient(create_app(sqlite_engine, api_config))
    answer = client.options("/api/v1/deliveries", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in answer.headers
    opened = with_api(api_config, cors_origins=("https://portal.example",))
    client = TestClient(create_app(sqlite_engine, opened))
    answer = client.options("/api/v1/deliveries", headers={
        "Origin": "https://portal.example", "Access-Control-Request-Method": "GET"})
    assert answer.headers["access-control-allow-origin"] == "https://portal.example"


def test_token_issue_is_audited_and_the_chain_verifies(
    engine: Engine, config: Configuration, api_config: Configuration
) -> None:
    client = TestClient(create_app(engine, api_config))
    made = create_client(engine, "rc", frozenset({Role.REVENUE_CYCLE}))
    token_for(client, "rc", made.client_secret)
    with engine.connect() as conn:
        rows = conn.execute(audit_events.select()).mappings().all()
    assert [(row["actor"], row["action"], row["object_id"]) for row in rows] == [
        ("client:rc", "token.issue", "rc")]
    assert audit.verify(engine).ok


def test_concurrent_appends_keep_one_chain(engine: Engine) -> None:
    def append(worker: int) -> None:
        for n in range(15):
            with engine.begin() as conn:
                audit.record(conn, f"client:w{worker}", "test.append", "thing", n)

    threads = [threading.Thread(target=append, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    check = audit.verify(engine)
    assert check.ok, check.problem
    assert check.rows == 90


def test_tampering_with_one_row_is_found_and_named(engine: Engine, db_url: str) -> None:
    with engine.begin() as conn:
        for n in range(5):
            audit.record(conn, "client:a", "work_item.resolve", "work_item", n, {"n": n})
    with engine.begin() as conn:
        conn.execute(update(audit_events).where(audit_events.c.id == 3)
                     .values(actor="client:someone-else"))
    check = audit.verify(engine)
    assert (check.ok, check.broken_id) == (False, 3)

    result = subprocess.run(
        [sys.executable, "-m", "carebridge", "audit", "verify", "--db", db_url],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "row 3" in result.stderr

    # A deleted row breaks the chain at the row that followed it.
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE id = 2"))
    assert audit.verify(engine).broken_id == 2
