"""Stock on hand per location: counts, issues and goods receipts as stock moves.

A supply issue (see :mod:`carebridge.workflows.supplies`) takes stock from
the location of its department. The stock step turns each issue into a
stock move, once (``move_key`` ``issue:{supply issue id}``), unless it
would take stock on hand below zero (a ``no_stock`` work item) or its
quantity is above the rules' limit (``quantity_too_high``). Both are
retried on every pass, so an issue held for stock moves as soon as a count
or a goods receipt makes the stock available, and its work item is closed.
A move that leaves stock on hand below the par level raises a procurement
request (see :func:`carebridge.workflows.procurement.raise_par_request`).

Stock moves are written under the lock of
:func:`carebridge.workflows.stock_levels.lock_stock`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import Connection, select

from carebridge.config.model import Configuration
from carebridge.store.schema import stock_moves, supply_issues, work_items
from carebridge.workflows import procurement
from carebridge.workflows.reasons import Reason
from carebridge.workflows.stock_levels import on_hand, record_move
from carebridge.workflows.work import close_item, item_status, open_item, team_for

log = logging.getLogger(__name__)

@dataclass(slots=True)
class StockResult:
    """Counts of one stock pass."""

    counts: int = 0
    issued: int = 0
    held: int = 0
    requests: int = 0


def apply_counts(conn: Connection, config: Configuration) -> int:
    """Apply each configured stock count once: a move that sets on hand to the count."""
    applied = 0
    for count in config.stock_counts:
        key = f"count:{count.location}:{count.item_code}:{count.counted_on.isoformat()}"
        difference = count.quantity - on_hand(conn, count.location, count.item_code)
        after = record_move(
            conn,
            move_key=key,
            location=count.location,
            item_code=count.item_code,
            kind="count",
            quantity=difference,
            moved_on=count.counted_on,
        )
        if after is not None:
            applied += 1
            log.info("stock count applied", extra={"action": "stock_count",
                                                   "location": count.location,
                                                   "item_code": count.item_code})
    return applied


def tracks_stock(config: Configuration) -> bool:
    """Return whether the configuration keeps stock: it has stock counts or par levels.

    Without either, every location would have nothing on hand and every
    issue would be held, so a configuration that keeps no stock moves none.
    """
    return bool(config.stock_counts) or any(
        rules.par_levels for rules in config.rule_book.versions
    )


def move_issues(
    conn: Connection, config: Configuration, *, batch_size: int = 1000
) -> StockResult:
    """Turn supply issues without a stock move into moves, or hold them with a work item.

    Issues are taken in id order, so stock is consumed in the order the
    usages were processed. Call under :func:`~carebridge.workflows.stock_levels.lock_stock`.
    """
    result = StockResult()
    if not tracks_stock(config):
        return result
    moved = select(stock_moves.c.supply_issue_id).where(
        stock_moves.c.supply_issue_id.is_not(None)
    )
    after = 0
    # Issues held for stock are tried again on every pass, and a worker
    # passes every loop. Stock on hand is read once per location and item
    # in a pass, and an issue already held is not looked up again, so a
    # pass costs a query per item rather than two per held issue.
    levels: dict[tuple[str, str], Decimal] = {}
    while True:
        rows = conn.execute(
            select(supply_issues)
            .where(supply_issues.c.id > after, supply_issues.c.id.not_in(moved))
            .order_by(supply_issues.c.id)
            .limit(batch_size)
        ).mappings().all()
        if not rows:
            return result
        held_subjects = _held_for_stock(conn, [f"supply:{row['usage_key']}" for row in rows])
        for issue in rows:
            if _move_issue(conn, config, issue, result, levels, held_subjects):
                result.issued += 1
            else:
                result.held += 1
        after = rows[-1]["id"]


def _held_for_stock(conn: Connection, subjects: list[str]) -> set[str]:
    """Return the subjects among ``subjects`` that already have a no_stock work item."""
    return set(conn.execute(
        select(work_items.c.subject_key).where(
            work_items.c.reason == Reason.NO_STOCK.value,
            work_items.c.subject_key.in_(subjects))
    ).scalars())


def _move_issue(conn: Connection, config: Configuration, issue, result: StockResult,
                levels: dict[tuple[str, str], Decimal], held_subjects: set[str]) -> bool:
    rules = config.rule_book.in_force(issue["service_date"])
    subject = f"supply:{issue['usage_key']}"
    location, item_code, quantity = issue["department"], issue["item_code"], issue["quantity"]

    limit = rules.validation.max_issue_quantity
    if quantity > limit:
        status = item_status(conn, subject, Reason.QUANTITY_TOO_HIGH)
        if status == "rejected":
            return False
        if status not in ("resolved", "approved"):
            open_item(
                conn, subject_key=subject, reason=Reason.QUANTITY_TOO_HIGH,
                team=team_for(Reason.QUANTITY_TOO_HIGH, rules),
                message_id=issue["source_message_id"],
                detail=(f"issue of {quantity} {item_code} at {location} is above the limit "
                        f"{limit} of rules {rules.version}; confirm the quantity (resolve or "
                        "approve) or correct the usage"),
                amount_at_risk=issue["total_cost"],
            )
            return False

    level_key = (location, item_code)
    available = levels.get(level_key)
    if available is None:
        available = levels[level_key] = on_hand(conn, location, item_code)
    if available < quantity:
        if subject in held_subjects:
            return False  # its no_stock item exists; the item closes when stock covers it
        open_item(
            conn, subject_key=subject, reason=Reason.NO_STOCK,
            team=team_for(Reason.NO_STOCK, rules),
            message_id=issue["source_message_id"],
            detail=(f"issue of {quantity} {item_code} at {location} exceeds stock on hand "
                    f"{available}; it moves when a count or goods receipt covers it"),
            amount_at_risk=issue["total_cost"],
        )
        return False

    after = record_move(
        conn,
        move_key=f"issue:{issue['id']}",
        location=location,
        item_code=item_code,
        kind="issue",
        quantity=-quantity,
        moved_on=issue["service_date"],
        supply_issue_id=issue["id"],
        message_id=issue["source_message_id"],
    )
    if after is None:
        levels.pop(level_key, None)  # another pass moved it; read the level again
        return True
    levels[level_key] = after
    close_item(conn, subject, Reason.NO_STOCK, f"stock available; issued by move issue:{issue['id']}")

    level = rules.par_levels.get((location, item_code))
    if level is not None and after < level.par:
        request_id = procurement.raise_par_request(
            conn, config, rules, level,
            on_hand=after,
            trigger_key=f"issue:{issue['id']}",
            message_id=issue["source_message_id"],
            requested_on=issue["service_date"],
        )
        if request_id is not None:
            result.requests += 1
    return True
