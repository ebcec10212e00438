"""Delivery routes: the outbox by state, dead letters, retries and replays.

A retry or replay only changes rows: the workers' next delivery pass sends
them. Replays go through :func:`carebridge.engine.deliveries.replay`, so each
new row names the dead one in ``replay_of`` and keeps its idempotency key.
"""

from __future__ import annotations

import datetime as dt
import logging
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select, update

from carebridge import audit
from carebridge.api.deps import ApiError, context, require
from carebridge.api.ops.common import (
    MAX_ID,
    TEXT_PATTERN,
    IdCursor,
    Limit,
    Page,
    id_path,
    page,
    parse_json,
    problems,
    text_query,
    utc,
)
from carebridge.api.security import Principal, Scope
from carebridge.engine import deliveries as outbox
from carebridge.store.schema import deliveries

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/deliveries", tags=["deliveries"])

DeliveryId = Annotated[int, id_path("The delivery id.")]

DeliveryState = StrEnum("DeliveryState", {name.upper(): name for name in outbox.STATES})


class DeliverySummary(BaseModel):
    """A delivery: one record promised to one destination."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 31, "destination": "erp", "kind": "journal", "record_id": 12,
        "idempotency_key": "carebridge:erp:journal:2024-05-01|CLINIC|USD",
        "state": "dead", "attempts": 5, "next_attempt_at": "2025-03-02T10:20:00Z",
        "last_error": "gave up after 5 attempts: HTTP 503", "created_at":
        "2025-03-02T10:15:02Z", "delivered_at": None, "dead_at": "2025-03-02T10:21:40Z",
        "replay_of": None,
    }]})

    id: int
    destination: str
    kind: str
    record_id: int
    idempotency_key: str
    state: str = Field(description="pending, in_flight, delivered or dead.")
    attempts: int
    next_attempt_at: dt.datetime
    last_error: str | None = None
    created_at: dt.datetime
    delivered_at: dt.datetime | None = None
    dead_at: dt.datetime | None = None
    replay_of: int | None = Field(default=None, description="The dead delivery this "
                                  "one replays.")


class DeliveryDetail(DeliverySummary):
    """A delivery with its payload, the destination's last response and its replays."""

    payload: Any = Field(description="The JSON body sent.")
    response: str | None = None
    lease_owner: str | None = None
    lease_until: dt.datetime | None = None
    replays: list[int] = Field(description="Deliveries that replay this one.")


class DestinationCounts(BaseModel):
    destination: str
    counts: dict[str, int] = Field(description="Deliveries by state.")
    circuit: str | None = Field(default=None, description="closed, open or half_open.")
    consecutive_failures: int | None = None
    retry_at: dt.datetime | None = None


class RetryResult(BaseModel):
    """The delivery that will be sent: the same row, or a replay of a dead one."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"delivery_id": 44, "replay_of": 31, "state": "pending",
         "next_attempt_at": "2025-03-02T11:00:00Z"}]})

    delivery_id: int
    replay_of: int | None = None
    state: str
    next_attempt_at: dt.datetime


class ReplayRequest(BaseModel):
    """The selection of dead deliveries to queue again: ids, a destination, or all_dead."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"ids": [31, 32]}, {"destination": "erp"}, {"all_dead": True}],
        "anyOf": [
            {"required": ["ids"]},
            {"required": ["destination"]},
            {"required": ["all_dead"], "properties": {"all_dead": {"const": True}}},
        ],
    })

    # Not Optional: null is not a selection, so the schema does not admit it.
    ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] = Field(
        default=None, min_length=1, max_length=1000)  # type: ignore[assignment]
    destination: str = Field(default=None, min_length=1, max_length=60,  # type: ignore[assignment]
                             pattern=TEXT_PATTERN)
    all_dead: bool = False

    @model_validator(mode="after")
    def _one_selection(self) -> ReplayRequest:
        if self.ids is None and self.destination is None and not self.all_dead:
            raise ValueError("give ids, destination or all_dead: true")
        return self


class ReplayResult(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"count": 1, "replayed": [{"delivery_id": 44, "replay_of": 31}]}]})

    count: int
    replayed: list[dict[str, int]] = Field(
        description="Each new delivery id with the dead one it replays.")


def _summary(row: Any) -> dict[str, Any]:
    return {
        "id": row.id, "destination": row.destination, "kind": row.kind,
        "record_id": row.record_id, "idempotency_key": row.idempotency_key,
        "state": row.state, "attempts": row.attempts,
        "next_attempt_at": utc(row.next_attempt_at), "last_error": row.last_error,
        "created_at": utc(row.created_at), "delivered_at": utc(row.delivered_at),
        "dead_at": utc(row.dead_at), "replay_of": row.replay_of,
    }


def _list(request: Request, limit: int, cursor: int | None, **filters: Any) -> Any:
    query = select(deliveries)
    for name, value in filters.items():
        if value is not None:
            query = query.where(deliveries.c[name] == value)
    if cursor is not None:
        query = query.where(deliveries.c.id < cursor)
    with context(request).engine.connect() as conn:
        rows = conn.execute(query.order_by(deliveries.c.id.desc()).limit(limit + 1)).all()
    items = [_summary(row) for row in rows[:limit]]
    return page(request, items, items[-1]["id"] if len(rows) > limit else None)


Destination = Annotated[str | None, text_query("Destination name.", 60)]
Kind = Annotated[str | None, text_query("Record kind, e.g. journal.", 40)]


@router.get(
    "", response_model=Page[DeliverySummary], responses=problems(),
    summary="List deliveries", description="Scope: `deliveries:read`. Newest first.",
)
def list_deliveries(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.DELIVERIES_READ))],
    limit: Limit = 50,
    cursor: IdCursor = None,
    state: Annotated[DeliveryState | None, Query(description="Delivery state.")] = None,
    destination: Destination = None,
    kind: Kind = None,
    record_id: Annotated[int | None, Query(ge=1, le=MAX_ID,
                                           description="The delivered record's id.")] = None,
) -> Any:
    return _list(request, limit, cursor, state=state.value if state else None,
                 destination=destination, kind=kind, record_id=record_id)


@router.get(
    "/dead-letters", response_model=Page[DeliverySummary], responses=problems(),
    summary="List dead deliveries",
    description=(
        "Scope: `deliveries:read`. Deliveries that gave up (state `dead`), newest "
        "first. Replay them with `POST /api/v1/deliveries/replay`."
    ),
)
def dead_letters(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.DELIVERIES_READ))],
    limit: Limit = 50,
    cursor: IdCursor = None,
    destination: Destination = None,
    kind: Kind = None,
) -> Any:
    return _list(request, limit, cursor, state=outbox.DEAD, destination=destination,
                 kind=kind)


@router.get(
    "/summary", response_model=list[DestinationCounts], responses=problems(),
    summary="Count deliveries by destination and state",
    description="Scope: `deliveries:read`. With each destination's circuit breaker.",
)
def summary(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.DELIVERIES_READ))],
) -> Any:
    with context(request).engine.connect() as conn:
        counts = outbox.delivery_summary(conn)
        circuits = outbox.circuit_states(conn)
    return [
        {"destination": name, "counts": counts.get(name, dict.fromkeys(outbox.STATES, 0)),
         **circuits.get(name, {})}
        for name in sorted(set(counts) | set(circuits))
    ]


@router.get(
    "/{delivery_id}", response_model=DeliveryDetail, responses=problems(404),
    summary="Show a delivery", description="Scope: `deliveries:read`.",
)
def get_delivery(
    request: Request, delivery_id: DeliveryId,
    principal: Annotated[Principal, Depends(require(Scope.DELIVERIES_READ))],
) -> Any:
    with context(request).engine.connect() as conn:
        row = conn.execute(select(deliveries).where(deliveries.c.id == delivery_id)).first()
        if row is None:
            raise ApiError(404, "not-found", f"delivery {delivery_id} not found")
        replays = list(conn.execute(
            select(deliveries.c.id).where(deliveries.c.replay_of == delivery_id)
            .order_by(deliveries.c.id)).scalars())
    return _summary(row) | {
        "payload": parse_json(row.payload), "response": row.response,
        "lease_owner": row.lease_owner, "lease_until": utc(row.lease_until),
        "replays": replays,
    }


@router.post(
    "/{delivery_id}/retry", response_model=RetryResult, responses=problems(404, 409),
    summary="Send a waiting or dead delivery on the next pass",
    description=(
        "Scope: `deliveries:write`. A `pending` delivery waiting for its backoff "
        "becomes due now. A `dead` one is replayed as a new pending delivery that "
        "names it in `replay_of`. 409 for a delivery that is delivered or in flight, "
        "or a dead one whose idempotency key is already queued again."
    ),
)
def retry(
    request: Request, delivery_id: DeliveryId,
    principal: Annotated[Principal, Depends(require(Scope.DELIVERIES_WRITE))],
) -> Any:
    now = dt.datetime.now(dt.UTC)
    with context(request).engine.begin() as conn:
        row = conn.execute(select(deliveries).where(deliveries.c.id == delivery_id)).first()
        if row is None:
            raise ApiError(404, "not-found", f"delivery {delivery_id} not found")
        if row.state == outbox.PENDING:
            done = conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id, deliveries.c.state == outbox.PENDING)
                .values(next_attempt_at=now)
            ).rowcount
            if done != 1:
                raise ApiError(409, "conflict", f"delivery {delivery_id} was claimed "
                               "while this request ran; read it again")
            result = {"delivery_id": delivery_id, "replay_of": row.replay_of,
                      "state": outbox.PENDING, "next_attempt_at": now}
        elif row.state == outbox.DEAD:
            created = outbox.replay(conn, [delivery_id], now=now)
            if not created:
                raise ApiError(409, "conflict", f"delivery {delivery_id} is already "
                               "queued again under its idempotency key")
            result = {"delivery_id": created[0], "replay_of": delivery_id,
                      "state": outbox.PENDING, "next_attempt_at": now}
        else:
            raise ApiError(409, "conflict", f"delivery {delivery_id} is {row.state}; "
                           "only pending or dead deliveries can be retried")
        audit.record(conn, principal.actor, "delivery.retry", "delivery", delivery_id,
                     {"delivery_id": result["delivery_id"], "from": row.state})
    logger.info("delivery %d retried as %d by %s", delivery_id, result["delivery_id"],
                principal.client_id)
    return result


@router.post(
    "/replay", response_model=ReplayResult, responses=problems(),
    summary="Queue dead deliveries again",
    description=(
        "Scope: `deliveries:write`. Replays the dead deliveries named by `ids`, or "
        "those of `destination`, or every dead one with `all_dead: true` (`ids` and "
        "`destination` combine). Each replay is a new pending delivery with the "
        "same idempotency key and `replay_of` naming the dead one; a dead delivery "
        "whose key is queued again already is skipped."
    ),
)
def replay(
    request: Request, body: ReplayRequest,
    principal: Annotated[Principal, Depends(require(Scope.DELIVERIES_WRITE))],
) -> Any:
    with context(request).engine.begin() as conn:
        created = outbox.replay(conn, body.ids, body.destination,
                                all_dead=body.all_dead)
        pairs = []
        if created:
            pairs = [
                {"delivery_id": row.id, "replay_of": row.replay_of}
                for row in conn.execute(
                    select(deliveries.c.id, deliveries.c.replay_of)
                    .where(deliveries.c.id.in_(created)).order_by(deliveries.c.id))
            ]
        audit.record(conn, principal.actor, "delivery.replay", "delivery", None,
                     {"replayed": pairs})
    logger.info("%d dead deliveries replayed by %s", len(pairs), principal.client_id)
    return {"count": len(pairs), "replayed": pairs}
