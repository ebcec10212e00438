"""Run the checks on a carebridge database and turn their flags into work items.

The checks read patients, encounters, services, supply issues and charge
lines, and write only ``work_items`` (one per flag, with the score and the
reason in ``detail``) and their ranking. They never insert, change or
delete a charge line, journal or supply issue: a person acts on the work
item. A flag whose work item exists already, in any status, is not raised
again, so a flag a person rejected stays rejected.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, insert, select

from carebridge.checks.anomalies import Anomaly, ChargeNorms, find_anomalies
from carebridge.checks.linkage import MATCH_THRESHOLD, DuplicatePair, find_duplicates
from carebridge.checks.missing_charges import (
    ChargePatterns,
    ChargeRecord,
    EncounterCharges,
    MissingCharge,
    find_missing_charges,
)
from carebridge.checks.ranking import SLA_HOURS_BY_REASON, rank_work_queue
from carebridge.store.schema import (
    charge_lines,
    encounters,
    patient_links,
    patients,
    services,
    supply_issues,
    work_items,
)
from carebridge.workflows.reasons import TEAM_BY_REASON, Reason

log = logging.getLogger(__name__)

ANOMALY_REASONS = {
    "units": Reason.UNITS_ANOMALY,
    "unit_price": Reason.PRICE_ANOMALY,
    "not_documented": Reason.BILLED_NOT_DOCUMENTED,
}


@dataclass(slots=True)
class CheckRun:
    """Counts of one run: flags found and work items opened, per reason."""

    patients: int = 0
    encounters: int = 0
    flagged: dict[str, int] = field(default_factory=dict)
    opened: dict[str, int] = field(default_factory=dict)
    ranked: int = 0


def load_patients(conn: Connection) -> list[dict[str, Any]]:
    """Read the patients not merged into another, in the columns linkage compares."""
    merged = select(patient_links.c.merged_patient_id)
    rows = conn.execute(
        select(patients.c.patient_id, patients.c.given_name, patients.c.family_name,
               patients.c.birth_date, patients.c.gender, patients.c.home_phone)
        .where(patients.c.patient_id.not_in(merged))
        .order_by(patients.c.patient_id)
    ).all()
    return [
        {"unique_id": row.patient_id, "given_name": row.given_name,
         "family_name": row.family_name, "birth_date": row.birth_date,
         "gender": row.gender, "phone": row.home_phone}
        for row in rows
    ]


def load_encounters(conn: Connection) -> list[EncounterCharges]:
    """Read each encounter's features and charge lines.

    Features: ``class:`` and ``encounter:`` from the encounter, one per
    documented service (``procedure:SNOMED:...``) whatever its outcome, and
    ``supply_item:`` per supply issued on the encounter.
    """
    return _load_encounters(conn)[0]


def _load_encounters(
    conn: Connection,
) -> tuple[list[EncounterCharges], dict[str, set[str]]]:
    # Also returns, per encounter, the features whose service is a work item
    # already: a charge those bring is missing for a reason a rule stated.
    pending: dict[str, set[str]] = defaultdict(set)
    features: dict[str, set[str]] = defaultdict(set)
    for row in conn.execute(select(encounters.c.encounter_id, encounters.c.encounter_class,
                                   encounters.c.code, encounters.c.code_system)):
        features[row.encounter_id].add(f"class:{row.encounter_class or 'unknown'}")
        if row.code:
            features[row.encounter_id].add(f"encounter:{row.code_system}:{row.code}")
    for row in conn.execute(
        select(services.c.encounter_id, services.c.kind, services.c.code_system,
               services.c.code, services.c.outcome)
        .where(services.c.encounter_id.is_not(None), services.c.origin == "clinical")
    ):
        if row.encounter_id in features and row.code:
            feature = f"{row.kind}:{row.code_system}:{row.code}"
            features[row.encounter_id].add(feature)
            if row.outcome == "work_item":
                pending[row.encounter_id].add(feature)
    for row in conn.execute(select(supply_issues.c.encounter_id, supply_issues.c.item_code)
                            .where(supply_issues.c.encounter_id.is_not(None))):
        if row.encounter_id in features:
            features[row.encounter_id].add(f"supply_item:{row.item_code}")
    charges: dict[str, list[ChargeRecord]] = defaultdict(list)
    for row in conn.execute(
        select(charge_lines.c.id, charge_lines.c.encounter_id, charge_lines.c.charge_code,
               charge_lines.c.units, charge_lines.c.amount)
        .where(charge_lines.c.encounter_id.is_not(None)).order_by(charge_lines.c.id)
    ):
        charges[row.encounter_id].append(
            ChargeRecord(str(row.id), row.charge_code, row.units, row.amount))
    loaded = [
        EncounterCharges(encounter_id, frozenset(found), tuple(charges.get(encounter_id, ())))
        for encounter_id, found in sorted(features.items())
    ]
    return loaded, pending


def run_checks(engine: Engine, *, now: dt.datetime | None = None) -> CheckRun:
    """Run every check on the database at ``engine`` and open work items for the flags."""
    now = now or dt.datetime.now(dt.UTC)
    result = CheckRun()
    with engine.connect() as conn:
        patient_rows = load_patients(conn)
        history, pending = _load_encounters(conn)
    result.patients = len(patient_rows)
    result.encounters = len(history)
    pairs = find_duplicates(patient_rows)
    patterns = ChargePatterns.fit(history)
    missing = [
        gap for gap in find_missing_charges(patterns, history)
        if gap.feature not in pending.get(gap.encounter_id, ())
    ]
    anomalies = find_anomalies(ChargeNorms.fit(history), patterns, history)
    with engine.begin() as conn:
        for pair in pairs:
            _count(result, Reason.DUPLICATE_PATIENT, _open_duplicate(conn, pair, now))
        for gap in missing:
            _count(result, Reason.MISSING_CHARGE, _open_missing(conn, gap, now))
        for anomaly in anomalies:
            _count(result, ANOMALY_REASONS[anomaly.kind], _open_anomaly(conn, anomaly, now))
        result.ranked = rank_work_queue(conn, now)
    log.info("checks run", extra={"action": "checks_run", "patients": result.patients,
                                  "encounters": result.encounters, **result.opened})
    return result


def _count(result: CheckRun, reason: Reason, opened: bool) -> None:
    result.flagged[reason.value] = result.flagged.get(reason.value, 0) + 1
    result.opened[reason.value] = result.opened.get(reason.value, 0) + opened


def _open(conn: Connection, *, subject_key: str, reason: Reason, message_id: int,
          detail: dict[str, Any], amount_at_risk: Decimal | None, now: dt.datetime) -> bool:
    exists = conn.execute(
        select(work_items.c.id).where(work_items.c.subject_key == subject_key,
                                      work_items.c.reason == reason.value)
    ).first()
    if exists is not None:
        return False
    conn.execute(insert(work_items).values(
        subject_key=subject_key, reason=reason.value, team=TEAM_BY_REASON[reason].value,
        message_id=message_id, detail=json.dumps(detail, sort_keys=True, default=str),
        status="open", created_at=now, amount_at_risk=amount_at_risk,
        due_at=now + dt.timedelta(hours=SLA_HOURS_BY_REASON[reason.value]),
    ))
    return True


def _open_duplicate(conn: Connection, pair: DuplicatePair, now: dt.datetime) -> bool:
    messages = dict(conn.execute(
        select(patients.c.patient_id, patients.c.updated_message_id)
        .where(patients.c.patient_id.in_((pair.left_id, pair.right_id)))
    ).all())
    detail = {
        "check": "duplicate_patients",
        "left_patient_id": pair.left_id,
        "right_patient_id": pair.right_id,
        "match_probability": round(pair.probability, 6),
        "match_weight": round(pair.match_weight, 3),
        "threshold": MATCH_THRESHOLD,
        "levels": pair.levels,
        "agreed": list(pair.agreed),
        "similar": list(pair.similar),
        "disagreed": list(pair.disagreed),
        "missing": list(pair.missing),
    }
    return _open(conn, subject_key=f"patients:{pair.left_id}|{pair.right_id}",
                 reason=Reason.DUPLICATE_PATIENT, message_id=max(messages.values()),
                 detail=detail, amount_at_risk=None, now=now)


def _open_missing(conn: Connection, gap: MissingCharge, now: dt.datetime) -> bool:
    message_id = conn.execute(
        select(encounters.c.source_message_id)
        .where(encounters.c.encounter_id == gap.encounter_id)
    ).scalar_one()
    detail = {"check": "missing_charges", **asdict(gap)}
    return _open(conn, subject_key=f"encounter:{gap.encounter_id}:charge:{gap.charge_code}",
                 reason=Reason.MISSING_CHARGE, message_id=message_id, detail=detail,
                 amount_at_risk=gap.expected_amount, now=now)


def _open_anomaly(conn: Connection, anomaly: Anomaly, now: dt.datetime) -> bool:
    message_id = conn.execute(
        select(charge_lines.c.source_message_id)
        .where(charge_lines.c.id == int(anomaly.charge_id))
    ).scalar_one()
    detail = {"check": "anomalies", **asdict(anomaly)}
    return _open(conn, subject_key=f"charge_line:{anomaly.charge_id}:{anomaly.kind}",
                 reason=ANOMALY_REASONS[anomaly.kind], message_id=message_id, detail=detail,
                 amount_at_risk=anomaly.amount_at_risk, now=now)
