"""Claim files and the claims part of a run's summary."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select

from carebridge.claims.step import HELD, RELEASED, REPLACED
from carebridge.store.schema import claims


def write_claim_files(conn: Connection, folder: Path) -> int:
    """Write each released or replaced claim's X12 to ``folder/{claim reference}.x12``.

    Returns the number of files written. Held claims have no file: nothing
    that failed a check leaves carebridge.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    rows = conn.execute(
        select(claims.c.claim_reference, claims.c.x12)
        .where(claims.c.state.in_((RELEASED, REPLACED)), claims.c.x12.is_not(None))
        .order_by(claims.c.id)
    )
    for reference, text in rows:
        (folder / f"{reference}.x12").write_text(text, encoding="utf-8", newline="")
        written += 1
    return written


def claims_summary(conn: Connection, run_id: int) -> dict[str, Any]:
    """Count the claims run ``run_id`` checked or released.

    ``validated`` counts claims that passed pyx12 and carebridge's own
    checks; ``held`` those kept back, with their reasons in ``hold_reasons``.
    """
    rows = conn.execute(
        select(claims.c.state, claims.c.validated_at, claims.c.hold_reasons,
               claims.c.frequency_code)
        .where(claims.c.run_id == run_id)
    ).all()
    reasons: Counter[str] = Counter()
    for row in rows:
        if row.state == HELD and row.hold_reasons:
            reasons.update(json.loads(row.hold_reasons))
    return {
        "count": len(rows),
        "validated": sum(1 for row in rows if row.validated_at is not None),
        "held": sum(1 for row in rows if row.state == HELD),
        "released": sum(1 for row in rows if row.state in (RELEASED, REPLACED)),
        "corrected": sum(1 for row in rows if row.frequency_code == "7"
                         and row.state in (RELEASED, REPLACED)),
        "hold_reasons": dict(sorted(reasons.items())),
    }
