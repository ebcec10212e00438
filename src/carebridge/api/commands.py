"""Command-line administration of the API: clients, keys, tokens, the audit chain.

Registered on the main ``carebridge`` group as ``carebridge api ...`` and
``carebridge audit ...``. Every command that changes credentials writes an
audit row with the operating-system user as the actor.
"""

from __future__ import annotations

import getpass
import json
import logging
import sys

import click
from sqlalchemy.exc import IntegrityError

from carebridge import audit
from carebridge.api.security import (
    ROLE_SCOPES,
    Role,
    create_api_key,
    create_client,
    new_signing_secret,
    parse_roles,
    revoke_api_key,
)
from carebridge.store.db import open_engine

logger = logging.getLogger(__name__)

_DB_HELP = "SQLAlchemy URL of the database, e.g. sqlite:///carebridge.db."


def _operator() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in some containers
        return "cli:unknown"


@click.group("api")
def api_group() -> None:
    """Manage API clients, keys and signing keys."""


@api_group.command("roles")
def roles_command() -> None:
    """List the roles and the scopes each grants."""
    for role in Role:
        click.echo(f"{role.value}: {' '.join(sorted(ROLE_SCOPES[role]))}")


@api_group.command("new-client")
@click.argument("client_id")
@click.option("--role", "roles", multiple=True, required=True,
              help="A role to grant (repeat for several); `carebridge api roles` lists them.")
@click.option("--db", "db_url", required=True, help=_DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the credentials as JSON.")
def new_client(client_id: str, roles: tuple[str, ...], db_url: str, as_json: bool) -> None:
    """Create a client; its secret is printed once and cannot be shown again.

    Exchange the id and secret for a bearer token with
    POST /oauth/token (grant_type=client_credentials).
    """
    try:
        granted = parse_roles(",".join(roles))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--role") from None
    engine = open_engine(db_url)
    try:
        created = create_client(engine, client_id, granted)
    except IntegrityError:
        click.echo(f"error: client {client_id!r} already exists", err=True)
        sys.exit(1)
    with engine.begin() as conn:
        audit.record(conn, _operator(), "client.create", "client", client_id,
                     {"roles": sorted(granted)})
    if as_json:
        click.echo(json.dumps({"client_id": created.client_id,
                               "client_secret": created.client_secret,
                               "roles": sorted(created.roles)}))
    else:
        click.echo(f"client_id: {created.client_id}")
        click.echo(f"client_secret: {created.client_secret}")
        click.echo(f"roles: {', '.join(sorted(created.roles))}")


@api_group.command("new-key")
@click.argument("client_id")
@click.option("--db", "db_url", required=True, help=_DB_HELP)
def new_key(client_id: str, db_url: str) -> None:
    """Issue an API key (X-API-Key header) for a client; printed once."""
    engine = open_engine(db_url)
    try:
        key = create_api_key(engine, client_id)
    except LookupError as exc:
        click.echo(f"error: {exc.args[0]}", err=True)
        sys.exit(1)
    with engine.begin() as conn:
        audit.record(conn, _operator(), "api_key.create", "client", client_id,
                     {"key_id": key.split("_")[1]})
    click.echo(key)


@api_group.command("revoke-key")
@click.argument("key_id")
@click.option("--db", "db_url", required=True, help=_DB_HELP)
def revoke_key(key_id: str, db_url: str) -> None:
    """Revoke an API key by its id (the part after cbk_)."""
    engine = open_engine(db_url)
    if not revoke_api_key(engine, key_id):
        click.echo(f"error: no active API key {key_id!r}", err=True)
        sys.exit(1)
    with engine.begin() as conn:
        audit.record(conn, _operator(), "api_key.revoke", "api_key", key_id)
    click.echo(f"revoked {key_id}")


@api_group.command("new-signing-key")
def new_signing_key() -> None:
    """Print a fresh HS256 signing secret for api.signing_keys."""
    click.echo(new_signing_secret())


@click.group("audit")
def audit_group() -> None:
    """Check the audit log."""


@audit_group.command("verify")
@click.option("--db", "db_url", required=True, help=_DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def audit_verify(db_url: str, as_json: bool) -> None:
    """Recompute the audit chain; exit 1 naming the first row that breaks it."""
    result = audit.verify(open_engine(db_url))
    if as_json:
        click.echo(json.dumps({"ok": result.ok, "rows": result.rows,
                               "broken_id": result.broken_id, "problem": result.problem,
                               "last_hash": result.last_hash}))
    elif result.ok:
        click.echo(f"audit chain intact: {result.rows} rows, last hash {result.last_hash}")
    else:
        click.echo(f"error: audit chain broken at row {result.broken_id}: {result.problem}",
                   err=True)
    if not result.ok:
        sys.exit(1)
