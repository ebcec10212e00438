"""Claims on the bundled real data, on SQLite and PostgreSQL.

The 837 files are validated here with pyx12 directly, not through
carebridge's own wrapper, and claim totals are compared with the charge
lines read straight from the database.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pyx12.params
import pyx12.x12n_document
from sqlalchemy import Engine, select, update

from carebridge.claims import step as claims_step
from carebridge.claims.step import check_encounters, release_ready, run_claims
from carebridge.config.model import Configuration
from carebridge.engine.intake import store_inputs
from carebridge.engine.job import JobOptions, run_job
from carebridge.engine.worker import Worker, WorkerOptions
from carebridge.ingest.files.sources import split_path
from carebridge.store.db import open_engine, sqlite_url
from carebridge.store.schema import (
    charge_lines,
    claim_lines,
    claims,
    encounters,
    work_items,
)

from .conftest import DEMO, run_at_once

SYNTHEA = DEMO / "data" / "synthea" / "csv"
PATIENT = b"515991e2-40dd-22c1-c377-e0b71ad973b9"
ENCOUNTER = "51c2279a-5782-46a1-a0f0-92611e14de51"
LATE_CODE = b",169230002,"  # ultrasound scan for fetal viability, priced 76815


def pyx12_accepts(text: str) -> tuple[bool, str]:
    """Validate X12 text with pyx12; return its verdict and its error report."""
    report = io.StringIO()
    valid = pyx12.x12n_document.x12n_document(
        pyx12.params.params(), io.StringIO(text), None, None, None, report
    )
    return valid, report.getvalue()


def elements(text: str, segment: str) -> list[list[str]]:
    return [s.strip().split("*") for s in text.split("~") if s.strip().startswith(segment + "*")]


def charge_totals(engine: Engine) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = defaultdict(Decimal)
    with engine.connect() as conn:
        for encounter_id, amount in conn.execute(
            select(charge_lines.c.encounter_id, charge_lines.c.amount)
        ):
            totals[encounter_id] += amount
    return totals


def test_demo_claims_validate_and_balance(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    summary = run_job(engine, config, JobOptions(paths=[DEMO / "data"], out_dir=out))
    with engine.connect() as conn:
        rows = conn.execute(select(claims)).all()
        closed_with_charges = set(conn.execute(
            select(charge_lines.c.encounter_id)
            .join(encounters, encounters.c.encounter_id == charge_lines.c.encounter_id)
            .where(encounters.c.end.is_not(None))
        ).scalars())
        classes = dict(conn.execute(
            select(encounters.c.encounter_id, encounters.c.encounter_class)
        ).all())
        claim_work = conn.execute(
            select(work_items.c.subject_key, work_items.c.reason, work_items.c.status)
            .where(work_items.c.subject_key.like("claim:%"))
        ).all()

    released = [row for row in rows if row.state == "released"]
    held = [row for row in rows if row.state == "held"]
    figures = summary["claims"]
    assert figures["count"] == len(rows) == len(closed_with_charges)
    assert {row.encounter_id for row in rows} == closed_with_charges
    assert figures["validated"] == len(released)
    assert figures["held"] == len(held)
    assert figures["validated"] + figures["held"] == figures["count"]
    assert len(released) >= 50
    assert {row.kind for row in released} == {"837P", "837I"}

    # Every emitted file passes pyx12 and is a released claim; held ones emit nothing.
    files = sorted((out / "claims").glob("*.x12"))
    assert [f.stem for f in files] == sorted(row.claim_reference for row in released)
    valid, report = pyx12_accepts("".join(f.read_text() for f in files))
    assert valid, report
    assert all(row.x12 is None for row in held)

    # CLM02 equals the sum of the encounter's charge lines to the cent, and its lines.
    totals = charge_totals(engine)
    for row in released:
        clm = elements(row.x12, "CLM")
        assert len(clm) == 1
        total = Decimal(clm[0][2])
        assert total == totals[row.encounter_id], row.encounter_id
        lines = elements(row.x12, "SV1") or elements(row.x12, "SV2")
        amounts = [Decimal(e[2]) if e[0] == "SV1" else Decimal(e[3]) for e in lines]
        assert sum(amounts) == total
        institutional = classes[row.encounter_id] in config.billing.file.institutional_classes
        assert row.kind == ("837I" if institutional else "837P")

    # Each hold reason is an open work item for the revenue-cycle team.
    open_items = {(s, r) for s, r, status in claim_work if status == "open"}
    for row in held:
        for reason in json.loads(row.hold_reasons):
            assert (f"claim:{row.encounter_id}", reason) in open_items


def _write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder


def _rows(name: str, keep) -> bytes:
    lines = (SYNTHEA / name).read_bytes().splitlines(keepends=True)
    return lines[0] + b"".join(line for line in lines[1:] if keep(line))


def _is_late(line: bytes) -> bool:
    return ENCOUNTER.encode() in line and LATE_CODE in line


def _first_delivery(tmp_path: Path) -> Path:
    folder = tmp_path / "first"
    _write(folder, "patients.csv", _rows("patients.csv", lambda line: line.startswith(PATIENT)))
    _write(folder, "encounters.csv", _rows("encounters.csv", lambda line: PATIENT in line))
    _write(folder, "procedures.csv", _rows(
        "procedures.csv", lambda line: PATIENT in line and not _is_late(line)))
    return folder


def _claims_of(engine: Engine, encounter_id: str) -> list:
    with engine.connect() as conn:
        return conn.execute(
            select(claims).where(claims.c.encounter_id == encounter_id).order_by(claims.c.version)
        ).all()


def test_late_charge_yields_corrected_claim(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run_job(engine, config, JobOptions(paths=[_first_delivery(tmp_path)], out_dir=out))
    [original] = _claims_of(engine, ENCOUNTER)
    assert original.state == "released"
    assert original.frequency_code == "1"
    assert original.charge_line_count == 2

    late = _write(tmp_path / "late", "procedures.csv", _rows("procedures.csv", _is_late))
    summary = run_job(engine, config, JobOptions(paths=[late], out_dir=out))
    first, corrected = _claims_of(engine, ENCOUNTER)
    assert first.id == original.id
    assert first.state == "replaced"
    assert first.x12 == original.x12
    assert corrected.state == "released"
    assert corrected.version == 2
    assert corrected.frequency_code == "7"
    assert corrected.replaces_claim_id == original.id
    assert corrected.charge_line_count == 3
    assert summary["claims"]["count"] == 1
    assert summary["claims"]["corrected"] == 1

    clm = elements(corrected.x12, "CLM")[0]
    assert clm[5].split(":")[2] == "7"
    assert Decimal(clm[2]) == charge_totals(engine)[ENCOUNTER]
    assert Decimal(clm[2]) > original.total
    assert ["REF", "F8", original.claim_reference] in elements(corrected.x12, "REF")
    valid, report = pyx12_accepts(corrected.x12)
    assert valid, report
    assert (out / "claims" / f"{corrected.claim_reference}.x12").is_file()

    # A third run with nothing new changes no claim.
    run_job(engine, config, JobOptions(paths=[late], out_dir=out))
    assert len(_claims_of(engine, ENCOUNTER)) == 2


def test_tampered_line_is_never_released(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    billing = config.billing
    assert billing is not None
    # The job would check and release at once, so it runs without billing
    # and the two phases run here apart, with a line changed between them.
    job_config = dataclasses.replace(config, billing=None)
    run_job(engine, job_config, JobOptions(paths=[_first_delivery(tmp_path)], out_dir=None))
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        check_encounters(conn, [ENCOUNTER], billing, now=now)
        [claim] = conn.execute(select(claims).where(claims.c.encounter_id == ENCOUNTER)).all()
        assert claim.state == "ready"
        line = conn.execute(
            select(claim_lines).where(claim_lines.c.claim_id == claim.id, claim_lines.c.line_no == 1)
        ).one()
        conn.execute(
            update(claim_lines).where(claim_lines.c.id == line.id)
            .values(amount=line.amount + Decimal("0.01"))
        )
    release_ready(engine, billing, now=now)
    [claim] = _claims_of(engine, ENCOUNTER)
    assert claim.state == "held"
    assert claim.x12 is None
    assert json.loads(claim.hold_reasons) == ["claim_invalid"]
    assert "differs" in claim.validation_errors
    with engine.connect() as conn:
        status = conn.execute(
            select(work_items.c.status).where(
                work_items.c.subject_key == f"claim:{ENCOUNTER}",
                work_items.c.reason == "claim_invalid",
            )
        ).scalar_one()
    assert status == "open"

    # Checked again, the claim is rebuilt from the charge lines and released,
    # with the patient's other closed encounters, which had no claim yet.
    result = run_claims(engine, config)
    assert result.invalid == 0
    assert result.released == result.checked - result.held
    [claim] = _claims_of(engine, ENCOUNTER)
    assert claim.state == "released"



def test_pool_releases_same_claims(
    engine: Engine, config: Configuration, tmp_path: Path, monkeypatch, caplog
) -> None:
    # The demo has fewer ready claims than the pool's minimum, so the first
    # run validates in this process; the second is made to use two children.
    alone = open_engine(sqlite_url(tmp_path / "alone.db"))
    run_job(alone, config, JobOptions(paths=[DEMO / "data"], out_dir=None))
    monkeypatch.setattr(claims_step, "POOL_MINIMUM", 1)
    monkeypatch.setattr(claims_step, "validation_processes", lambda: 2)
    caplog.set_level(logging.INFO, logger="carebridge.claims.validate")
    run_job(engine, config, JobOptions(paths=[DEMO / "data"], out_dir=None))
    started = [r for r in caplog.records if getattr(r, "action", "") == "validation_pool_start"]
    assert len(started) == 1

    def outcomes(database: Engine) -> dict[str, tuple[str, str | None]]:
        with database.connect() as conn:
            rows = conn.execute(select(claims.c.encounter_id, claims.c.state,
                                       claims.c.hold_reasons)).all()
        return {row.encounter_id: (row.state, row.hold_reasons) for row in rows}

    pooled = outcomes(engine)
    assert pooled == outcomes(alone)
    assert sum(state == "released" for state, _ in pooled.values()) >= 50
    alone.dispose()


def test_worker_releases_claims(
    engine: Engine, config: Configuration, tmp_path: Path
) -> None:
    folder = _first_delivery(tmp_path)
    for path in sorted(folder.iterdir()):
        store_inputs(engine, split_path(path), source="test")
    stats = Worker(engine, config, WorkerOptions(idle_seconds=0.05, deliver=False)).run(
        until_idle=True
    )
    [claim] = _claims_of(engine, ENCOUNTER)
    assert claim.state == "released"
    assert stats.claims_released >= 1
    with engine.connect() as conn:
        released = conn.execute(
            select(claims.c.id).where(claims.c.state == "released")
        ).all()
    assert stats.claims_released == len(released)


def test_concurrent_claim_runs_write_once(
    engine: Engine, config: Configuration, tmp_path: Path, monkeypatch
) -> None:
    # A worker and an ingest may run the claims step at once on one database.
    from carebridge.engine import job

    alone = open_engine(sqlite_url(tmp_path / "alone.db"))
    run_job(alone, config, JobOptions(paths=[DEMO / "data"], out_dir=None))
    monkeypatch.setattr(job, "run_claims", lambda *args, **kwargs: None)
    run_job(engine, config, JobOptions(paths=[DEMO / "data"], out_dir=None))
    errors = run_at_once(lambda: run_claims(engine, config, batch_size=20), threads=3)
    assert errors == []

    def outcomes(database: Engine) -> dict[str, list[tuple[int, str]]]:
        found: dict[str, list[tuple[int, str]]] = defaultdict(list)
        with database.connect() as conn:
            for row in conn.execute(select(claims.c.encounter_id, claims.c.version,
                                           claims.c.state).order_by(claims.c.version)):
                found[row.encounter_id].append((row.version, row.state))
        return dict(found)

    concurrent = outcomes(engine)
    assert len(concurrent) >= 50
    assert concurrent == outcomes(alone)
    alone.dispose()


def test_stored_diagnoses_match_mapped(engine: Engine, config: Configuration) -> None:
    # Messages processed before diagnoses were stored are mapped again; both
    # ways must give each encounter the same diagnoses in the same order.
    from sqlalchemy import delete

    from carebridge.claims.readiness import load_facts
    from carebridge.store.schema import diagnoses, messages

    run_job(engine, config, JobOptions(paths=[DEMO / "data"], out_dir=None))
    with engine.connect() as conn:
        closed = conn.execute(
            select(encounters.c.encounter_id).where(encounters.c.end.is_not(None))
        ).scalars().all()
        stored = load_facts(conn, closed, config.billing)
    with engine.begin() as conn:
        conn.execute(delete(diagnoses))
        conn.execute(update(messages).values(diagnoses_stored=0))
    with engine.connect() as conn:
        mapped = load_facts(conn, closed, config.billing)
    stored_lists = {key: item.diagnoses for key, item in stored.items()}
    mapped_lists = {key: item.diagnoses for key, item in mapped.items()}
    assert sum(map(len, stored_lists.values())) >= 100
    assert stored_lists == mapped_lists
