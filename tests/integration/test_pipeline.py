"""The pipeline on a real SQLite database: store, dedup, charge, fail, journal."""

from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal
from pathlib import Path

from sqlalchemy import Engine, func, select

from carebridge.config.model import Configuration
from carebridge.engine.intake import store_inputs
from carebridge.engine.job import JobOptions, run_job
from carebridge.engine.lanes import ensure_lanes
from carebridge.engine.posting import post_journals
from carebridge.engine.processor import claim_batch, process_pending
from carebridge.engine.waits import resume_waits
from carebridge.ingest.files.sources import split_path
from carebridge.store.schema import (
    charge_lines,
    encounters,
    journal_lines,
    journals,
    messages,
    patients,
    services,
    waits,
    work_items,
)

from .conftest import DEMO, hl7, run_at_once

AS_OF = dt.date(2024, 6, 1)

MESSAGE_X = hl7(
    "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|CTL0011|P|2.5",
    "EVN|P03|20240501120000",
    "PID|1||MRN0011^^^SENDFAC^MR||TESTPATIENT^THETA",
    "PV1|1|O|CLINIC1||||||||||||||||VIS0011",
    "FT1|1|TXN0011||20240501|20240501|CG|99213^OFFICE VISIT EST^CPT|||1|135.50&USD|135.50&USD",
)
MESSAGE_Y = hl7(
    "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501121500||DFT^P03|CTL0011|P|2.5",
    "EVN|P03|20240501121500",
    "PID|1||MRN0011^^^SENDFAC^MR||TESTPATIENT^THETA",
    "PV1|1|O|CLINIC1||||||||||||||||VIS0011",
    "FT1|1|TXN0012||20240501|20240501|CG|99212^OFFICE VISIT EST^CPT|||1|80.00&USD|80.00&USD",
)
MESSAGE_X_NEW_CONTROL_ID = MESSAGE_X.replace(b"|CTL0011|", b"|CTL0011R|")


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def ingest(engine: Engine, config: Configuration, *paths: Path) -> None:
    for path in paths:
        store_inputs(engine, split_path(path), source="test")
    process_pending(engine, config, as_of=AS_OF)


def count(engine: Engine, table, *where) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def test_resent_message_posts_once(engine: Engine, config: Configuration, tmp_path: Path) -> None:
    first = write(tmp_path, "x1.hl7", MESSAGE_X)
    again = write(tmp_path, "x2.hl7", MESSAGE_X)
    ingest(engine, config, first, again)

    assert count(engine, messages) == 2
    assert count(engine, messages, messages.c.state == "duplicate") == 1
    with engine.connect() as conn:
        amounts = conn.execute(select(charge_lines.c.amount)).scalars().all()
    assert amounts == [Decimal("135.50")]


def test_new_control_id_same_business_key(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    ingest(
        engine,
        config,
        write(tmp_path, "x.hl7", MESSAGE_X),
        write(tmp_path, "x-resent.hl7", MESSAGE_X_NEW_CONTROL_ID),
    )
    assert count(engine, charge_lines) == 1
    assert count(engine, services, services.c.outcome == "duplicate") == 1


def test_control_id_reused_is_work_item(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    ingest(engine, config, write(tmp_path, "x.hl7", MESSAGE_X), write(tmp_path, "y.hl7", MESSAGE_Y))

    with engine.connect() as conn:
        reasons = conn.execute(select(work_items.c.reason)).scalars().all()
        total = sum(conn.execute(select(charge_lines.c.amount)).scalars(), Decimal(0))
    assert reasons == ["control_id_reused"]
    assert total == Decimal("135.50")
    assert count(engine, messages, messages.c.state == "failed") == 1


def test_poison_message_does_not_block(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    bad_quantity = MESSAGE_Y.replace(b"|CTL0011|", b"|CTL0099|").replace(
        b"|||1|80.00", b"|||ONE|80.00"
    )
    ingest(
        engine,
        config,
        write(tmp_path, "a-bad.hl7", bad_quantity),
        write(tmp_path, "b-good.hl7", MESSAGE_X),
    )
    with engine.connect() as conn:
        states = dict(conn.execute(select(messages.c.origin, messages.c.state)).all())
        item = conn.execute(select(work_items.c.reason, work_items.c.detail)).one()
    assert sorted(states.values()) == ["failed", "processed"]
    assert item.reason == "malformed_input"
    assert "FT1" in item.detail
    assert count(engine, charge_lines) == 1


def test_unknown_code_becomes_work_item(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    unknown = MESSAGE_X.replace(b"99213^OFFICE VISIT EST^CPT", b"ZZ999^MYSTERY^LOCAL")
    ingest(engine, config, write(tmp_path, "u.hl7", unknown))
    with engine.connect() as conn:
        item = conn.execute(select(work_items.c.reason, work_items.c.team)).one()
    assert item.reason == "unknown_code"
    assert item.team == "revenue_cycle"
    assert count(engine, charge_lines) == 0


def test_explicit_null_clears_phone(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    message_a = hl7(
        "MSH|^~\\&|SENDAPP|SENDFAC|RCVAPP|RCVFAC|20240501120000||ADT^A08|CTL0006A|P|2.5",
        "EVN|A08|20240501120000",
        "PID|1||MRN0006^^^SENDFAC^MR||TESTPATIENT^ETA||19750505|M|||1 TEST ST^^TESTVILLE^TS^00001||555-0100|555-0199",
        "PV1|1|O|CLINIC1",
    )
    message_b = hl7(
        "MSH|^~\\&|SENDAPP|SENDFAC|RCVAPP|RCVFAC|20240501130000||ADT^A08|CTL0006B|P|2.5",
        "EVN|A08|20240501130000",
        "PID|1||MRN0006^^^SENDFAC^MR||TESTPATIENT^ETA||19750505|M|||1 TEST ST^^TESTVILLE^TS^00001||\"\"",
        "PV1|1|O|CLINIC1",
    )
    ingest(engine, config, write(tmp_path, "a.hl7", message_a), write(tmp_path, "b.hl7", message_b))
    with engine.connect() as conn:
        row = conn.execute(select(patients).where(patients.c.patient_id == "MRN0006")).one()
        stored = [value for value in conn.execute(select(patients)).one()]
    assert row.home_phone is None
    assert row.business_phone == "555-0199"
    assert '""' not in [value for value in stored if isinstance(value, str)]


def test_journals_balance_and_trace(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    ingest(engine, config, write(tmp_path, "x.hl7", MESSAGE_X))
    result = post_journals(engine, config)
    again = post_journals(engine, config)

    assert result.journals == 1
    assert again.journals == 0
    with engine.connect() as conn:
        journal = conn.execute(select(journals)).one()
        lines = conn.execute(select(journal_lines)).all()
        message_id = conn.execute(select(messages.c.id)).scalar_one()
    assert journal.total_debit == journal.total_credit == Decimal("135.50")
    assert {line.source_message_id for line in lines} == {message_id}
    assert count(engine, charge_lines, charge_lines.c.journal_id.is_(None)) == 0


def test_restart_processes_stored_messages(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    # Stored but never processed, as after a crash between the two steps.
    store_inputs(engine, split_path(write(tmp_path, "x.hl7", MESSAGE_X)), source="test")
    assert count(engine, messages, messages.c.state == "received") == 1

    process_pending(engine, config, as_of=AS_OF)

    assert count(engine, messages, messages.c.state == "received") == 0
    assert count(engine, charge_lines) == 1


def test_no_patient_data_in_logs(
    engine: Engine, config: Configuration, tmp_path: Path, caplog
) -> None:
    name = b"ZZYZXFAMILY^QWERTYGIVEN"
    identifier = b"MRN8675309"
    message = MESSAGE_X.replace(b"TESTPATIENT^THETA", name).replace(b"MRN0011", identifier)
    bad = MESSAGE_Y.replace(b"TESTPATIENT^THETA", name).replace(b"MRN0011", identifier)
    bad = bad.replace(b"|CTL0011|", b"|CTL0077|").replace(b"80.00&USD|80.00", b"8O.00&USD|80.00")
    caplog.set_level(logging.DEBUG)
    run_job(
        engine,
        config,
        JobOptions(paths=[write(tmp_path, "p.hl7", message), write(tmp_path, "q.hl7", bad)],
                   out_dir=tmp_path / "out", as_of=AS_OF),
    )
    text = "\n".join(
        f"{record.getMessage()} {record.__dict__}" for record in caplog.records
    )
    assert caplog.records, "the run logs its start and stop"
    for secret in ("ZZYZXFAMILY", "QWERTYGIVEN", "MRN8675309", "8675309"):
        assert secret not in text


def test_reused_transaction_id_conflict(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    changed = MESSAGE_X_NEW_CONTROL_ID.replace(b"135.50&USD|135.50&USD", b"500.00&USD|500.00&USD")
    ingest(engine, config, write(tmp_path, "x.hl7", MESSAGE_X), write(tmp_path, "c.hl7", changed))

    with engine.connect() as conn:
        amounts = conn.execute(select(charge_lines.c.amount)).scalars().all()
        reasons = conn.execute(select(work_items.c.reason)).scalars().all()
    assert amounts == [Decimal("135.50")]
    assert reasons == ["service_key_conflict"]


def test_batch_sees_earlier_messages(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    # The ADT registering the visit and the charge for it share one batch.
    adt = hl7(
        "MSH|^~\\&|ADTSYS|SENDFAC|FINAPP|RCVFAC|20240501110000||ADT^A04|CTL0500|P|2.5",
        "EVN|A04|20240501110000",
        "PID|1||MRN0500^^^SENDFAC^MR||TESTPATIENT^OMEGA",
        "PV1|1|O|CLINIC1||||||||||||||||VIS0500",
    )
    charge = (
        MESSAGE_X.replace(b"VIS0011", b"VIS0500")
        .replace(b"TXN0011", b"TXN0500")
        .replace(b"MRN0011", b"MRN0500")
    )
    ingest(engine, config, write(tmp_path, "a.hl7", adt), write(tmp_path, "b.hl7", charge))
    assert count(engine, charge_lines, charge_lines.c.encounter_id == "VIS0500") == 1


SYNTHEA = DEMO / "data" / "synthea" / "csv"


def synthea_rows(name: str, predicate) -> bytes:
    lines = (SYNTHEA / name).read_bytes().splitlines(keepends=True)
    return lines[0] + b"".join(line for line in lines[1:] if predicate(line))


def test_charge_waits_for_its_encounter(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    # A CBC (SNOMED 9564003, priced in the crosswalk) documented before the
    # encounters export that registers its visit has been received.
    procedures = synthea_rows("procedures.csv", lambda line: b",9564003," in line)
    first = procedures.splitlines()[1].decode()
    encounter_id = first.split(",")[3]
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "procedures.csv").write_bytes(
        procedures.splitlines(keepends=True)[0] + procedures.splitlines(keepends=True)[1]
    )
    ingest(engine, config, tmp_path / "early" / "procedures.csv")
    with engine.connect() as conn:
        outcome = conn.execute(select(services.c.outcome)).scalar_one()
        parked = conn.execute(select(waits.c.state, waits.c.wait_key)).one()
    assert outcome == "waiting"
    assert tuple(parked) == ("waiting", encounter_id)
    assert count(engine, work_items) == 0

    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "encounters.csv").write_bytes(
        synthea_rows("encounters.csv", lambda line: line.startswith(encounter_id.encode()))
    )
    ingest(engine, config, tmp_path / "late" / "encounters.csv")
    with engine.connect() as conn:
        procedure = conn.execute(
            select(services.c.outcome).where(services.c.kind == "procedure")
        ).scalar_one()
        state = conn.execute(select(waits.c.state)).scalar_one()
        keys = conn.execute(select(charge_lines.c.service_key)).scalars().all()
    assert procedure == "charged"
    assert state == "resumed"
    assert any(":9564003:" in key for key in keys)


def test_wait_expires_into_work_item(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    procedures = synthea_rows("procedures.csv", lambda line: b",9564003," in line)
    path = tmp_path / "procedures.csv"
    path.write_bytes(b"".join(procedures.splitlines(keepends=True)[:2]))
    ingest(engine, config, path)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=config.rules.encounter_wait_hours + 1)
    result = resume_waits(engine, config, now=later, as_of=AS_OF)

    assert result.expired == 1
    with engine.connect() as conn:
        item = conn.execute(select(work_items.c.reason, work_items.c.detail)).one()
        outcome = conn.execute(select(services.c.outcome)).scalar_one()
    assert item.reason == "encounter_not_found"
    assert "hours" in item.detail
    assert outcome == "work_item"
    assert count(engine, charge_lines) == 0


def test_posted_charge_enqueued_for_billing(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    import dataclasses

    from carebridge.config.model import DestinationConfig
    from carebridge.store.schema import deliveries

    billing = DestinationConfig(
        name="billing", type="http", kinds=("charge_line",),
        settings={"url": "http://127.0.0.1:9/charges", "timeout_seconds": 1},
    )
    with_billing = dataclasses.replace(config, destinations=(billing,))
    ingest(engine, with_billing, write(tmp_path, "x.hl7", MESSAGE_X))
    assert count(engine, deliveries) == 0  # promised only once journaled
    post_journals(engine, with_billing)
    post_journals(engine, with_billing)
    with engine.connect() as conn:
        rows = conn.execute(select(deliveries.c.kind, deliveries.c.destination)).all()
    assert [tuple(row) for row in rows] == [("charge_line", "billing")]


def test_visit_number_reused_for_other_patient(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    first = hl7(
        "MSH|^~\\&|ADTSYS|HOSPA|FINAPP|RCVFAC|20240501110000||ADT^A01|CTL0800|P|2.5",
        "PID|1||MRNA1^^^HOSPA^MR||TESTPATIENT^ALPHA",
        "PV1|1|I|PREOP||||||||||||||||V900",
    )
    second = hl7(
        "MSH|^~\\&|ADTSYS|HOSPB|FINAPP|RCVFAC|20240501120000||ADT^A01|CTL0801|P|2.5",
        "PID|1||MRNB1^^^HOSPB^MR||TESTPATIENT^BETA",
        "PV1|1|I|ICU||||||||||||||||V900",
    )
    ingest(engine, config, write(tmp_path, "a.hl7", first), write(tmp_path, "b.hl7", second))
    with engine.connect() as conn:
        encounter = conn.execute(
            select(encounters.c.patient_id, encounters.c.department)
            .where(encounters.c.encounter_id == "V900")
        ).one()
        items = conn.execute(select(work_items.c.reason, work_items.c.team)).all()
    assert tuple(encounter) == ("MRNA1", "PREOP")
    assert [tuple(item) for item in items] == [("encounter_patient_conflict", "integration")]


def test_claims_follow_arrival_order(
    engine: Engine, tmp_path: Path
) -> None:
    # Twelve patients fall in many lanes. One worker claiming one message at
    # a time must take them in the order they were stored.
    for number in range(12):
        message = hl7(
            "MSH|^~\\&|ADTSYS|HOSPA|FINAPP|RCVFAC|20240501110000||ADT^A01|"
            f"CTL31{number:02d}|P|2.5",
            f"PID|1||MRN31{number:02d}^^^HOSPA^MR||TESTPATIENT^ORDER",
            f"PV1|1|I|ICU||||||||||||||||V31{number:02d}",
        )
        store_inputs(engine, split_path(write(tmp_path, f"o{number}.hl7", message)),
                     source="test")
    with engine.connect() as conn:
        stored = conn.execute(select(messages.c.id).order_by(messages.c.id)).scalars().all()
        lanes_used = set(conn.execute(select(messages.c.lane)).scalars())
    assert len(lanes_used) > 4
    with engine.begin() as conn:
        ensure_lanes(conn)
    claimed: list[int] = []
    while True:
        with engine.begin() as conn:
            rows = claim_batch(conn, 1)
            if not rows:
                break
            claimed.append(rows[0].id)
            conn.execute(
                messages.update().where(messages.c.id == rows[0].id).values(state="processed")
            )
    assert claimed == stored


def test_concurrent_posting_numbers_batches_apart(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    from carebridge.store.schema import charge_lines as lines_table

    for number in range(40):
        message = (
            MESSAGE_X.replace(b"CTL0011", f"CTL2{number:03d}".encode())
            .replace(b"TXN0011", f"TXN2{number:03d}".encode())
        )
        store_inputs(engine, split_path(write(tmp_path, f"m{number}.hl7", message)),
                     source="test")
    process_pending(engine, config, as_of=AS_OF)
    errors = run_at_once(lambda: post_journals(engine, config, slice_size=3), threads=3)
    assert errors == []
    assert count(engine, lines_table, lines_table.c.journal_id.is_(None)) == 0
    assert count(engine, journal_lines) == 2 * count(engine, lines_table)
