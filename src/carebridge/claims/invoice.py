"""Released claims as deliveries of kind ``claim``, which an ERP books as customer invoices.

When a claim is released, the claims step enqueues it, in the same
transaction, to every destination whose ``kinds`` list ``claim``
(:func:`enqueue_claim`). The payload carries what an invoice to the payer
needs: the claim's reference, frequency (1 original, 7 replacement), payer,
dates, total and service lines, and for a replacement the claim it
replaces with that claim's lines, so the destination can credit it.

The patient is named by id only. Names, birth dates and addresses stay in
carebridge.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, select

from carebridge.config.model import Configuration
from carebridge.engine.deliveries import enqueue, idempotency_key
from carebridge.store.schema import charge_lines, claim_lines, claims

CLAIM = "claim"
"""The delivery kind of a released claim."""


def _amount(value: Decimal) -> str:
    cents = value.quantize(Decimal("0.01"))
    return str(cents) if cents == value else str(value.normalize())


def _lines(conn: Connection, config: Configuration, claim_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(claim_lines)
        .where(claim_lines.c.claim_id == claim_id)
        .order_by(claim_lines.c.line_no)
    ).all()
    first_charge = {
        row.id: int(row.charge_line_ids.split(",")[0]) for row in rows
    }
    charges = {
        charge.id: charge
        for charge in conn.execute(
            select(
                charge_lines.c.id, charge_lines.c.charge_code, charge_lines.c.department
            ).where(charge_lines.c.id.in_(sorted(set(first_charge.values()))))
        )
    }
    lines = []
    for row in rows:
        charge = charges.get(first_charge[row.id])
        charge_code = charge.charge_code if charge is not None else None
        department = charge.department if charge is not None else None
        item = config.chargemaster.get(charge_code) if charge_code else None
        code = row.procedure_code or row.revenue_code
        lines.append(
            {
                "line_no": row.line_no,
                "code": code,
                "procedure_code": row.procedure_code,
                "revenue_code": row.revenue_code,
                "charge_code": charge_code,
                "description": item.description if item is not None else code,
                "units": str(row.units),
                "amount": _amount(row.amount),
                "service_date": row.service_date.isoformat(),
                "department": department,
                "cost_center": (
                    config.departments[department].cost_center
                    if department in config.departments
                    else None
                ),
            }
        )
    return lines


def claim_payload(conn: Connection, config: Configuration, claim_id: int) -> dict[str, Any]:
    """Return the delivery payload of a released claim, amounts as text."""
    claim = conn.execute(select(claims).where(claims.c.id == claim_id)).one()
    if config.billing is None:
        raise ValueError(
            "cannot build a claim payload without billing.yaml; add it to the "
            "configuration folder, or remove claim from the destination's kinds"
        )
    payer = config.billing.file.payer
    lines = _lines(conn, config, claim_id)
    replaces = None
    if claim.replaces_claim_id is not None:
        prior = conn.execute(
            select(claims).where(claims.c.id == claim.replaces_claim_id)
        ).one()
        replaces = {
            "id": prior.id,
            "claim_reference": prior.claim_reference,
            "total": _amount(prior.total),
            "lines": _lines(conn, config, prior.id),
        }
    released = claim.released_at or dt.datetime.now(dt.UTC)
    return {
        "kind": CLAIM,
        "claim": {
            "id": claim.id,
            "claim_reference": claim.claim_reference,
            "patient_control_number": claim.patient_control_number,
            "claim_type": claim.kind,
            "version": claim.version,
            "frequency_code": claim.frequency_code,
            "encounter_id": claim.encounter_id,
            "patient_id": claim.patient_id,
            "payer_id": payer.payer_id,
            "payer_name": payer.name,
            "service_date": min(line["service_date"] for line in lines) if lines else None,
            "released_on": released.date().isoformat(),
            "currency": claim.currency,
            "total": _amount(claim.total),
            # carebridge's receivable account, which its journals debit at
            # charge time: the invoice moves the claim total out of it.
            "receivable_account": config.receivable_account,
            "lines": lines,
            "replaces": replaces,
        },
    }


def enqueue_claim(
    conn: Connection,
    config: Configuration,
    claim_id: int,
    *,
    now: dt.datetime | None = None,
) -> list[int]:
    """Enqueue a released claim for every destination whose ``kinds`` list ``claim``.

    Call in the transaction that releases the claim. The key is the claim
    reference, so a claim is promised once per destination.

    Returns:
        The delivery ids, one per destination.
    """
    targets = [d for d in config.destinations if CLAIM in d.kinds]
    if not targets:
        return []
    payload = claim_payload(conn, config, claim_id)
    reference = payload["claim"]["claim_reference"]
    return [
        enqueue(
            conn,
            target.name,
            CLAIM,
            claim_id,
            idempotency_key(target.name, CLAIM, reference),
            payload,
            now=now,
        )
        for target in targets
    ]
