"""Queries on the FHIR resource tables: versions, searches and conditional keys.

Every version of a resource is a row of ``fhir_resources``; the newest has
``is_current`` 1. Content is stored as compact JSON written by
:func:`carebridge.api.fhir.resources.dump_json`, so decimals keep the text
they were sent with and a search can pre-filter on the JSON text.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from sqlalchemy import Connection, insert, select, update

from carebridge.api.deps import ApiError
from carebridge.ingest.files.sources import bounded
from carebridge.store.schema import fhir_conditional_keys, fhir_resources

SEARCH_PARAMETERS = ("_id", "identifier")
"""Search parameters supported in searches, ``If-None-Exist`` and conditional
references."""


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One stored version of a resource."""

    resource_type: str
    resource_id: str
    version_id: int
    last_updated: dt.datetime
    content: str
    message_id: int | None


def _version(row: Any) -> StoredVersion:
    updated = row.last_updated
    if updated.tzinfo is None:  # SQLite returns naive UTC datetimes
        updated = updated.replace(tzinfo=dt.UTC)
    return StoredVersion(row.resource_type, row.resource_id, row.version_id, updated,
                         row.content, row.message_id)


_COLUMNS = (
    fhir_resources.c.resource_type, fhir_resources.c.resource_id,
    fhir_resources.c.version_id, fhir_resources.c.last_updated,
    fhir_resources.c.content, fhir_resources.c.message_id,
)


def current(conn: Connection, resource_type: str, resource_id: str) -> StoredVersion | None:
    """Return the newest version of a resource, or ``None`` if it was never stored."""
    row = conn.execute(
        select(*_COLUMNS).where(
            fhir_resources.c.resource_type == resource_type,
            fhir_resources.c.resource_id == resource_id,
            fhir_resources.c.is_current == 1,
        )
    ).first()
    return _version(row) if row is not None else None


def version(conn: Connection, resource_type: str, resource_id: str,
            version_id: int) -> StoredVersion | None:
    row = conn.execute(
        select(*_COLUMNS).where(
            fhir_resources.c.resource_type == resource_type,
            fhir_resources.c.resource_id == resource_id,
            fhir_resources.c.version_id == version_id,
        )
    ).first()
    return _version(row) if row is not None else None


def existing_ids(conn: Connection, resource_type: str, ids: Sequence[str]) -> set[str]:
    """Return which of ``ids`` name a stored resource of ``resource_type``."""
    found: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = list(ids[start : start + 500])
        found.update(conn.execute(
            select(fhir_resources.c.resource_id).where(
                fhir_resources.c.resource_type == resource_type,
                fhir_resources.c.resource_id.in_(chunk),
                fhir_resources.c.is_current == 1,
            )
        ).scalars())
    return found


def insert_versions(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert new versions and mark the versions they replace as not current.

    Each row has the ``fhir_resources`` columns. The primary key (type, id,
    version) makes a concurrent write of the same version fail with an
    ``IntegrityError``, which the caller retries.
    """
    for row in rows:
        if row["version_id"] > 1:
            conn.execute(
                update(fhir_resources)
                .where(
                    fhir_resources.c.resource_type == row["resource_type"],
                    fhir_resources.c.resource_id == row["resource_id"],
                    fhir_resources.c.is_current == 1,
                )
                .values(is_current=0)
            )
    conn.execute(insert(fhir_resources), rows)


# -- search ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Criteria:
    """Search criteria in normal form: supported parameters only, sorted."""

    pairs: tuple[tuple[str, str], ...]

    @property
    def text(self) -> str:
        """The criteria as one canonical query string."""
        return urlencode(self.pairs, quote_via=quote, safe="|:/")

    @property
    def key(self) -> str:
        """The conditional-create key: the text, or its hash past the column's 500 characters."""
        return bounded(self.text, 500) or ""


def parse_criteria(query: str, resource_type: str, location: str) -> Criteria:
    """Normalise a search query such as ``identifier=http://x|123`` or ``Patient?_id=a``.

    Parameters are sorted and re-encoded, so ``_id=a&identifier=b`` and
    ``identifier=b&_id=a`` give the same key.

    Raises:
        ApiError: 400 for an empty query, an unsupported parameter, or a
            type prefix other than ``resource_type``.
    """
    text = query.strip()
    if "?" in text:
        prefix, text = text.split("?", 1)
        if prefix and prefix.rstrip("/").rsplit("/", 1)[-1] != resource_type:
            raise ApiError(400, "invalid", f"criteria name {prefix!r}, not {resource_type}",
                           location=location)
    pairs = parse_qsl(text, keep_blank_values=True)
    if not pairs:
        raise ApiError(400, "invalid", "search criteria are empty", location=location)
    for name, value in pairs:
        if name not in SEARCH_PARAMETERS:
            raise ApiError(400, "not-supported", f"unsupported search parameter {name!r}; "
                           f"supported: {', '.join(SEARCH_PARAMETERS)}", location=location)
        if not value:
            raise ApiError(400, "invalid", f"search parameter {name} has no value",
                           location=location)
    return Criteria(tuple(sorted(pairs)))


def _identifier_matches(resource: dict[str, Any], token: str) -> bool:
    # FHIR token search: "system|value", "|value" (no system) or "value" (any system).
    if "|" in token:
        system, value = token.split("|", 1)
    else:
        system, value = None, token
    for identifier in resource.get("identifier") or []:
        if not isinstance(identifier, dict) or identifier.get("value") != value:
            continue
        if system is None or (identifier.get("system") or "") == system:
            return True
    return False


def _like_literal(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search(conn: Connection, resource_type: str, criteria: Criteria | None,
           limit: int) -> list[StoredVersion]:
    """Return the current resources of ``resource_type`` that match every criterion.

    ``identifier`` is pre-filtered with ``LIKE`` on the stored JSON text of
    its value and then checked on the parsed resource.
    """
    query = select(*_COLUMNS).where(
        fhir_resources.c.resource_type == resource_type,
        fhir_resources.c.is_current == 1,
    )
    tokens: list[str] = []
    for name, value in criteria.pairs if criteria else ():
        if name == "_id":
            query = query.where(fhir_resources.c.resource_id == value)
        else:
            tokens.append(value)
            literal = json.dumps(value.split("|", 1)[-1], ensure_ascii=False)
            query = query.where(fhir_resources.c.content.like(
                f'%"value":{_like_literal(literal)}%', escape="\\"))
    found: list[StoredVersion] = []
    for row in conn.execute(query.order_by(fhir_resources.c.resource_id)):
        stored = _version(row)
        if tokens:
            resource = json.loads(stored.content)
            if not all(_identifier_matches(resource, token) for token in tokens):
                continue
        found.append(stored)
        if len(found) >= limit:
            break
    return found


# -- conditional create -----------------------------------------------------------


def conditional_owner(conn: Connection, resource_type: str, criteria: Criteria) -> str | None:
    """Return the id of the resource an earlier conditional create made for ``criteria``."""
    return conn.execute(
        select(fhir_conditional_keys.c.resource_id).where(
            fhir_conditional_keys.c.resource_type == resource_type,
            fhir_conditional_keys.c.criteria == criteria.key,
        )
    ).scalar()


def claim_criteria(conn: Connection, claims: Iterable[tuple[str, Criteria, str]]) -> None:
    """Record ``(type, criteria, id)`` conditional creates.

    Of two concurrent identical conditional creates, the second insert
    fails with an ``IntegrityError`` (on PostgreSQL, once the first commits),
    and its retry finds the first one's resource.
    """
    rows = [
        {"resource_type": resource_type, "criteria": criteria.key,
         "resource_id": resource_id}
        for resource_type, criteria, resource_id in claims
    ]
    if rows:
        conn.execute(insert(fhir_conditional_keys), rows)


def find_existing(conn: Connection, resource_type: str, criteria: Criteria,
                  location: str) -> StoredVersion | None:
    """Return the resource ``If-None-Exist`` criteria match, or ``None`` if none does.

    Raises:
        ApiError: 412 when more than one resource matches.
    """
    owner = conditional_owner(conn, resource_type, criteria)
    if owner is not None:
        return current(conn, resource_type, owner)
    matches = search(conn, resource_type, criteria, limit=2)
    if len(matches) > 1:
        raise ApiError(412, "multiple-matches", "the criteria match more than one "
                       f"{resource_type}; make them more selective", location=location)
    return matches[0] if matches else None
