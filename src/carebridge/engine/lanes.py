"""Lanes: how messages are spread over workers without reordering a patient.

Every message gets the lane of its ordering key (the patient it is about).
A worker processes the messages of the lanes it has locked, in id order, so
two messages about one patient are never processed at the same time or out
of order, while different patients run in parallel.
"""

from __future__ import annotations

import zlib

from sqlalchemy import Connection, insert, select

from carebridge.store.schema import lanes

LANE_COUNT = 64
"""Number of lanes. More lanes than workers keeps the load even when a few
patients send most of the messages."""


def lane_of(ordering_key: str | None) -> int:
    """Return the lane of ``ordering_key``; messages without one share lane 0."""
    if not ordering_key:
        return 0
    return zlib.crc32(ordering_key.encode("utf-8")) % LANE_COUNT


def ensure_lanes(conn: Connection) -> None:
    """Insert the lane rows that do not exist yet."""
    present = set(conn.execute(select(lanes.c.lane)).scalars())
    missing = [{"lane": lane} for lane in range(LANE_COUNT) if lane not in present]
    if missing:
        conn.execute(insert(lanes), missing)
