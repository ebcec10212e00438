"""Procurement: request, approval chain, purchase order, goods receipt.

A request comes from a department (the API) or from a par-level signal of
the stock step. The rules in force on the request date give its approval
chain: the steps of its category's chain whose ``from_amount`` the amount
reaches, plus a ``budget-override`` step for the finance team when the
department's approved and ordered amounts of the year would pass its
budget. A par-level request below ``par_auto_approve_below`` skips the
chain. Each step is a work item for the step's team, opened when the step
before it is approved; a rejection ends the request.

An approved request becomes one purchase order (the unique ``request_id``
makes a second one impossible) and one outbox delivery per destination
whose kinds list ``purchase_order``. A request without a supplier waits
``on_hold`` with an ``unknown_supplier`` work item until one is assigned.
Goods receipts add stock at the order's location.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, RowMapping, insert, select, update

from carebridge import audit
from carebridge.config.model import Configuration
from carebridge.config.rules import DEFAULT_CHAIN, ParLevel, RuleSet
from carebridge.engine.deliveries import enqueue, idempotency_key
from carebridge.store.schema import (
    approvals,
    goods_receipts,
    procurement_requests,
    purchase_orders,
    work_items,
)
from carebridge.workflows.charge_capture import to_cents
from carebridge.workflows.reasons import Reason
from carebridge.workflows.stock_levels import lock_stock, record_move
from carebridge.workflows.work import SYSTEM_ACTOR, close_item, open_item, team_for

log = logging.getLogger(__name__)

APPROVING, ON_HOLD, APPROVED, REJECTED, ORDERED, RECEIVED = (
    "approving", "on_hold", "approved", "rejected", "ordered", "received")
OPEN_REQUEST_STATUSES = (APPROVING, ON_HOLD, APPROVED)
"""Statuses of a request whose quantity is on order but not yet on a purchase order."""
DEPARTMENT, PAR_LEVEL = "department", "par_level"
DEFAULT_CATEGORY = "general"
PURCHASE_ORDER = "purchase_order"
"""The delivery kind of purchase orders."""


class ProcurementError(ValueError):
    """A request or receipt that cannot be accepted as sent; the message gives the reason."""


@dataclass(frozen=True, slots=True)
class RequestDraft:
    """A procurement request before it is stored."""

    request_key: str
    origin: str
    department: str
    location: str
    category: str
    item_code: str
    quantity: Decimal
    requested_on: dt.date
    requested_by: str
    message_id: int
    supplier: str | None = None
    needed_by: dt.date | None = None
    note: str | None = None


def unit_cost_of(config: Configuration, item_code: str) -> Decimal | None:
    """Return the item master's unit cost of ``item_code``, or ``None`` for an unknown item."""
    for item in config.supply_items.values():
        if item.item_code == item_code:
            return item.unit_cost
    return None


def check_draft(config: Configuration, draft: RequestDraft) -> RuleSet:
    """Check a department request against master data and the rules in force.

    Raises:
        ProcurementError: An unknown item, department, location or supplier,
            or a quantity or amount above the rules' limits.
    """
    rules = config.rule_book.in_force(draft.requested_on)
    unit_cost = unit_cost_of(config, draft.item_code)
    if unit_cost is None:
        raise ProcurementError(f"item {draft.item_code} is not in the item master")
    for name, code in (("department", draft.department), ("location", draft.location)):
        if code not in config.departments:
            raise ProcurementError(f"{name} {code} is not a department")
    if draft.supplier is not None and draft.supplier not in rules.suppliers:
        known = ", ".join(sorted(rules.suppliers)) or "none"
        raise ProcurementError(
            f"supplier {draft.supplier} is not in the rules {rules.version} "
            f"(known: {known}); leave it out to let supply chain choose one"
        )
    if draft.quantity <= 0:
        raise ProcurementError(f"quantity {draft.quantity} must be greater than 0")
    limit = rules.validation.max_request_quantity
    if draft.quantity > limit:
        raise ProcurementError(f"quantity {draft.quantity} is above the limit {limit}")
    amount = to_cents(draft.quantity * unit_cost)
    if amount > rules.validation.max_request_amount:
        raise ProcurementError(
            f"amount {amount} is above the limit {rules.validation.max_request_amount}"
        )
    return rules


def find_request(conn: Connection, request_key: str) -> int | None:
    """Return the id of the request stored under ``request_key``, if any."""
    return conn.execute(
        select(procurement_requests.c.id).where(
            procurement_requests.c.request_key == request_key
        )
    ).scalar()


def create_request(conn: Connection, config: Configuration, draft: RequestDraft) -> int:
    """Store a request, build its approval chain and start it; return the request id.

    A request key stored before returns the existing request unchanged, so
    the same request sent twice is one request.
    """
    existing = find_request(conn, draft.request_key)
    if existing is not None:
        return existing
    rules = config.rule_book.in_force(draft.requested_on)
    unit_cost = unit_cost_of(config, draft.item_code) or Decimal(0)
    amount = to_cents(draft.quantity * unit_cost)
    supplier = draft.supplier or _par_supplier(rules, draft)
    now = dt.datetime.now(dt.UTC)
    request_id = conn.execute(
        insert(procurement_requests).values(
            request_key=draft.request_key,
            origin=draft.origin,
            department=draft.department,
            location=draft.location,
            category=draft.category,
            supplier=supplier,
            item_code=draft.item_code,
            quantity=draft.quantity,
            unit_cost=unit_cost,
            amount=amount,
            currency=config.rules.currency,
            requested_on=draft.requested_on,
            needed_by=draft.needed_by,
            requested_by=draft.requested_by,
            note=draft.note,
            status=APPROVING,
            rule_version=rules.version,
            message_id=draft.message_id,
            created_at=now,
            updated_at=now,
        )
    ).inserted_primary_key[0]
    steps = approval_steps(conn, rules, draft, amount)
    if steps:
        conn.execute(
            insert(approvals),
            [
                {"request_id": request_id, "step_no": number, "step_name": name,
                 "team": team, "reason": reason.value, "status": "waiting"}
                for number, (name, team, reason) in enumerate(steps, start=1)
            ],
        )
    audit.record(conn, draft.requested_by, "procurement.request", "procurement_request",
                 request_id, {"origin": draft.origin, "amount": str(amount),
                              "steps": [name for name, _, _ in steps],
                              "rule_version": rules.version})
    log.info("procurement request stored", extra={"action": "procurement_request",
                                                  "request_id": request_id,
                                                  "steps": len(steps)})
    advance_request(conn, config, request_id)
    return request_id


def _par_supplier(rules: RuleSet, draft: RequestDraft) -> str | None:
    level = rules.par_levels.get((draft.location, draft.item_code))
    return level.supplier if level is not None else None


def approval_steps(
    conn: Connection, rules: RuleSet, draft: RequestDraft, amount: Decimal
) -> list[tuple[str, str, Reason]]:
    """Return the approval steps (name, team, reason) a request of ``amount`` needs, in order."""
    steps: list[tuple[str, str, Reason]] = []
    auto = draft.origin == PAR_LEVEL and amount < rules.par_auto_approve_below
    if not auto:
        chain = rules.chain_for(draft.category) or DEFAULT_CHAIN
        steps = [
            (step.name, step.team, Reason.APPROVAL_REQUIRED)
            for step in chain
            if amount >= step.from_amount
        ]
    budget = rules.budgets.get(draft.department)
    if budget is not None:
        committed = committed_amount(conn, draft.department, draft.requested_on.year)
        if committed + amount > budget:
            steps.append(
                ("budget-override", team_for(Reason.OVER_BUDGET, rules), Reason.OVER_BUDGET)
            )
    return steps


def committed_amount(conn: Connection, department: str, year: int) -> Decimal:
    """Return the amount of the department's approved, ordered and received requests of ``year``."""
    amounts = conn.execute(
        select(procurement_requests.c.amount).where(
            procurement_requests.c.department == department,
            procurement_requests.c.status.in_((APPROVED, ORDERED, RECEIVED)),
            procurement_requests.c.requested_on >= dt.date(year, 1, 1),
            procurement_requests.c.requested_on <= dt.date(year, 12, 31),
        )
    ).scalars()
    return sum(amounts, Decimal(0))


def _request(conn: Connection, request_id: int) -> RowMapping:
    return conn.execute(
        select(procurement_requests).where(procurement_requests.c.id == request_id)
    ).mappings().one()


def _set_status(conn: Connection, request_id: int, status: str) -> None:
    conn.execute(
        update(procurement_requests)
        .where(procurement_requests.c.id == request_id)
        .values(status=status, updated_at=dt.datetime.now(dt.UTC))
    )


def advance_request(conn: Connection, config: Configuration, request_id: int) -> str:
    """Move a request as far as its approvals allow; return its status afterwards.

    Opens the work item of the first step still waiting, ends the request
    at a rejected step, and places the order once every step is approved.
    """
    request = _request(conn, request_id)
    if request["status"] != APPROVING:
        return request["status"]
    steps = conn.execute(
        select(approvals).where(approvals.c.request_id == request_id).order_by(approvals.c.step_no)
    ).mappings().all()
    for step in steps:
        if step["status"] == "approved":
            continue
        if step["status"] == "rejected":
            _reject(conn, request_id, steps, step)
            return REJECTED
        if step["status"] == "open":
            return APPROVING
        _open_step(conn, config, request, step)
        return APPROVING
    _set_status(conn, request_id, APPROVED)
    place_order(conn, config, request_id)
    return _request(conn, request_id)["status"]


def _open_step(
    conn: Connection, config: Configuration, request: RowMapping, step: RowMapping
) -> None:
    reason = Reason(step["reason"])
    detail = (
        f"approve the purchase of {request['quantity']} {request['item_code']} for "
        f"{request['location']} at {request['amount']} {request['currency']} "
        f"(request {request['id']}, step {step['step_no']} {step['step_name']}, "
        f"rules {request['rule_version']})"
    )
    if reason is Reason.OVER_BUDGET:
        detail += f"; it takes {request['department']} over its budget for the year"
    item_id, _ = open_item(
        conn,
        subject_key=f"procurement:{request['id']}:step:{step['step_no']}",
        reason=reason,
        team=step["team"],
        message_id=request["message_id"],
        detail=detail,
        amount_at_risk=request["amount"],
    )
    conn.execute(
        update(approvals)
        .where(approvals.c.id == step["id"])
        .values(status="open", work_item_id=item_id)
    )


def _reject(conn: Connection, request_id: int, steps, rejected: RowMapping) -> None:
    _set_status(conn, request_id, REJECTED)
    for step in steps:
        if step["step_no"] > rejected["step_no"] and step["status"] in ("waiting", "open"):
            conn.execute(
                update(approvals).where(approvals.c.id == step["id"]).values(status="cancelled")
            )
            if step["status"] == "open":
                close_item(conn, f"procurement:{request_id}:step:{step['step_no']}",
                           Reason(step["reason"]), f"request rejected at step {rejected['step_no']}")
    log.info("procurement request rejected", extra={"action": "procurement_rejected",
                                                    "request_id": request_id})


def record_decision(
    conn: Connection,
    config: Configuration,
    approval_id: int,
    *,
    approved: bool,
    actor: str,
    at: dt.datetime | None = None,
) -> str:
    """Record one step's decision and advance its request; return the request's status.

    Raises:
        ProcurementError: The step is not open.
    """
    step = conn.execute(select(approvals).where(approvals.c.id == approval_id)).mappings().first()
    if step is None or step["status"] != "open":
        raise ProcurementError(f"approval {approval_id} is not open")
    conn.execute(
        update(approvals)
        .where(approvals.c.id == approval_id, approvals.c.status == "open")
        .values(status="approved" if approved else "rejected", decided_by=actor,
                decided_at=at or dt.datetime.now(dt.UTC))
    )
    return advance_request(conn, config, step["request_id"])


def sync_decisions(conn: Connection, config: Configuration) -> int:
    """Take decisions made on approval work items through the work-item routes.

    Returns:
        The number of steps decided.
    """
    rows = conn.execute(
        select(approvals.c.id, work_items.c.status, work_items.c.resolved_by,
               work_items.c.resolved_at)
        .join(work_items, work_items.c.id == approvals.c.work_item_id)
        .where(approvals.c.status == "open", work_items.c.status.in_(("approved", "rejected")))
        .order_by(approvals.c.id)
    ).all()
    for row in rows:
        record_decision(conn, config, row.id, approved=row.status == "approved",
                        actor=row.resolved_by or "unknown", at=row.resolved_at)
    return len(rows)


def place_order(conn: Connection, config: Configuration, request_id: int) -> int | None:
    """Create the purchase order of an approved request and promise it to destinations.

    Returns:
        The purchase order id, or ``None`` when the request waits for a supplier.
    """
    request = _request(conn, request_id)
    existing = conn.execute(
        select(purchase_orders.c.id).where(purchase_orders.c.request_id == request_id)
    ).scalar()
    if existing is not None:
        return existing
    rules = config.rule_book.in_force(request["requested_on"])
    if request["supplier"] is None:
        _set_status(conn, request_id, ON_HOLD)
        open_item(
            conn,
            subject_key=f"procurement:{request_id}",
            reason=Reason.UNKNOWN_SUPPLIER,
            team=team_for(Reason.UNKNOWN_SUPPLIER, rules),
            message_id=request["message_id"],
            detail=(f"request {request_id} for {request['item_code']} is approved but names "
                    "no supplier; assign one (POST /api/v1/procurement/requests/"
                    f"{request_id}/supplier)"),
            amount_at_risk=request["amount"],
        )
        return None
    now = dt.datetime.now(dt.UTC)
    po_number = f"PO-{request_id:06d}"
    order_id = conn.execute(
        insert(purchase_orders).values(
            po_number=po_number,
            request_id=request_id,
            supplier=request["supplier"],
            location=request["location"],
            item_code=request["item_code"],
            quantity=request["quantity"],
            unit_cost=request["unit_cost"],
            amount=request["amount"],
            currency=request["currency"],
            order_date=now.date(),
            status=ORDERED,
            received_quantity=Decimal(0),
            created_at=now,
        )
    ).inserted_primary_key[0]
    _set_status(conn, request_id, ORDERED)
    payload = order_payload(conn, config, order_id)
    for target in config.destinations:
        if PURCHASE_ORDER in target.kinds:
            key = idempotency_key(target.name, PURCHASE_ORDER, po_number)
            enqueue(conn, target.name, PURCHASE_ORDER, order_id, key, payload, now=now)
    audit.record(conn, SYSTEM_ACTOR, "procurement.order", "purchase_order", order_id,
                 {"request_id": request_id, "po_number": po_number,
                  "amount": str(request["amount"])})
    log.info("purchase order placed", extra={"action": "purchase_order",
                                             "purchase_order_id": order_id,
                                             "request_id": request_id})
    return order_id


def order_payload(conn: Connection, config: Configuration, order_id: int) -> dict[str, Any]:
    """Return the delivery payload of a purchase order: header and its one line."""
    order = conn.execute(
        select(purchase_orders).where(purchase_orders.c.id == order_id)
    ).mappings().one()
    request = _request(conn, order["request_id"])
    rules = config.rule_book.in_force(request["requested_on"])
    description = next(
        (item.description for item in config.supply_items.values()
         if item.item_code == order["item_code"]),
        order["item_code"],
    )
    return {
        "kind": PURCHASE_ORDER,
        "purchase_order": {
            "id": order_id,
            "po_number": order["po_number"],
            "request_id": order["request_id"],
            "supplier": order["supplier"],
            "supplier_name": rules.suppliers.get(order["supplier"], order["supplier"]),
            "location": order["location"],
            "department": request["department"],
            "order_date": order["order_date"].isoformat(),
            "currency": order["currency"],
            "total": str(order["amount"]),
            "lines": [
                {
                    "line_no": 1,
                    "item_code": order["item_code"],
                    "description": description,
                    "quantity": str(order["quantity"]),
                    "unit_price": str(order["unit_cost"]),
                    "amount": str(order["amount"]),
                }
            ],
        },
    }


def assign_supplier(
    conn: Connection, config: Configuration, request_id: int, supplier: str, actor: str
) -> int | None:
    """Give a request on hold its supplier and place its order; return the order id.

    Raises:
        ProcurementError: The request is not on hold, or the supplier is unknown.
    """
    request = _request(conn, request_id)
    if request["status"] != ON_HOLD:
        raise ProcurementError(f"request {request_id} is {request['status']}, not on_hold")
    rules = config.rule_book.in_force(request["requested_on"])
    if supplier not in rules.suppliers:
        raise ProcurementError(f"supplier {supplier} is not in the rules {rules.version}")
    conn.execute(
        update(procurement_requests)
        .where(procurement_requests.c.id == request_id)
        .values(supplier=supplier, status=APPROVED, updated_at=dt.datetime.now(dt.UTC))
    )
    close_item(conn, f"procurement:{request_id}", Reason.UNKNOWN_SUPPLIER,
               f"supplier {supplier} assigned by {actor}")
    audit.record(conn, actor, "procurement.supplier", "procurement_request", request_id,
                 {"supplier": supplier})
    return place_order(conn, config, request_id)


def on_order(conn: Connection, location: str, item_code: str) -> Decimal:
    """Return the quantity requested or ordered for a location and not yet received."""
    requested = conn.execute(
        select(procurement_requests.c.quantity).where(
            procurement_requests.c.location == location,
            procurement_requests.c.item_code == item_code,
            procurement_requests.c.status.in_(OPEN_REQUEST_STATUSES),
        )
    ).scalars()
    ordered = conn.execute(
        select(purchase_orders.c.quantity, purchase_orders.c.received_quantity).where(
            purchase_orders.c.location == location,
            purchase_orders.c.item_code == item_code,
            purchase_orders.c.status != RECEIVED,
        )
    ).all()
    open_quantity = sum(requested, Decimal(0))
    open_quantity += sum((max(row.quantity - row.received_quantity, Decimal(0))
                          for row in ordered), Decimal(0))
    return open_quantity


def raise_par_request(
    conn: Connection,
    config: Configuration,
    rules: RuleSet,
    level: ParLevel,
    *,
    on_hand: Decimal,
    trigger_key: str,
    message_id: int,
    requested_on: dt.date,
) -> int | None:
    """Request enough to reach ``order_up_to`` when stock plus orders is below par.

    Returns:
        The new request's id, or ``None`` when what is on order already covers par.
    """
    pending = on_order(conn, level.location, level.item_code)
    if on_hand + pending >= level.par:
        return None
    quantity = level.order_up_to - on_hand - pending
    category = level.category or rules.item_categories.get(level.item_code, DEFAULT_CATEGORY)
    draft = RequestDraft(
        request_key=f"par:{level.location}:{level.item_code}:{trigger_key}",
        origin=PAR_LEVEL,
        department=level.location,
        location=level.location,
        category=category,
        item_code=level.item_code,
        quantity=quantity,
        requested_on=requested_on,
        requested_by=SYSTEM_ACTOR,
        message_id=message_id,
        supplier=level.supplier,
        note=f"stock {on_hand} below par {level.par}; {pending} on order",
    )
    return create_request(conn, config, draft)


@dataclass(frozen=True, slots=True)
class Receipt:
    """A stored goods receipt and whether this call stored it."""

    receipt_id: int
    created: bool
    on_hand: Decimal | None


def receive_goods(
    conn: Connection,
    config: Configuration,
    *,
    receipt_key: str,
    po_number: str,
    quantity: Decimal,
    received_on: dt.date,
    received_by: str,
    message_id: int,
    lot_number: str | None = None,
) -> Receipt:
    """Record goods received against a purchase order and add them to stock.

    The same ``receipt_key`` twice records one receipt. Receiving more than
    was ordered is recorded too, with a ``receipt_exceeds_order`` work item.

    Raises:
        ProcurementError: Unknown purchase order or a quantity that is not positive.
    """
    existing = conn.execute(
        select(goods_receipts.c.id).where(goods_receipts.c.receipt_key == receipt_key)
    ).scalar()
    if existing is not None:
        return Receipt(existing, False, None)
    if quantity <= 0:
        raise ProcurementError(f"quantity {quantity} must be greater than 0")
    order = conn.execute(
        select(purchase_orders).where(purchase_orders.c.po_number == po_number)
    ).mappings().first()
    if order is None:
        raise ProcurementError(f"purchase order {po_number} not found")
    lock_stock(conn)
    now = dt.datetime.now(dt.UTC)
    receipt_id = conn.execute(
        insert(goods_receipts).values(
            receipt_key=receipt_key, purchase_order_id=order["id"], quantity=quantity,
            lot_number=lot_number, received_on=received_on, received_by=received_by,
            message_id=message_id, created_at=now,
        )
    ).inserted_primary_key[0]
    after = record_move(
        conn, move_key=f"receipt:{receipt_id}", location=order["location"],
        item_code=order["item_code"], kind="receipt", quantity=quantity,
        moved_on=received_on, goods_receipt_id=receipt_id, message_id=message_id,
    )
    received = order["received_quantity"] + quantity
    status = RECEIVED if received >= order["quantity"] else "partially_received"
    conn.execute(
        update(purchase_orders)
        .where(purchase_orders.c.id == order["id"])
        .values(received_quantity=received, status=status)
    )
    if status == RECEIVED:
        _set_status(conn, order["request_id"], RECEIVED)
    if received > order["quantity"]:
        rules = config.rule_book.in_force(received_on)
        open_item(
            conn,
            subject_key=f"receipt:{receipt_id}",
            reason=Reason.RECEIPT_EXCEEDS_ORDER,
            team=team_for(Reason.RECEIPT_EXCEEDS_ORDER, rules),
            message_id=message_id,
            detail=(f"{received} {order['item_code']} received against {po_number}, which "
                    f"ordered {order['quantity']}; return the excess or accept it"),
        )
    audit.record(conn, received_by, "procurement.receipt", "goods_receipt", receipt_id,
                 {"purchase_order_id": order["id"], "quantity": str(quantity)})
    return Receipt(receipt_id, True, after)
