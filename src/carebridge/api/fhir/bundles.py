"""Transaction and batch Bundles (``POST /fhir``).

A transaction is all or nothing: every entry is validated first, then all
writes, their one message and their audit rows commit in one database
transaction. Entries that create resources get new ids, and every reference
to an entry's ``fullUrl`` is rewritten to ``Type/id``. A ``urn:uuid:`` full
URL gives its UUID as the new id when no stored resource of that type has it
yet, so that ids assigned by the sender (as Synthea's are) stay the ids of
the canonical records.

A batch runs each entry as its own interaction: one entry's failure is
reported in its response entry and does not undo the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine

from carebridge.api.deps import ApiError
from carebridge.api.fhir.interactions import Result, create, update
from carebridge.api.fhir.repository import (
    Criteria,
    current,
    existing_ids,
    find_existing,
    parse_criteria,
    search,
)
from carebridge.api.fhir.resources import (
    SERVED_TYPES,
    check_id,
    etag,
    instant,
    new_id,
    parse_etag,
)
from carebridge.api.fhir.validation import validate
from carebridge.api.fhir.writes import Write, commit, retrying
from carebridge.api.security import Principal

logger = logging.getLogger(__name__)

_STATUS_TEXT = {200: "200 OK", 201: "201 Created"}


@dataclass(slots=True)
class Entry:
    """One write request of a Bundle: ``POST Type`` or ``PUT Type/id``."""

    index: int
    method: str
    resource_type: str
    resource: dict[str, Any]
    resource_id: str | None = None
    full_url: str | None = None
    criteria: Criteria | None = None
    if_match: int | None = None

    @property
    def path(self) -> str:
        return f"Bundle.entry[{self.index}]"


@dataclass(slots=True)
class _Plan:
    """The outcome of each entry of a transaction, decided inside its database transaction."""

    writes: dict[int, Write] = field(default_factory=dict)
    results: dict[int, Result] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)


def read_entries(bundle: dict[str, Any]) -> list[Entry]:
    """Read the request of every entry; raise 400 naming the first bad element."""
    entries = bundle.get("entry") or []
    read: list[Entry] = []
    for index, entry in enumerate(entries):
        path = f"Bundle.entry[{index}]"
        request = entry.get("request") or {}
        method = str(request.get("method") or "")
        url = str(request.get("url") or "").split("?", 1)[0].strip("/")
        resource = entry.get("resource")
        if method not in ("POST", "PUT"):
            raise ApiError(400, "not-supported", f"request method {method or 'missing'}: "
                           "entries may only POST or PUT", location=f"{path}.request.method")
        if not isinstance(resource, dict):
            raise ApiError(400, "required", f"{method} needs a resource",
                           location=f"{path}.resource")
        resource_type = str(resource.get("resourceType"))
        parts = url.split("/")
        if parts[0] != resource_type:
            raise ApiError(400, "invalid", f"request.url {url!r} does not name the entry's "
                           f"{resource_type}", location=f"{path}.request.url")
        item = Entry(index, method, resource_type, resource, full_url=entry.get("fullUrl"))
        if method == "PUT":
            if len(parts) != 2:
                raise ApiError(400, "not-supported", "PUT needs request.url Type/id; "
                               "conditional update is not supported",
                               location=f"{path}.request.url")
            item.resource_id = check_id(parts[1], f"{path}.request.url")
            if resource.get("id", item.resource_id) != item.resource_id:
                raise ApiError(400, "invalid", "resource id differs from the id in "
                               "request.url", location=f"{path}.resource.id")
            if request.get("ifMatch"):
                item.if_match = parse_etag(str(request["ifMatch"]), f"{path}.request.ifMatch")
        elif request.get("ifNoneExist"):
            item.criteria = parse_criteria(str(request["ifNoneExist"]), resource_type,
                                           f"{path}.request.ifNoneExist")
        read.append(item)
    return read


def _plan(conn: Connection, entries: list[Entry]) -> _Plan:
    plan = _Plan()
    creates: list[Entry] = []
    for entry in entries:
        if entry.method == "POST":
            existing = None
            if entry.criteria is not None:
                existing = find_existing(conn, entry.resource_type, entry.criteria,
                                         f"{entry.path}.request.ifNoneExist")
            if existing is not None:
                plan.results[entry.index] = Result.of(200, existing)
                _target(plan, entry, existing.resource_type, existing.resource_id)
            else:
                creates.append(entry)
            continue
        assert entry.resource_id is not None
        stored = current(conn, entry.resource_type, entry.resource_id)
        if entry.if_match is not None and (stored is None
                                           or stored.version_id != entry.if_match):
            found = "no such resource" if stored is None else f"version {stored.version_id}"
            raise ApiError(412, "conflict", f"ifMatch names version {entry.if_match}, "
                           f"found {found}", location=f"{entry.path}.request.ifMatch")
        next_version = stored.version_id + 1 if stored is not None else 1
        plan.writes[entry.index] = Write(entry.resource_type, entry.resource_id,
                                         next_version, entry.resource, full_url=entry.full_url)
        _target(plan, entry, entry.resource_type, entry.resource_id)
    for entry, resource_id in zip(creates, _new_ids(conn, creates), strict=True):
        plan.writes[entry.index] = Write(entry.resource_type, resource_id, 1, entry.resource,
                                         criteria=entry.criteria, full_url=entry.full_url)
        _target(plan, entry, entry.resource_type, resource_id)
    return plan


def _target(plan: _Plan, entry: Entry, resource_type: str, resource_id: str) -> None:
    if entry.full_url:
        plan.targets[entry.full_url] = f"{resource_type}/{resource_id}"


def _new_ids(conn: Connection, creates: list[Entry]) -> list[str]:
    """Choose an id for each created resource: its ``urn:uuid:`` if unused, else a new one."""
    wanted: dict[str, list[str]] = {}
    for entry in creates:
        suggested = (entry.full_url or "").removeprefix("urn:uuid:")
        if entry.full_url and entry.full_url.startswith("urn:uuid:") and suggested:
            wanted.setdefault(entry.resource_type, []).append(suggested)
    taken = {
        (resource_type, resource_id)
        for resource_type, ids in wanted.items()
        for resource_id in existing_ids(conn, resource_type, ids)
    }
    chosen: list[str] = []
    for entry in creates:
        suggested = (entry.full_url or "").removeprefix("urn:uuid:")
        usable = (entry.full_url or "").startswith("urn:uuid:") and len(suggested) <= 64
        if usable and (entry.resource_type, suggested) not in taken:
            taken.add((entry.resource_type, suggested))
            chosen.append(suggested)
        else:
            chosen.append(new_id())
    return chosen


def _rewrite(node: Any, resolve: Callable[[str], str]) -> Any:
    """Copy ``node`` with every ``reference`` string passed through ``resolve``."""
    if isinstance(node, dict):
        copied = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                copied[key] = resolve(value)
            elif isinstance(value, dict | list):
                copied[key] = _rewrite(value, resolve)
            else:
                copied[key] = value
        return copied
    if isinstance(node, list):
        return [_rewrite(item, resolve) if isinstance(item, dict | list) else item
                for item in node]
    return node


def _resolver(conn: Connection, plan: _Plan, path: str) -> Callable[[str], str]:
    """Return a function mapping a reference to its ``Type/id`` in this transaction.

    A reference to an entry's ``fullUrl`` becomes the entry's ``Type/id``. A
    conditional reference (``Patient?identifier=…``) to a served type becomes
    the one stored resource it matches. Other references stay as sent,
    including conditional references to types not stored here (Synthea's
    ``Practitioner?identifier=…``).
    """

    def resolve(reference: str) -> str:
        target = plan.targets.get(reference)
        if target is not None:
            return target
        if "?" not in reference:
            return reference
        resource_type, query = reference.split("?", 1)
        if resource_type not in SERVED_TYPES:
            return reference
        criteria = parse_criteria(query, resource_type, path)
        matches = search(conn, resource_type, criteria, limit=2)
        if len(matches) != 1:
            found = "no" if not matches else "more than one"
            raise ApiError(412, "processing", f"conditional reference {resource_type}?… "
                           f"matches {found} stored {resource_type}", location=path)
        return f"{resource_type}/{matches[0].resource_id}"

    return resolve


def transaction(engine: Engine, principal: Principal, entries: list[Entry]) -> list[Result]:
    """Apply ``entries`` all or nothing and return one result per entry, in order."""
    claimed: set[tuple[str, str]] = set()
    for entry in entries:
        if entry.criteria is not None:
            key = (entry.resource_type, entry.criteria.key)
            if key in claimed:
                raise ApiError(400, "duplicate", "two entries share the same ifNoneExist",
                               location=f"{entry.path}.request.ifNoneExist")
            claimed.add(key)

    def work(conn: Connection) -> list[Result]:
        plan = _plan(conn, entries)
        for index, write in plan.writes.items():
            resolve = _resolver(conn, plan, f"Bundle.entry[{index}].resource")
            write.resource = _rewrite(write.resource, resolve)
        if plan.writes:
            ordered = [plan.writes[index] for index in sorted(plan.writes)]
            committed = commit(conn, ordered, principal, "transaction")
            for index, write in plan.writes.items():
                plan.results[index] = Result(
                    201 if write.created else 200, write.resource_type, write.resource_id,
                    write.version_id, committed.last_updated, write.content)
        return [plan.results[entry.index] for entry in entries]

    results = retrying(engine, work)
    logger.info(
        "FHIR transaction stored",
        extra={"action": "fhir_transaction", "client_id": principal.client_id,
               "entries": len(entries),
               "resources_created": sum(1 for result in results if result.status == 201)},
    )
    return results


def batch(engine: Engine, principal: Principal, bundle: dict[str, Any],
          policy: str) -> list[Result | ApiError]:
    """Run each entry of a batch on its own; return its result or its error."""
    outcomes: list[Result | ApiError] = []
    for index, entry in enumerate(bundle.get("entry") or []):
        try:
            [item] = read_entries({"entry": [entry]})
            item.index = index
            validate(item.resource, f"Bundle.entry[{index}].resource", policy, principal)
            if item.method == "POST":
                outcomes.append(create(engine, principal, item.resource_type, item.resource,
                                       item.criteria, f"{item.path}.request.ifNoneExist"))
            else:
                assert item.resource_id is not None
                outcomes.append(update(engine, principal, item.resource_type,
                                       item.resource_id, item.resource, item.if_match,
                                       f"{item.path}.request.ifMatch"))
        except ApiError as exc:
            if exc.location and exc.location.startswith("Bundle.entry[0]"):
                exc.location = exc.location.replace("Bundle.entry[0]",
                                                    f"Bundle.entry[{index}]", 1)
            outcomes.append(exc)
    return outcomes


def response_entry(result: Result | ApiError,
                   outcome: Callable[[ApiError], dict[str, Any]]) -> dict[str, Any]:
    """Build the ``Bundle.entry.response`` of one entry's result or error."""
    if isinstance(result, ApiError):
        return {"response": {"status": str(result.status), "outcome": outcome(result)}}
    return {"response": {
        "status": _STATUS_TEXT.get(result.status, str(result.status)),
        "location": f"{result.resource_type}/{result.resource_id}/_history/"
                    f"{result.version_id}",
        "etag": etag(result.version_id),
        "lastModified": instant(result.last_updated),
    }}
