"""Receipts of :func:`carebridge.engine.intake.store_batch`, checked against the rows."""

from __future__ import annotations

from sqlalchemy import Engine, select

from carebridge.engine.intake import DUPLICATE, FAILED, RECEIVED, store_batch, store_inputs
from carebridge.ingest.files.sources import (
    HL7V2,
    RawInput,
    hl7_content_digest,
    hl7_dedup_key,
    hl7_ordering_key,
    sha256,
)
from carebridge.store.bodies import read_raw
from carebridge.store.schema import message_keys, messages, work_items
from tests.integration.conftest import hl7


def raw(control_id: str, patient: str, origin: str, problem: str | None = None) -> RawInput:
    payload = hl7(
        f"MSH|^~\\&|APP|FAC|FIN|RCV|20240501120000||ADT^A04|{control_id}|P|2.5",
        f"PID|1||{patient}^^^FAC^MR||DOE^JANE",
    )
    digest = sha256(payload)
    return RawInput(HL7V2, origin, payload, digest, hl7_dedup_key(payload, digest),
                    problem=problem, dedup_digest=hl7_content_digest(payload),
                    ordering_key=hl7_ordering_key(payload))


def test_receipts_match_the_stored_rows(engine: Engine) -> None:
    first = [raw("C1", "P1", "a"), raw("C2", "P2", "b")]
    with engine.begin() as conn:
        earlier = store_batch(conn, first, source="test")
    batch = [
        raw("C3", "P3", "c"),
        raw("C1", "P1", "d"),           # resend of an earlier batch's message
        raw("C2", "OTHER", "e"),        # control id reused across batches
        raw("C3", "P3", "f"),           # resend within the batch
        raw("C3", "CHANGED", "g"),      # control id reused within the batch
        raw("C3", "CHANGED", "h"),      # resend of that failed one, same batch
        raw("C4", "P4", "i", problem="broken"),
    ]
    with engine.begin() as conn:
        receipts = store_batch(conn, batch, source="test", run_id=7)
    with engine.begin() as conn:
        resent = store_batch(conn, [raw("C2", "OTHER", "j")], source="test")

    assert [r.state for r in earlier] == [RECEIVED, RECEIVED]
    assert [r.state for r in receipts] == [
        RECEIVED, DUPLICATE, FAILED, DUPLICATE, FAILED, DUPLICATE, FAILED]
    ids = [r.message_id for r in receipts]
    assert ids == sorted(ids)
    assert ids[0] > earlier[1].message_id
    assert receipts[1].duplicate_of == earlier[0].message_id
    assert receipts[1].received_at.replace(tzinfo=None) == (
        earlier[0].received_at.replace(tzinfo=None))
    assert receipts[2].reason == "control_id_reused"
    assert receipts[3].duplicate_of == ids[0]
    assert receipts[3].reason is None
    assert receipts[4].reason == "control_id_reused"
    assert receipts[5].duplicate_of == ids[4]
    assert receipts[5].reason == "control_id_reused"
    assert receipts[6].reason == "malformed_input"
    # A resend of a message failed for reusing a key repeats that failure.
    assert resent[0].state == DUPLICATE
    assert resent[0].duplicate_of == ids[2]
    assert resent[0].reason == "control_id_reused"

    with engine.connect() as conn:
        rows = {row.id: row for row in conn.execute(select(messages))}
        keys = dict(conn.execute(select(message_keys.c.dedup_key, message_keys.c.message_id)).all())
        failed = set(conn.execute(select(work_items.c.message_id)).scalars())
        assert read_raw(conn, ids[6]) == batch[6].raw
    for receipt, item in zip(receipts, batch, strict=True):
        row = rows[receipt.message_id]
        assert (row.state, row.duplicate_of, row.origin, row.ordering_key, row.run_id) == (
            receipt.state, receipt.duplicate_of, item.origin, item.ordering_key, 7)
        assert (row.processed_run_id is None) == (receipt.state == RECEIVED)
    assert failed == {ids[2], ids[4], ids[6]}
    assert keys["hl7v2|APP|FAC|C3"] == ids[0]
    assert keys["hl7v2|APP|FAC|C4"] == ids[6]


def test_store_inputs_hands_back_receipts_in_input_order(engine: Engine) -> None:
    inputs = [raw(f"K{n}", f"P{n % 3}", f"o{n}") for n in range(7)] + [raw("K1", "P1", "x")]
    receipts: list = []
    result = store_inputs(engine, inputs, source="test", batch_size=3, receipts=receipts)
    assert (result.read, result.stored, result.duplicates, result.failed) == (8, 7, 1, 0)
    assert [r.state for r in receipts] == [RECEIVED] * 7 + [DUPLICATE]
    assert receipts[-1].duplicate_of == receipts[1].message_id
