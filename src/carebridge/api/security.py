"""Roles, scopes, client credentials, API keys and bearer tokens.

A client (a person's tool or a system) has roles; each role grants scopes;
each route requires one scope. A client proves who it is with either

- a bearer token: a JWT signed with a configured key (``kid`` in its
  header), obtained from ``POST /oauth/token`` with the client's id and
  secret (OAuth2 client credentials), carrying the client's scopes; or
- an API key (``X-API-Key: cbk_<key id>_<secret>``) for system
  integrations that cannot fetch tokens.

Secrets and keys are stored only as salted scrypt hashes.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import jwt
from sqlalchemy import Engine, select, update

from carebridge.config.model import ApiSettings, SigningKey
from carebridge.errors import ConfigurationError
from carebridge.store.schema import api_clients, api_keys

logger = logging.getLogger(__name__)

ISSUER = "carebridge"
AUDIENCE = "carebridge-api"


class Scope(StrEnum):
    """A permission that a route requires. Read scopes never allow a change."""

    FHIR_READ = "fhir:read"
    FHIR_WRITE = "fhir:write"
    MESSAGES_READ = "messages:read"
    MESSAGES_REPLAY = "messages:replay"
    WORK_ITEMS_READ = "workitems:read"
    WORK_ITEMS_WRITE = "workitems:write"
    WORK_ITEMS_APPROVE = "workitems:approve"
    DELIVERIES_READ = "deliveries:read"
    DELIVERIES_WRITE = "deliveries:write"
    MASTER_DATA_READ = "masterdata:read"
    AUDIT_READ = "audit:read"
    METRICS_READ = "metrics:read"
    ADMIN = "admin"


class Role(StrEnum):
    """The roles a client can hold."""

    INTEGRATION_ANALYST = "integration-analyst"
    REVENUE_CYCLE = "revenue-cycle"
    SUPPLY_CHAIN = "supply-chain"
    FINANCE = "finance"
    AUDITOR = "auditor"
    ADMIN = "admin"
    INTERFACE = "interface"


ROLE_SCOPES: dict[Role, frozenset[Scope]] = {
    # Keeps interfaces running: messages, replays, deliveries, FHIR traffic.
    Role.INTEGRATION_ANALYST: frozenset({
        Scope.FHIR_READ, Scope.FHIR_WRITE, Scope.MESSAGES_READ, Scope.MESSAGES_REPLAY,
        Scope.WORK_ITEMS_READ, Scope.WORK_ITEMS_WRITE, Scope.DELIVERIES_READ,
        Scope.DELIVERIES_WRITE, Scope.MASTER_DATA_READ, Scope.METRICS_READ,
    }),
    # Works charge exceptions; reads the clinical data behind them.
    Role.REVENUE_CYCLE: frozenset({
        Scope.FHIR_READ, Scope.MESSAGES_READ, Scope.WORK_ITEMS_READ,
        Scope.WORK_ITEMS_WRITE, Scope.MASTER_DATA_READ,
    }),
    # Works supply exceptions and decides the supply-chain steps of purchase
    # approvals, with no access to patient messages.
    Role.SUPPLY_CHAIN: frozenset({
        Scope.WORK_ITEMS_READ, Scope.WORK_ITEMS_WRITE, Scope.WORK_ITEMS_APPROVE,
        Scope.MASTER_DATA_READ,
    }),
    # Approves what crosses a threshold; watches what reached the ledger.
    Role.FINANCE: frozenset({
        Scope.WORK_ITEMS_READ, Scope.WORK_ITEMS_APPROVE, Scope.DELIVERIES_READ,
        Scope.MASTER_DATA_READ,
    }),
    # Reads everything needed to trace a posting; changes nothing.
    Role.AUDITOR: frozenset({
        Scope.AUDIT_READ, Scope.MESSAGES_READ, Scope.WORK_ITEMS_READ,
        Scope.DELIVERIES_READ, Scope.MASTER_DATA_READ, Scope.FHIR_READ, Scope.METRICS_READ,
    }),
    Role.ADMIN: frozenset(Scope),
    # A system that sends FHIR resources and nothing else.
    Role.INTERFACE: frozenset({Scope.FHIR_READ, Scope.FHIR_WRITE}),
}

ROLE_TEAMS: dict[Role, frozenset[str] | None] = {
    Role.INTEGRATION_ANALYST: None,
    Role.REVENUE_CYCLE: frozenset({"revenue_cycle"}),
    Role.SUPPLY_CHAIN: frozenset({"supply_chain"}),
    Role.FINANCE: None,
    Role.AUDITOR: None,
    Role.ADMIN: None,
    Role.INTERFACE: frozenset(),
}
"""Work-item teams each role may see and act on; ``None`` means every team."""

STEP_DECIDERS: dict[str, frozenset[Role]] = {
    "supply_chain": frozenset({Role.SUPPLY_CHAIN}),
    "finance": frozenset({Role.FINANCE}),
    "revenue_cycle": frozenset({Role.REVENUE_CYCLE}),
    "integration": frozenset({Role.INTEGRATION_ANALYST}),
}
"""The roles that decide a purchase-approval step of each team, besides admin.
A finance controller can read every queue but decides only finance's steps."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of a request."""

    client_id: str
    roles: frozenset[Role]
    scopes: frozenset[Scope]
    via: str  # "token" or "api-key"

    @property
    def actor(self) -> str:
        """The name the audit log records."""
        return f"client:{self.client_id}"

    def teams(self) -> frozenset[str] | None:
        """Teams whose work items this caller may see; ``None`` for all."""
        allowed: set[str] = set()
        for role in self.roles:
            teams = ROLE_TEAMS[role]
            if teams is None:
                return None
            allowed |= teams
        return frozenset(allowed)


class AuthenticationError(Exception):
    """Credentials are missing, malformed, expired or unknown."""


def scopes_for(roles: frozenset[Role]) -> frozenset[Scope]:
    granted: set[Scope] = set()
    for role in roles:
        granted |= ROLE_SCOPES[role]
    return frozenset(granted)


def parse_roles(value: str) -> frozenset[Role]:
    """Read a comma-separated role list; raise ``ValueError`` naming an unknown role."""
    roles = set()
    for name in filter(None, (part.strip() for part in value.split(","))):
        try:
            roles.add(Role(name))
        except ValueError:
            known = ", ".join(role.value for role in Role)
            raise ValueError(f"unknown role {name!r}; known roles: {known}") from None
    if not roles:
        raise ValueError("give at least one role")
    return frozenset(roles)


# -- hashing -----------------------------------------------------------------

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_secret(secret: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt$" + base64.b64encode(salt).decode() + "$" + base64.b64encode(digest).decode()


def check_secret(secret: str, stored: str) -> bool:
    try:
        scheme, salt_b64, digest_b64 = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(
        secret.encode(), salt=base64.b64decode(salt_b64), dklen=32, **_SCRYPT
    )
    return hmac.compare_digest(digest, base64.b64decode(digest_b64))


# -- clients and keys ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewClient:
    client_id: str
    client_secret: str
    roles: frozenset[Role]


def create_client(engine: Engine, client_id: str, roles: frozenset[Role]) -> NewClient:
    """Register a client and return its secret, which is shown only this once."""
    secret = secrets.token_urlsafe(32)
    with engine.begin() as conn:
        conn.execute(api_clients.insert().values(
            client_id=client_id,
            roles=",".join(sorted(role.value for role in roles)),
            secret_hash=hash_secret(secret),
            created_at=dt.datetime.now(dt.UTC),
        ))
    logger.info("API client %s created with roles %s", client_id,
                ",".join(sorted(roles)))
    return NewClient(client_id, secret, roles)


def create_api_key(engine: Engine, client_id: str) -> str:
    """Issue an API key for an existing client; the key is shown only this once."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    with engine.begin() as conn:
        known = conn.execute(
            select(api_clients.c.id).where(api_clients.c.client_id == client_id)
        ).first()
        if known is None:
            raise LookupError(f"no API client {client_id!r}; create it first")
        conn.execute(api_keys.insert().values(
            client_id=client_id, key_id=key_id, key_hash=hash_secret(secret),
            created_at=dt.datetime.now(dt.UTC),
        ))
    logger.info("API key %s issued to client %s", key_id, client_id)
    return f"cbk_{key_id}_{secret}"


def revoke_api_key(engine: Engine, key_id: str) -> bool:
    with engine.begin() as conn:
        done = conn.execute(
            update(api_keys)
            .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=dt.datetime.now(dt.UTC))
        ).rowcount
    if done:
        logger.info("API key %s revoked", key_id)
    return bool(done)


def _client_roles(engine: Engine, client_id: str) -> tuple[frozenset[Role], str] | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(api_clients.c.roles, api_clients.c.secret_hash)
            .where(api_clients.c.client_id == client_id, api_clients.c.disabled_at.is_(None))
        ).first()
    if row is None:
        return None
    return parse_roles(row.roles), row.secret_hash


class CredentialCache:
    """Remembers verified credentials for a minute; scrypt costs tens of milliseconds.

    Only a digest of the presented credential is kept, never the credential.
    A revoked key or disabled client stops working within ``ttl`` seconds.
    """

    def __init__(self, ttl: float = 60.0) -> None:
        self._ttl = ttl
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, credential: str) -> Principal | None:
        key = hashlib.sha256(credential.encode()).hexdigest()
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, credential: str, principal: Principal) -> None:
        if len(self._entries) > 10_000:
            self._entries.clear()
        key = hashlib.sha256(credential.encode()).hexdigest()
        self._entries[key] = (time.monotonic() + self._ttl, principal)


def authenticate_client(engine: Engine, client_id: str, client_secret: str) -> Principal:
    found = _client_roles(engine, client_id)
    if found is None or not check_secret(client_secret, found[1]):
        raise AuthenticationError("unknown client or wrong secret")
    roles = found[0]
    return Principal(client_id, roles, scopes_for(roles), "token")


def authenticate_api_key(engine: Engine, key: str) -> Principal:
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "cbk":
        raise AuthenticationError("malformed API key; expected cbk_<id>_<secret>")
    _, key_id, secret = parts
    with engine.connect() as conn:
        row = conn.execute(
            select(api_keys.c.key_hash, api_clients.c.client_id, api_clients.c.roles)
            .join(api_clients, api_clients.c.client_id == api_keys.c.client_id)
            .where(
                api_keys.c.key_id == key_id,
                api_keys.c.revoked_at.is_(None),
                api_clients.c.disabled_at.is_(None),
            )
        ).first()
    if row is None or not check_secret(secret, row.key_hash):
        raise AuthenticationError("unknown or revoked API key")
    roles = parse_roles(row.roles)
    return Principal(row.client_id, roles, scopes_for(roles), "api-key")


# -- bearer tokens ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedKey:
    kid: str
    algorithm: str
    signing: Any | None  # secret bytes or PEM private key; None when check-only
    checking: Any


def _read(path: Path, kid: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"api.signing_keys {kid}: cannot read {path}: {exc.strerror}"
        ) from None


def load_keys(settings: ApiSettings) -> tuple[LoadedKey, ...]:
    """Read the configured signing keys; raise ``ConfigurationError`` naming a bad one."""
    loaded = []
    for key in settings.signing_keys:
        if key.secret_env is not None and not os.environ.get(key.secret_env):
            # Not fatal: MLLP, files and API keys work without it, and
            # POST /oauth/token names the variable when asked for a token.
            logger.warning("API signing key %s skipped: environment variable %s is not set",
                           key.kid, key.secret_env)
            continue
        loaded.append(_load_key(key))
    return tuple(loaded)


def _load_key(key: SigningKey) -> LoadedKey:
    if key.algorithm == "HS256":
        if key.secret_env is not None:
            secret = os.environ[key.secret_env].encode()
        else:
            assert key.secret_file is not None
            secret = _read(key.secret_file, key.kid).strip()
        if len(secret) < 32:
            raise ConfigurationError(
                f"api.signing_keys {key.kid}: the HS256 secret has {len(secret)} bytes; "
                "use at least 32 (`carebridge api new-signing-key` makes one)"
            )
        return LoadedKey(key.kid, "HS256", secret, secret)
    from cryptography.hazmat.primitives import serialization

    private = None
    if key.private_key_file is not None:
        private = serialization.load_pem_private_key(
            _read(key.private_key_file, key.kid), password=None
        )
        public = private.public_key()
    else:
        assert key.public_key_file is not None
        public = serialization.load_pem_public_key(_read(key.public_key_file, key.kid))
    return LoadedKey(key.kid, "RS256", private, public)


class TokenService:
    """Issues and checks bearer tokens with the configured keys."""

    def __init__(self, keys: tuple[LoadedKey, ...], ttl_seconds: int) -> None:
        self._keys = {key.kid: key for key in keys}
        self._signer = next((key for key in keys if key.signing is not None), None)
        self.ttl_seconds = ttl_seconds

    @property
    def can_issue(self) -> bool:
        return self._signer is not None

    def issue(self, principal: Principal) -> str:
        if self._signer is None:
            raise AuthenticationError("no signing key is configured (api.signing_keys)")
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": principal.client_id,
            "iat": now,
            "exp": now + self.ttl_seconds,
            "jti": secrets.token_hex(8),
            "scope": " ".join(sorted(principal.scopes)),
            "roles": sorted(principal.roles),
        }
        return jwt.encode(
            claims, self._signer.signing, algorithm=self._signer.algorithm,
            headers={"kid": self._signer.kid},
        )

    def check(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("malformed bearer token") from None
        key = self._keys.get(str(header.get("kid")))
        if key is None:
            raise AuthenticationError("bearer token signed with an unknown key")
        try:
            claims = jwt.decode(
                token, key.checking, algorithms=[key.algorithm],
                audience=AUDIENCE, issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "scope"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("bearer token expired; request a new one") from None
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"invalid bearer token: {exc}") from None
        try:
            roles = frozenset(Role(name) for name in claims.get("roles", []))
            scopes = frozenset(Scope(name) for name in claims["scope"].split())
        except ValueError:
            raise AuthenticationError("bearer token names an unknown role or scope") from None
        return Principal(str(claims["sub"]), roles, scopes, "token")


def new_signing_secret() -> str:
    """Return a new random HS256 secret (48 random bytes as URL-safe text)."""
    return secrets.token_urlsafe(48)
