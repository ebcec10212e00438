"""The FHIR interactions on one resource: create, update, read, vread and search.

Each runs in its own database transaction and writes its audit row there:
``fhir.create`` and ``fhir.update`` for changes, ``fhir.read``,
``fhir.vread`` and ``fhir.search`` for reads of patient data. Logs carry
resource ids, message ids and client ids, never resource content or search
values (an identifier is patient data).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine

from carebridge import audit
from carebridge.api.deps import ApiError
from carebridge.api.fhir.repository import (
    Criteria,
    StoredVersion,
    current,
    find_existing,
    search,
    version,
)
from carebridge.api.fhir.resources import new_id
from carebridge.api.fhir.writes import Write, commit, retrying
from carebridge.api.security import Principal

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Result:
    """A resource version as an interaction returns it, with its HTTP status."""

    status: int
    resource_type: str
    resource_id: str
    version_id: int
    last_updated: dt.datetime
    content: bytes

    @classmethod
    def of(cls, status: int, stored: StoredVersion) -> Result:
        return cls(status, stored.resource_type, stored.resource_id, stored.version_id,
                   stored.last_updated, stored.content.encode("utf-8"))


def _written(status: int, write: Write, moment: dt.datetime) -> Result:
    return Result(status, write.resource_type, write.resource_id, write.version_id,
                  moment, write.content)


def audit_read(conn: Connection, principal: Principal, stored: StoredVersion,
               action: str) -> None:
    audit.record(conn, principal.actor, action, stored.resource_type, stored.resource_id,
                 {"version": stored.version_id})


def create(engine: Engine, principal: Principal, resource_type: str,
           resource: dict[str, Any], criteria: Criteria | None,
           location: str = "If-None-Exist") -> Result:
    """Create a resource with a new id (``201``), or return the match of ``criteria`` (``200``).

    ``resource`` must already be validated. A conditional create that finds
    one match returns it and writes nothing; more than one match is a 412.
    """

    def work(conn: Connection) -> Result:
        if criteria is not None:
            existing = find_existing(conn, resource_type, criteria, location)
            if existing is not None:
                audit_read(conn, principal, existing, "fhir.read")
                return Result.of(200, existing)
        write = Write(resource_type, new_id(), 1, resource, criteria)
        committed = commit(conn, [write], principal, "create")
        return _written(201, write, committed.last_updated)

    result = retrying(engine, work)
    logger.info(
        "FHIR create %s",
        "stored" if result.status == 201 else "matched an existing resource",
        extra={"action": "fhir_create", "client_id": principal.client_id,
               "resource_type": resource_type, "resource_id": result.resource_id,
               "version_id": result.version_id},
    )
    return result


def update(engine: Engine, principal: Principal, resource_type: str, resource_id: str,
           resource: dict[str, Any], if_match: int | None,
           location: str = "If-Match") -> Result:
    """Store a new version of a resource, or create it with the client's id.

    Returns ``201`` when the id was new and ``200`` otherwise.

    Raises:
        ApiError: 412 when ``if_match`` names a version other than the
            current one, or a resource that does not exist.
    """

    def work(conn: Connection) -> Result:
        stored = current(conn, resource_type, resource_id)
        if if_match is not None:
            if stored is None:
                raise ApiError(412, "conflict", f"If-Match names version {if_match} of "
                               f"{resource_type}/{resource_id}, which does not exist",
                               location=location)
            if stored.version_id != if_match:
                raise ApiError(412, "conflict", f"If-Match names version {if_match}, but "
                               f"the current version is {stored.version_id}; read the "
                               "resource again and apply the change to it",
                               location=location)
        next_version = stored.version_id + 1 if stored is not None else 1
        write = Write(resource_type, resource_id, next_version, resource)
        committed = commit(conn, [write], principal, "update")
        return _written(201 if write.created else 200, write, committed.last_updated)

    result = retrying(engine, work)
    logger.info(
        "FHIR update stored",
        extra={"action": "fhir_update", "client_id": principal.client_id,
               "resource_type": resource_type, "resource_id": resource_id,
               "version_id": result.version_id},
    )
    return result


def read(engine: Engine, principal: Principal, resource_type: str, resource_id: str,
         version_id: int | None = None) -> Result:
    """Return the current version, or ``version_id``; 404 when there is none."""
    with engine.begin() as conn:
        if version_id is None:
            stored = current(conn, resource_type, resource_id)
        else:
            stored = version(conn, resource_type, resource_id, version_id)
        if stored is None:
            what = f"{resource_type}/{resource_id}"
            if version_id is not None:
                what += f"/_history/{version_id}"
            raise ApiError(404, "not-found", f"{what} is not stored here")
        audit_read(conn, principal, stored, "fhir.read" if version_id is None else "fhir.vread")
    return Result.of(200, stored)


def find(engine: Engine, principal: Principal, resource_type: str,
         criteria: Criteria | None, limit: int) -> list[StoredVersion]:
    """Return up to ``limit`` current resources matching ``criteria`` (all if ``None``)."""
    with engine.begin() as conn:
        found = search(conn, resource_type, criteria, limit)
        audit.record(conn, principal.actor, "fhir.search", resource_type, None,
                     {"matches": [stored.resource_id for stored in found]})
    logger.info("FHIR search", extra={"action": "fhir_search", "client_id": principal.client_id,
                                      "resource_type": resource_type, "matches": len(found)})
    return found
