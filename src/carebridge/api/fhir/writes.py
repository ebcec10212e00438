"""Commit created and updated resources together with their message and audit rows.

A write is durable when its response is sent: the resource versions, the
message the worker maps to canonical records, the conditional-create keys
and the audit rows commit in one database transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError

from carebridge import audit
from carebridge.api.deps import ApiError
from carebridge.api.fhir.repository import Criteria, claim_criteria, insert_versions
from carebridge.api.fhir.resources import dump_json, instant, new_id
from carebridge.api.security import Principal
from carebridge.engine.intake import Receipt, store_batch
from carebridge.ingest.files.sources import RawInput, sha256
from carebridge.ingest.registry import FHIR_VALIDATED_FORMAT

logger = logging.getLogger(__name__)

SOURCE = "fhir-api"
"""The ``source`` of every message stored by the FHIR API."""

_ATTEMPTS = 5

T = TypeVar("T")


@dataclass(slots=True)
class Write:
    """One resource version to store.

    ``criteria`` is set for a conditional create; ``full_url`` is the
    Bundle entry's ``fullUrl`` for an entry of a transaction.
    """

    resource_type: str
    resource_id: str
    version_id: int
    resource: dict[str, Any]
    criteria: Criteria | None = None
    full_url: str | None = None
    content: bytes = b""

    @property
    def created(self) -> bool:
        return self.version_id == 1


@dataclass(frozen=True, slots=True)
class Committed:
    """The message id and the ``lastUpdated`` time of a committed write."""

    message_id: int
    last_updated: dt.datetime


def retrying(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Run ``work`` in a transaction, again from the start after an ``IntegrityError``.

    Concurrent writes of the same resource version, id or conditional key
    collide on a primary key. The retry runs in a new transaction that reads
    the other write, so it returns what the two would give in sequence.
    """
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            with engine.begin() as conn:
                return work(conn)
        except IntegrityError:
            logger.info("FHIR write collided with a concurrent one; retrying",
                        extra={"action": "fhir_write_retry", "attempt": attempt})
    raise ApiError(409, "conflict", "the resource was changed by concurrent requests "
                   f"{_ATTEMPTS} times in a row; send the request again")


def _with_meta(write: Write, moment: dt.datetime) -> dict[str, Any]:
    resource = write.resource
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = str(write.version_id)
    meta["lastUpdated"] = instant(moment)
    stored: dict[str, Any] = {"resourceType": write.resource_type, "id": write.resource_id,
                              "meta": meta}
    for name, value in resource.items():
        if name not in stored:
            stored[name] = value
    return stored


def ordering_key(writes: list[Write]) -> str | None:
    """Return the id of the patient the writes are about, for in-order processing."""
    for write in writes:
        if write.resource_type == "Patient":
            return write.resource_id
    for write in writes:
        for element in ("subject", "patient"):
            reference = write.resource.get(element)
            if isinstance(reference, dict):
                text = reference.get("reference")
                if isinstance(text, str) and text.startswith("Patient/"):
                    return text.removeprefix("Patient/")
    return None


def commit(conn: Connection, writes: list[Write], principal: Principal,
           action: str) -> Committed:
    """Store ``writes`` as new resource versions and one message, in the open transaction.

    Sets each write's ``id``, ``meta.versionId`` and ``meta.lastUpdated`` and
    its serialised ``content``. One resource is stored as its own message;
    several (a transaction) as one ``collection`` Bundle, so the worker maps
    them together.
    """
    moment = dt.datetime.now(dt.UTC)
    for write in writes:
        write.resource = _with_meta(write, moment)
        write.content = dump_json(write.resource)
    bundle_id = new_id()
    if len(writes) == 1:
        body = writes[0].content
        dedup = f"{SOURCE}|{writes[0].resource_type}/{writes[0].resource_id}" \
                f"/_history/{writes[0].version_id}"
    else:
        body = (b'{"resourceType":"Bundle","id":"' + bundle_id.encode()
                + b'","type":"collection","entry":['
                + b",".join(b'{"resource":' + write.content + b"}" for write in writes)
                + b"]}")
        dedup = f"{SOURCE}|Bundle/{bundle_id}"
    digest = sha256(body)
    receipt: Receipt = store_batch(conn, [RawInput(
        format=FHIR_VALIDATED_FORMAT, origin=f"{SOURCE}:{principal.client_id}", raw=body,
        content_sha256=digest, dedup_key=dedup, ordering_key=ordering_key(writes),
    )], source=SOURCE)[0]
    insert_versions(conn, [
        {"resource_type": write.resource_type, "resource_id": write.resource_id,
         "version_id": write.version_id, "last_updated": moment,
         "content": write.content.decode("utf-8"), "message_id": receipt.message_id,
         "is_current": 1}
        for write in writes
    ])
    claim_criteria(conn, [
        (write.resource_type, write.criteria, write.resource_id)
        for write in writes if write.criteria is not None
    ])
    if len(writes) == 1:
        write = writes[0]
        audit.record(
            conn, principal.actor, f"fhir.{'create' if write.created else 'update'}",
            write.resource_type, write.resource_id,
            {"version": write.version_id, "message_id": receipt.message_id, "via": action},
        )
    else:
        # One row names every resource of the transaction: a row per resource
        # cost as much as validating it (each append reads the chain's head).
        audit.record(conn, principal.actor, "fhir.transaction", "Bundle", bundle_id,
                     _transaction_detail(writes, receipt.message_id))
    return Committed(receipt.message_id, moment)


def _transaction_detail(writes: list[Write], message_id: int) -> dict[str, Any]:
    """List the ids created and updated, by type, as ``Type/id/_history/version``."""
    created: dict[str, list[str]] = {}
    updated: dict[str, list[str]] = {}
    for write in writes:
        target = created if write.created else updated
        target.setdefault(write.resource_type, []).append(
            f"{write.resource_id}/_history/{write.version_id}")
    return {"message_id": message_id, "created": created, "updated": updated}
