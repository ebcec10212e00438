"""Procurement under ``/api/v1/procurement``: requests, approvals, receipts, stock.

A department request and a goods receipt are each stored verbatim as a
message first (format ``procurement-json``), in the transaction that acts on
them, so every request and receipt traces back to what was sent. The
``Idempotency-Key`` header makes a resent request or receipt return the
first one instead of creating a second.

Scopes: ``workitems:write`` to request, receive goods and assign a
supplier. Deciding an approval step needs ``workitems:approve``, and the
caller's roles must also see the step's team. Nobody approves their own
request or two steps of one request. Stock and purchase orders
are read with ``masterdata:read``, requests with ``workitems:read``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import Connection, select, update

from carebridge.api.deps import ApiError, context, require
from carebridge.api.ops.common import MAX_ID, TEXT_PATTERN, utc
from carebridge.api.ops.work_item_actions import apply, load_item
from carebridge.api.security import Principal, Scope
from carebridge.engine.intake import DUPLICATE, PROCESSED, store_batch
from carebridge.ingest.files.sources import RawInput, sha256
from carebridge.store.schema import (
    approvals,
    messages,
    procurement_requests,
    purchase_orders,
    stock_levels,
)
from carebridge.workflows import procurement
from carebridge.workflows.procurement import ProcurementError, RequestDraft

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/procurement", tags=["procurement"])

SOURCE = "api:procurement"
FORMAT = "procurement-json"
CODE = r"^[A-Za-z0-9_.:-]+$"

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No credentials."},
    403: {"description": "The client's roles lack the scope, or may not decide this step."},
    404: {"description": "Not found."},
    409: {"description": "The request or step is not in a state that allows this."},
    422: {"description": "Invalid body, unknown item, department or supplier, or a limit passed."},
}

Id = Annotated[int, Path(ge=1, le=MAX_ID)]
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=200, pattern=TEXT_PATTERN,
           description="A key of the caller's choice; the same key returns the first result."),
]


class RequestBody(BaseModel):
    """A department's request to buy one item."""

    model_config = ConfigDict(extra="forbid")

    department: str = Field(pattern=CODE, max_length=40)
    location: str | None = Field(default=None, pattern=CODE, max_length=40,
                                 description="Where the goods go; the department by default.")
    item_code: str = Field(pattern=CODE, max_length=60)
    quantity: Decimal = Field(gt=0, max_digits=12, decimal_places=3)
    category: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_-]*$", max_length=60)
    supplier: str | None = Field(default=None, pattern=CODE, max_length=60)
    needed_by: dt.date | None = None
    note: str | None = Field(default=None, max_length=2000)


class ReceiptBody(BaseModel):
    """Goods received against a purchase order."""

    model_config = ConfigDict(extra="forbid")

    po_number: str = Field(pattern=CODE, max_length=40)
    quantity: Decimal = Field(gt=0, max_digits=12, decimal_places=3)
    lot_number: str | None = Field(default=None, pattern=TEXT_PATTERN, max_length=60)
    received_on: dt.date | None = Field(default=None, description="Today by default.")


class SupplierBody(BaseModel):
    """The supplier to order from."""

    model_config = ConfigDict(extra="forbid")

    supplier: str = Field(pattern=CODE, max_length=60)


class DecisionBody(BaseModel):
    """An optional note kept with the decision in the work item's history."""

    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(default=None, max_length=2000)


UtcDatetime = Annotated[dt.datetime, AfterValidator(utc)]
"""A timestamp in UTC; SQLite returns naive values, which are UTC already."""


class ApprovalView(BaseModel):
    id: int
    step_no: int
    step_name: str
    team: str
    reason: str
    status: str
    work_item_id: int | None
    decided_by: str | None
    decided_at: UtcDatetime | None


class OrderView(BaseModel):
    id: int
    po_number: str
    supplier: str
    location: str
    item_code: str
    quantity: Decimal
    amount: Decimal
    currency: str
    order_date: dt.date
    status: str
    received_quantity: Decimal


class RequestView(BaseModel):
    id: int
    origin: str
    department: str
    location: str
    category: str
    supplier: str | None
    item_code: str
    quantity: Decimal
    unit_cost: Decimal
    amount: Decimal
    currency: str
    requested_on: dt.date
    needed_by: dt.date | None
    requested_by: str
    status: str
    rule_version: str
    message_id: int
    approvals: list[ApprovalView]
    purchase_order: OrderView | None


class ReceiptView(BaseModel):
    receipt_id: int
    created: bool
    purchase_order: OrderView


class StockView(BaseModel):
    location: str
    item_code: str
    on_hand: Decimal
    updated_at: UtcDatetime


def _store_message(conn: Connection, principal: Principal, kind: str, body: BaseModel,
                   key: str | None) -> tuple[int, bool]:
    """Store the request body as a processed message; return its id and whether it is new."""
    raw = json.dumps({"kind": kind, **body.model_dump(mode="json")}, sort_keys=True).encode()
    digest = sha256(raw)
    dedup = f"{SOURCE}:{kind}:{principal.client_id}:{key or digest}"
    receipt = store_batch(conn, [RawInput(
        format=f"{FORMAT}:{kind}", origin=f"{SOURCE}:{principal.client_id}", raw=raw,
        content_sha256=digest, dedup_key=dedup,
    )], source=SOURCE)[0]
    if receipt.state == DUPLICATE:
        return receipt.duplicate_of or receipt.message_id, False
    if receipt.state != "received":
        raise ApiError(409, "conflict", f"Idempotency-Key {key} was used for a different "
                       f"{kind}; send a new key")
    # The request is acted on here, so the message is not left for the workers.
    conn.execute(update(messages).where(messages.c.id == receipt.message_id).values(
        state=PROCESSED, processed_at=dt.datetime.now(dt.UTC),
        summary=json.dumps({"procurement": kind})))
    return receipt.message_id, True


def _order_view(row: Any) -> OrderView:
    return OrderView(**{name: row[name] for name in OrderView.model_fields})


def _request_view(conn: Connection, request_id: int) -> RequestView:
    row = conn.execute(
        select(procurement_requests).where(procurement_requests.c.id == request_id)
    ).mappings().first()
    if row is None:
        raise ApiError(404, "not-found", f"procurement request {request_id} not found")
    steps = conn.execute(
        select(approvals).where(approvals.c.request_id == request_id).order_by(approvals.c.step_no)
    ).mappings().all()
    order = conn.execute(
        select(purchase_orders).where(purchase_orders.c.request_id == request_id)
    ).mappings().first()
    fields = {name: row[name] for name in RequestView.model_fields
              if name not in ("approvals", "purchase_order")}
    return RequestView(
        **fields,
        approvals=[ApprovalView(**{name: step[name] for name in ApprovalView.model_fields})
                   for step in steps],
        purchase_order=_order_view(order) if order is not None else None,
    )


@router.post("/requests", response_model=RequestView, status_code=201, responses=ERRORS,
             summary="Request to buy an item",
             description="Scope: `workitems:write`. Starts the approval chain the rules give "
                         "for the amount and category.")
def create_request(
    request: Request, body: RequestBody,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_WRITE))],
    idempotency_key: IdempotencyKey = None,
) -> Any:
    ctx = context(request)
    config = ctx.config
    today = dt.date.today()
    rules = config.rule_book.in_force(today)
    category = body.category or rules.item_categories.get(body.item_code,
                                                           procurement.DEFAULT_CATEGORY)
    with ctx.engine.begin() as conn:
        message_id, new = _store_message(conn, principal, "request", body, idempotency_key)
        request_key = f"api:{message_id}"
        if not new:
            existing = procurement.find_request(conn, request_key)
            if existing is None:
                raise ApiError(409, "conflict", "this request was sent before and rejected; "
                               "correct it and send it with a new Idempotency-Key")
            return _request_view(conn, existing)
        draft = RequestDraft(
            request_key=request_key, origin=procurement.DEPARTMENT,
            department=body.department, location=body.location or body.department,
            category=category, item_code=body.item_code, quantity=body.quantity,
            requested_on=today, requested_by=principal.actor, message_id=message_id,
            supplier=body.supplier, needed_by=body.needed_by, note=body.note,
        )
        try:
            procurement.check_draft(config, draft)
        except ProcurementError as exc:
            raise ApiError(422, "invalid", str(exc)) from None
        request_id = procurement.create_request(conn, config, draft)
        view = _request_view(conn, request_id)
    logger.info("procurement request %d created by %s", request_id, principal.client_id)
    return view


@router.get("/requests", response_model=list[RequestView], responses=ERRORS,
            summary="List procurement requests, newest first",
            description="Scope: `workitems:read`. At most `limit` requests.")
def list_requests(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_READ))],
    status: str | None = None, limit: int = 100,
) -> Any:
    limit = max(1, min(limit, 500))
    with context(request).engine.connect() as conn:
        query = select(procurement_requests.c.id).order_by(procurement_requests.c.id.desc())
        if status is not None:
            query = query.where(procurement_requests.c.status == status)
        ids = list(conn.execute(query.limit(limit)).scalars())
        return [_request_view(conn, request_id) for request_id in ids]


@router.get("/requests/{request_id}", response_model=RequestView, responses=ERRORS,
            summary="Show a procurement request with its approvals and purchase order",
            description="Scope: `workitems:read`.")
def show_request(
    request: Request, request_id: Id,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_READ))],
) -> Any:
    with context(request).engine.connect() as conn:
        return _request_view(conn, request_id)


def _decide(request: Request, approval_id: int, principal: Principal, approved: bool,
            note: str | None) -> RequestView:
    ctx = context(request)
    with ctx.engine.begin() as conn:
        step = conn.execute(
            select(approvals).where(approvals.c.id == approval_id)
        ).mappings().first()
        if step is None or step["work_item_id"] is None:
            raise ApiError(404, "not-found", f"approval {approval_id} not found or not open yet")
        item = load_item(conn, step["work_item_id"], principal)
        owner = conn.execute(
            select(procurement_requests.c.requested_by)
            .where(procurement_requests.c.id == step["request_id"])
        ).scalar()
        if owner == principal.actor:
            raise ApiError(403, "forbidden", "the requester may not approve their own request")
        earlier = conn.execute(
            select(approvals.c.id).where(approvals.c.request_id == step["request_id"],
                                         approvals.c.decided_by == principal.actor)
        ).first()
        if earlier is not None:
            raise ApiError(403, "forbidden", "one person decides one step of a request; "
                           "another approver must decide this step")
        if step["status"] != "open":
            raise ApiError(409, "conflict", f"approval {approval_id} is {step['status']}")
        now = dt.datetime.now(dt.UTC)
        action = "approve" if approved else "reject"
        values: dict[str, Any] = {"resolved_at": now, "resolved_by": principal.actor}
        if not approved:
            values["resolution"] = note or "rejected"
        apply(conn, item, action, principal, values,
              {"approval_id": approval_id, **({"note": note} if note else {})})
        procurement.record_decision(conn, ctx.config, approval_id, approved=approved,
                                    actor=principal.actor, at=now)
        return _request_view(conn, step["request_id"])


@router.post("/approvals/{approval_id}/approve", response_model=RequestView, responses=ERRORS,
             summary="Approve one step of a request's approval chain",
             description="Scope: `workitems:approve`. The last approval places the "
                         "purchase order.")
def approve(
    request: Request, approval_id: Id,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_APPROVE))],
    body: DecisionBody | None = None,
) -> Any:
    return _decide(request, approval_id, principal, True, body.note if body else None)


@router.post("/approvals/{approval_id}/reject", response_model=RequestView, responses=ERRORS,
             summary="Reject a request at one step of its approval chain",
             description="Scope: `workitems:approve`. Ends the request.")
def reject(
    request: Request, approval_id: Id,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_APPROVE))],
    body: DecisionBody | None = None,
) -> Any:
    return _decide(request, approval_id, principal, False, body.note if body else None)


@router.post("/requests/{request_id}/supplier", response_model=RequestView, responses=ERRORS,
             summary="Assign the supplier of an approved request that names none",
             description="Scope: `workitems:write`. Places the purchase order.")
def assign_supplier(
    request: Request, request_id: Id, body: SupplierBody,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_WRITE))],
) -> Any:
    ctx = context(request)
    with ctx.engine.begin() as conn:
        _request_view(conn, request_id)
        try:
            procurement.assign_supplier(conn, ctx.config, request_id, body.supplier,
                                        principal.actor)
        except ProcurementError as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        return _request_view(conn, request_id)


@router.post("/receipts", response_model=ReceiptView, status_code=201, responses=ERRORS,
             summary="Record goods received against a purchase order",
             description="Scope: `workitems:write`. Adds the quantity to stock at the "
                         "order's location.")
def receive(
    request: Request, body: ReceiptBody,
    principal: Annotated[Principal, Depends(require(Scope.WORK_ITEMS_WRITE))],
    idempotency_key: IdempotencyKey = None,
) -> Any:
    ctx = context(request)
    with ctx.engine.begin() as conn:
        message_id, _ = _store_message(conn, principal, "receipt", body, idempotency_key)
        try:
            receipt = procurement.receive_goods(
                conn, ctx.config, receipt_key=f"api:{message_id}", po_number=body.po_number,
                quantity=body.quantity, received_on=body.received_on or dt.date.today(),
                received_by=principal.actor, message_id=message_id,
                lot_number=body.lot_number,
            )
        except ProcurementError as exc:
            raise ApiError(422, "invalid", str(exc)) from None
        order = conn.execute(
            select(purchase_orders).where(purchase_orders.c.po_number == body.po_number)
        ).mappings().one()
        return ReceiptView(receipt_id=receipt.receipt_id, created=receipt.created,
                           purchase_order=_order_view(order))


@router.get("/purchase-orders", response_model=list[OrderView], responses=ERRORS,
            summary="List purchase orders, newest first",
            description="Scope: `masterdata:read`. At most `limit` orders.")
def list_orders(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.MASTER_DATA_READ))],
    limit: int = 100,
) -> Any:
    with context(request).engine.connect() as conn:
        rows = conn.execute(select(purchase_orders).order_by(purchase_orders.c.id.desc())
                            .limit(max(1, min(limit, 500)))).mappings().all()
        return [_order_view(row) for row in rows]


@router.get("/stock", response_model=list[StockView], responses=ERRORS,
            summary="Stock on hand per location and item",
            description="Scope: `masterdata:read`.")
def list_stock(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.MASTER_DATA_READ))],
) -> Any:
    with context(request).engine.connect() as conn:
        rows = conn.execute(select(stock_levels).order_by(
            stock_levels.c.location, stock_levels.c.item_code)).mappings().all()
        return [StockView(**row) for row in rows]
