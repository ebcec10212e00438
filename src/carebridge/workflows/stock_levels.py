"""Stock levels and stock moves, the primitives of the stock and procurement steps.

Moves and levels are written under one lock (a PostgreSQL advisory lock;
SQLite has one writer at a time), so two processes never read the same
level and both change it.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from sqlalchemy import Connection, insert, select, text, update

from carebridge.store.schema import stock_levels, stock_moves

STOCK_LOCK = 0x73746F6B  # "stok": PostgreSQL advisory lock of stock levels


def lock_stock(conn: Connection, *, wait: bool = True) -> bool:
    """Take the stock lock for the rest of the transaction; return whether it was taken.

    Without ``wait`` the caller skips its work when another process has the lock. SQLite
    needs no lock because its writers are serialised already.
    """
    if conn.dialect.name != "postgresql":
        return True
    if wait:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": STOCK_LOCK})
        return True
    return bool(
        conn.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": STOCK_LOCK}).scalar()
    )


def on_hand(conn: Connection, location: str, item_code: str) -> Decimal:
    """Return stock on hand of an item at a location; zero when never counted or received."""
    value = conn.execute(
        select(stock_levels.c.on_hand).where(
            stock_levels.c.location == location, stock_levels.c.item_code == item_code
        )
    ).scalar()
    return value if value is not None else Decimal(0)


def record_move(
    conn: Connection,
    *,
    move_key: str,
    location: str,
    item_code: str,
    kind: str,
    quantity: Decimal,
    moved_on: dt.date,
    supply_issue_id: int | None = None,
    goods_receipt_id: int | None = None,
    message_id: int | None = None,
) -> Decimal | None:
    """Insert a stock move and update the level; call under :func:`lock_stock`.

    Returns:
        Stock on hand after the move, or ``None`` when ``move_key`` was moved before.
    """
    exists = conn.execute(
        select(stock_moves.c.id).where(stock_moves.c.move_key == move_key)
    ).scalar()
    if exists is not None:
        return None
    now = dt.datetime.now(dt.UTC)
    before = conn.execute(
        select(stock_levels.c.on_hand).where(
            stock_levels.c.location == location, stock_levels.c.item_code == item_code
        )
    ).scalar()
    after = (before if before is not None else Decimal(0)) + quantity
    if before is None:
        conn.execute(
            insert(stock_levels).values(
                location=location, item_code=item_code, on_hand=after, updated_at=now
            )
        )
    else:
        conn.execute(
            update(stock_levels)
            .where(stock_levels.c.location == location, stock_levels.c.item_code == item_code)
            .values(on_hand=after, updated_at=now)
        )
    conn.execute(
        insert(stock_moves).values(
            move_key=move_key,
            location=location,
            item_code=item_code,
            kind=kind,
            quantity=quantity,
            on_hand_after=after,
            moved_on=moved_on,
            supply_issue_id=supply_issue_id,
            goods_receipt_id=goods_receipt_id,
            message_id=message_id,
            created_at=now,
        )
    )
    return after
