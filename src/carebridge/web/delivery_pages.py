"""Deliveries per destination, dead letters, and their replay one by one or in bulk.

A replay only queues a new pending delivery (:func:`carebridge.engine.deliveries.replay`);
the workers' next delivery pass sends it.
"""

from __future__ import annotations

import logging
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import func, select

from carebridge import audit
from carebridge.api.deps import ApiError, context
from carebridge.api.security import Scope
from carebridge.engine import deliveries as outbox
from carebridge.store.schema import deliveries
from carebridge.web.render import current_user, deny, deny_post, from_api_error, render
from carebridge.web.session import WebUser

logger = logging.getLogger(__name__)

router = APIRouter()

PAGE_SIZE = 100
MAX_REPLAY_IDS = 1000

User = Annotated[WebUser | None, Depends(current_user)]


@router.get("/deliveries")
def deliveries_page(
    request: Request, user: User, destination: str = "", state: str = outbox.DEAD,
    replayed: int | None = None,
) -> Response:
    """Show delivery counts per destination and the deliveries of one state."""
    if (refusal := deny(request, user, Scope.DELIVERIES_READ)) is not None:
        return refusal
    query = select(deliveries)
    if destination:
        query = query.where(deliveries.c.destination == destination[:60])
    if state in outbox.STATES:
        query = query.where(deliveries.c.state == state)
    with context(request).engine.connect() as conn:
        counts = outbox.delivery_summary(conn)
        circuits = outbox.circuit_states(conn)
        total = conn.execute(
            select(func.count()).select_from(query.subquery())).scalar_one()
        rows = conn.execute(query.order_by(deliveries.c.id.desc()).limit(PAGE_SIZE)).all()
    names = sorted(set(counts) | set(circuits))
    summary = [{"destination": name,
                "counts": counts.get(name, dict.fromkeys(outbox.STATES, 0)),
                "circuit": circuits.get(name, {})} for name in names]
    return render(request, user, "deliveries.html", summary=summary, rows=rows,
                  total=total, states=outbox.STATES, dead=outbox.DEAD,
                  filters={"destination": destination, "state": state},
                  replayed=replayed, can_replay=user.may(Scope.DELIVERIES_WRITE))


@router.post("/deliveries/replay")
def replay(
    request: Request, user: User,
    csrf: Annotated[str, Form(max_length=100)] = "",
    ids: Annotated[list[int], Form()] = [],  # noqa: B006 (FastAPI copies defaults)
    destination: Annotated[str, Form(max_length=60)] = "",
) -> Response:
    """Queue the chosen dead deliveries, or every dead one of a destination, again."""
    if (refusal := deny_post(request, user, Scope.DELIVERIES_WRITE, csrf)) is not None:
        return refusal
    chosen = sorted({i for i in ids if 0 < i < 2**31})[:MAX_REPLAY_IDS]
    if not chosen and not destination:
        return from_api_error(request, user, ApiError(
            422, "invalid", "choose dead deliveries to replay, or a destination"),
            "/ui/deliveries")
    with context(request).engine.begin() as conn:
        created = outbox.replay(conn, chosen or None, destination or None)
        pairs = [{"delivery_id": row.id, "replay_of": row.replay_of} for row in
                 conn.execute(select(deliveries.c.id, deliveries.c.replay_of)
                              .where(deliveries.c.id.in_(created or [-1]))
                              .order_by(deliveries.c.id))]
        audit.record(conn, user.principal.actor, "delivery.replay", "delivery", None,
                     {"replayed": pairs})
    logger.info("%d dead deliveries replayed by client %s", len(pairs), user.client_id)
    query = {"state": outbox.PENDING, "replayed": len(pairs)}
    if destination:
        query["destination"] = destination
    return RedirectResponse(f"/ui/deliveries?{urlencode(query)}", status_code=303)
