"""The claims step: one claim per closed encounter, held or validated and released.

The step runs after journal posting, in two phases that each commit:

1. **Check.** Every closed encounter with charge lines and no claim yet, every
   held claim due for another look, and every released claim whose
   encounter gained charge lines since, is checked for billing readiness
   (:mod:`carebridge.claims.readiness`). The claim row is written ``held``,
   with one work item per reason, or ``ready``, with its service lines and
   diagnoses. A late charge or credit on a released claim never edits it:
   it starts a new version that replaces it (frequency code 7).
2. **Release.** Each ``ready`` claim is built from its stored row and lines,
   checked (claim total against its lines and against the encounter's
   charge lines, NPI check digits, ZIP+4) and validated by pyx12. A claim
   that passes is ``released`` with its X12 text, and the version it
   replaces becomes ``replaced``; one that fails is ``held`` as
   ``claim_invalid``. A released claim is enqueued in the same transaction
   to the destinations whose ``kinds`` list ``claim``
   (:mod:`carebridge.claims.invoice`).

Logs name claim ids and counts only, because claim content, visit numbers
included, is PHI.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    and_,
    bindparam,
    delete,
    func,
    select,
    text,
    update,
)

from carebridge.claims.build837 import (
    INSTITUTIONAL,
    ORIGINAL,
    PROFESSIONAL,
    REPLACEMENT,
    ClaimDraft,
    ClaimLineDraft,
    PatientFacts,
)
from carebridge.claims.invoice import enqueue_claim
from carebridge.claims.readiness import (
    NO_AUTHORIZATIONS,
    RECORDED_AUTHORIZATIONS,
    AuthorizationLookup,
    EncounterFacts,
    busy_patients,
    load_facts,
    readiness_problems,
    service_lines,
    waiting_encounters,
)
from carebridge.claims.validate import ValidationPool
from carebridge.claims.workitems import (
    ClaimCheck,
    resolve_many_claim_items,
    sync_claim_items,
    sync_many_claim_items,
)
from carebridge.claims.x12 import DELIMITERS, X12DataError
from carebridge.config.model import BillingSettings, Configuration
from carebridge.config.rules import RuleBook
from carebridge.engine.batch_write import insert_returning_ids, insert_rows
from carebridge.store.db import planned_each_time
from carebridge.store.lookups import chunks
from carebridge.store.schema import (
    charge_lines,
    claim_lines,
    claims,
    encounters,
    patients,
)
from carebridge.workflows.reasons import Reason, Rejection

log = logging.getLogger(__name__)

HELD = "held"
READY = "ready"
RELEASED = "released"
REPLACED = "replaced"

CHECK_LOCK = 0x636C6D73  # "clms": PostgreSQL advisory lock of claim checks


@dataclass(slots=True)
class ClaimsResult:
    """Counts of one run of the claims step."""

    checked: int = 0
    held: int = 0
    ready: int = 0
    released: int = 0
    replacements: int = 0
    invalid: int = 0


def run_claims(
    engine: Engine,
    config: Configuration,
    *,
    run_id: int | None = None,
    now: dt.datetime | None = None,
    recheck_held_after: dt.timedelta = dt.timedelta(0),
    authorizations: AuthorizationLookup = RECORDED_AUTHORIZATIONS,
    batch_size: int = 200,
) -> ClaimsResult:
    """Check closed encounters, then validate and release the ready claims.

    ``recheck_held_after`` is how long a held claim waits before it is
    checked again, unless its encounter gained charge lines. The job checks
    every time, and a long-running worker every few minutes.
    """
    result = ClaimsResult()
    billing = config.billing
    if billing is None:
        return result
    now = now or dt.datetime.now(dt.UTC)
    with engine.connect() as conn:
        due = _due_encounters(conn, now - recheck_held_after)
    for start in range(0, len(due), batch_size):
        with engine.begin() as conn, planned_each_time(conn):
            _lock_checks(conn)
            check_encounters(conn, due[start:start + batch_size], billing, now=now,
                             run_id=run_id, authorizations=authorizations, result=result,
                             rule_book=getattr(config, "rule_book", None))
    release_ready(engine, billing, now=now, run_id=run_id, batch_size=batch_size,
                  result=result, config=config)
    if result.checked:
        log.info("claims step done", extra={
            "action": "claims_done", "checked": result.checked, "held": result.held,
            "released": result.released, "replacements": result.replacements,
            "invalid": result.invalid,
        })
    return result


def _lock_checks(conn: Connection) -> None:
    """Wait until no other process checks claims, for the rest of the transaction.

    A worker and an ``ingest`` may run the claims step at once on one
    PostgreSQL database. Each reads the encounter's claim and then writes
    the next version, so two at once would both write the same version.
    SQLite lets one transaction write at a time already.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHECK_LOCK})


def _current_claims(conn: Connection, encounter_ids: Sequence[str] | None = None) -> dict[str, Row]:
    """Return the newest claim version of each encounter.

    With ``encounter_ids`` the claims are read by the ``(encounter_id,
    version)`` index and the newest is picked here. During a bulk load the
    planner's statistics lag far behind the table, so a join with a grouped
    subquery was planned as a scan of every claim.
    """
    current: dict[str, Row] = {}
    if encounter_ids is None:
        newest_sub = (
            select(claims.c.encounter_id, func.max(claims.c.version).label("version"))
            .group_by(claims.c.encounter_id).subquery()
        )
        rows = conn.execute(select(claims).join(newest_sub, and_(
            claims.c.encounter_id == newest_sub.c.encounter_id,
            claims.c.version == newest_sub.c.version,
        )))
        return {row.encounter_id: row for row in rows}
    for chunk in chunks(encounter_ids):
        for row in conn.execute(select(claims).where(claims.c.encounter_id.in_(chunk))):
            known = current.get(row.encounter_id)
            if known is None or row.version > known.version:
                current[row.encounter_id] = row
    return current


def _due_encounters(conn: Connection, recheck_before: dt.datetime) -> list[str]:
    """Return the closed encounters whose claim needs a first or another check.

    NOTE: this counts the charge lines of every closed encounter on each
    run, so its cost grows with the history kept. A database with years of
    charges needs a cursor here.
    """
    counts = dict(conn.execute(
        select(charge_lines.c.encounter_id, func.count())
        .join(encounters, encounters.c.encounter_id == charge_lines.c.encounter_id)
        .where(encounters.c.end.is_not(None))
        .group_by(charge_lines.c.encounter_id)
    ).all())
    current = _current_claims(conn)
    due = []
    for encounter_id, count in counts.items():
        claim = current.get(encounter_id)
        if claim is None or claim.state == HELD and (
            claim.charge_line_count != count or _aware(claim.checked_at) <= recheck_before
        ) or claim.state == RELEASED and claim.charge_line_count != count:
            due.append(encounter_id)
    return sorted(due)


def _aware(moment: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes for timezone-aware columns.
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def check_encounters(
    conn: Connection,
    encounter_ids: Sequence[str],
    billing: BillingSettings,
    *,
    now: dt.datetime,
    run_id: int | None = None,
    authorizations: AuthorizationLookup = NO_AUTHORIZATIONS,
    result: ClaimsResult | None = None,
    rule_book: RuleBook | None = None,
) -> ClaimsResult:
    """Check billing readiness of ``encounter_ids`` and write each claim held or ready.

    Encounters whose patient still has messages to process, or with a
    charge parked for them, are left for a later run.
    """
    result = result if result is not None else ClaimsResult()
    facts = load_facts(conn, list(encounter_ids), billing)
    patient_ids = [item.encounter.patient_id for item in facts.values()]
    busy = busy_patients(conn, patient_ids)
    waiting = waiting_encounters(conn, facts)
    current = _current_claims(conn, list(facts))
    drafts: list[_Checked] = []
    for encounter_id in sorted(facts):
        item = facts[encounter_id]
        if item.encounter.end is None or not item.charges:
            continue
        if item.encounter.patient_id in busy or encounter_id in waiting:
            continue
        claim = current.get(encounter_id)
        if claim is not None and claim.state in (READY, REPLACED):
            continue
        if claim is not None and claim.state == RELEASED and claim.charge_line_count == len(item.charges):
            continue
        lines = service_lines(item.charges)
        problems = readiness_problems(conn, item, lines, billing, authorizations, rule_book)
        drafts.append(_Checked(item, claim, lines, problems))
        result.checked += 1
        if problems:
            result.held += 1
        else:
            result.ready += 1
    _write_claims(conn, drafts, billing, now, run_id)
    sync_many_claim_items(conn, [
        ClaimCheck(checked.facts.encounter_id, checked.facts.encounter.updated_message_id,
                   checked.problems, checked.facts.total)
        for checked in drafts
    ], now=now)
    return result


@dataclass(slots=True)
class _Checked:
    """One encounter's readiness check, before its claim row is written."""

    facts: EncounterFacts
    claim: Row | None
    lines: list[ClaimLineDraft]
    problems: list[Rejection]


def _kind(encounter_class: str | None, billing: BillingSettings) -> str:
    if encounter_class and encounter_class in billing.file.institutional_classes:
        return INSTITUTIONAL
    return PROFESSIONAL


def patient_control_number(encounter_id: str) -> str:
    """Return CLM01: the encounter id if it fits (38 characters), else a digest of it."""
    if len(encounter_id) <= 38 and not DELIMITERS.intersection(encounter_id):
        return encounter_id
    return "CB" + hashlib.sha256(encounter_id.encode()).hexdigest()[:30].upper()


def _claim_values(
    checked: _Checked, billing: BillingSettings, now: dt.datetime, run_id: int | None
) -> dict[str, object]:
    """Return the columns a readiness check sets on the claim row."""
    item, claim, lines, problems = checked.facts, checked.claim, checked.lines, checked.problems
    values: dict[str, object] = {
        "patient_id": item.encounter.patient_id,
        "kind": _kind(item.encounter.encounter_class, billing),
        "state": HELD if problems else READY,
        "total": sum((line.amount for line in lines), Decimal(0)),
        "currency": item.charges[0].currency,
        "charge_line_count": len(item.charges),
        "diagnosis_codes": ",".join(item.icd10cm) or None,
        "hold_reasons": json.dumps([p.reason.value for p in problems]) if problems else None,
        "validation_errors": None,
        "message_id": item.encounter.updated_message_id,
        "run_id": run_id,
        "checked_at": now,
    }
    if claim is not None and claim.state == HELD:
        unchanged = (
            values["state"] == HELD
            and values["hold_reasons"] == claim.hold_reasons
            and values["charge_line_count"] == claim.charge_line_count
        )
        if unchanged:
            # The run that held it stays its run, so a summary counts it once.
            values["run_id"] = claim.run_id
        return values
    if claim is None:
        version, frequency, replaces, original = 1, ORIGINAL, None, None
    else:
        # A released claim is never edited: the new version replaces it.
        version, frequency = claim.version + 1, REPLACEMENT
        replaces, original = claim.id, claim.claim_reference
    values.update(
        encounter_id=item.encounter_id,
        version=version,
        frequency_code=frequency,
        patient_control_number=patient_control_number(item.encounter_id),
        replaces_claim_id=replaces,
        original_reference=original,
        created_at=now,
    )
    return values


def _write_claims(
    conn: Connection,
    checked: Sequence[_Checked],
    billing: BillingSettings,
    now: dt.datetime,
    run_id: int | None,
) -> None:
    """Write the claim row and service lines of each check.

    A held claim is updated in place; otherwise a new row is inserted (a
    first claim, or a new version that replaces a released one). Rows and
    lines are written a few statements per batch.
    """
    updated: list[tuple[int, _Checked]] = []
    inserted: list[_Checked] = []
    for entry in checked:
        if entry.claim is not None and entry.claim.state == HELD:
            updated.append((entry.claim.id, entry))
        else:
            inserted.append(entry)
    if updated:
        columns = list(_claim_values(updated[0][1], billing, now, run_id))
        conn.execute(
            update(claims).where(claims.c.id == bindparam("b_id"))
            .values({name: bindparam(f"b_{name}") for name in columns}),
            [{"b_id": claim_id, **{f"b_{name}": value for name, value
                                   in _claim_values(entry, billing, now, run_id).items()}}
             for claim_id, entry in updated],
        )
        for chunk in chunks(claim_id for claim_id, _ in updated):
            conn.execute(delete(claim_lines).where(claim_lines.c.claim_id.in_(chunk)))
    new_ids = insert_returning_ids(
        conn, claims, [_claim_values(entry, billing, now, run_id) for entry in inserted])
    lines = [
        {
            "claim_id": claim_id,
            "line_no": line.line_no,
            "procedure_code": line.procedure_code,
            "revenue_code": line.revenue_code,
            "units": line.units,
            "amount": line.amount,
            "service_date": line.service_date,
            "charge_line_ids": ",".join(str(i) for i in line.charge_line_ids),
        }
        for claim_id, entry in [*updated, *zip(new_ids, inserted, strict=True)]
        for line in entry.lines
    ]
    insert_rows(conn, claim_lines, lines)


POOL_MINIMUM = 300
"""Ready claims below which pyx12 runs in the calling process. An estimate:
starting two child processes took about a second of CPU on the benchmark
machine, about what validating this many claims takes."""


def validation_processes() -> int:
    """Return how many processes validate a large backlog: one per core, at most four."""
    return max(1, min(4, os.cpu_count() or 1))


def release_ready(
    engine: Engine,
    billing: BillingSettings,
    *,
    now: dt.datetime,
    run_id: int | None = None,
    batch_size: int = 200,
    result: ClaimsResult | None = None,
    config: Configuration | None = None,
    processes: int | None = None,
) -> ClaimsResult:
    """Build, check and validate every ``ready`` claim; release it or hold it.

    With ``config``, each released claim is enqueued, in the transaction
    that releases it, to the destinations whose ``kinds`` list ``claim``.
    A backlog of at least :data:`POOL_MINIMUM` claims is built and
    validated by ``processes`` child processes (default
    :func:`validation_processes`), and each batch is read from the database
    while the one before it is built and validated.
    """
    result = result if result is not None else ClaimsResult()
    with engine.connect() as conn:
        backlog = conn.execute(
            select(func.count()).select_from(claims).where(claims.c.state == READY)
        ).scalar_one()
    if not backlog:
        return result
    if processes is None:
        processes = validation_processes()
    if backlog < POOL_MINIMUM:
        processes = 1
    after = 0
    pending: _Batch | None = None
    with ValidationPool(processes) as pool:
        while True:
            # Building and validating (pyx12) run after the read transaction
            # ends. Every SQLite transaction takes the one write lock, and MLLP
            # acknowledgements and API writes would wait for it.
            batch: _Batch | None = None
            with engine.connect() as conn, planned_each_time(conn):
                ready = conn.execute(
                    select(claims).where(claims.c.state == READY, claims.c.id > after)
                    .order_by(claims.c.id).limit(batch_size)
                ).all()
                if ready:
                    after = ready[-1].id
                    drafts, problems = _drafts(conn, ready, billing)
            if ready:
                batch = _Batch(ready, problems, pool.submit(drafts, billing.file, now))
            if pending is not None:
                texts, problems = pending.finish()
                with engine.begin() as conn, planned_each_time(conn):
                    _record_batch(conn, pending.ready, texts, problems, now,
                                  run_id, result, config)
            if batch is None:
                return result
            pending = batch


@dataclass(slots=True)
class _Batch:
    """Ready claims that the validation pool is building and validating."""

    ready: Sequence[Row]
    problems: dict[int, list[str]]
    built: Callable[[], tuple[dict[int, str], dict[int, list[str]]]]

    def finish(self) -> tuple[dict[int, str], dict[int, list[str]]]:
        """Wait for the pool; return the text of each claim that passed and the
        problems of the rest."""
        texts, problems = self.built()
        return texts, {**self.problems, **problems}


def _drafts(
    conn: Connection, ready: Sequence[Row], billing: BillingSettings
) -> tuple[list[tuple[int, ClaimDraft, Decimal]], dict[int, list[str]]]:
    """Return the draft of each claim and the sum of its charge lines, and the
    problems of the claims that cannot be drafted."""
    drafts: list[tuple[int, ClaimDraft, Decimal]] = []
    problems: dict[int, list[str]] = {}
    stored = _StoredFacts.load(conn, ready)
    for claim in ready:
        try:
            draft, expected_total = _draft(stored, claim, billing)
        except X12DataError as exc:
            problems[claim.id] = [str(exc)]
            continue
        drafts.append((claim.id, draft, expected_total))
    return drafts, problems


def _record_batch(
    conn: Connection,
    ready: Sequence[Row],
    texts: dict[int, str],
    problems: dict[int, list[str]],
    now: dt.datetime,
    run_id: int | None,
    result: ClaimsResult,
    config: Configuration | None = None,
) -> None:
    """Release or hold each claim that is still ``ready``.

    A claim that changed since it was validated (a late charge replaced it,
    or another worker recorded it) is left as it now is.
    """
    released = _mark_released(conn, [claim for claim in ready if claim.id in texts],
                               texts, now, run_id)
    for claim in released:
        if config is not None:
            enqueue_claim(conn, config, claim.id, now=now)
        result.released += 1
        result.replacements += claim.replaces_claim_id is not None
    for claim in ready:
        if claim.id not in texts and _mark_invalid(conn, claim, problems[claim.id], now, run_id):
            result.invalid += 1
            result.held += 1


def claim_reference(claim_id: int) -> str:
    """Return the reference a claim is known by: BHT03, file name and later REF*F8."""
    return f"CB{claim_id:010d}"


@dataclass(slots=True)
class _StoredFacts:
    """The encounters, service lines, charge amounts and patients of a batch of claims."""

    encounters: dict[str, Row]
    lines: dict[int, tuple[ClaimLineDraft, ...]]
    amounts: dict[int, Decimal]
    patients: dict[str, Row]

    @classmethod
    def load(cls, conn: Connection, ready: Sequence[Row]) -> _StoredFacts:
        """Read what building the claims in ``ready`` needs, a few queries per table."""
        facts = cls({}, defaultdict(tuple), {}, {})
        for chunk in chunks([claim.encounter_id for claim in ready]):
            for row in conn.execute(select(encounters).where(encounters.c.encounter_id.in_(chunk))):
                facts.encounters[row.encounter_id] = row
        for chunk in chunks([claim.id for claim in ready]):
            rows = conn.execute(select(claim_lines).where(claim_lines.c.claim_id.in_(chunk))
                                .order_by(claim_lines.c.claim_id, claim_lines.c.line_no))
            for row in rows:
                facts.lines[row.claim_id] += (ClaimLineDraft(
                    line_no=row.line_no, procedure_code=row.procedure_code,
                    revenue_code=row.revenue_code, units=row.units, amount=row.amount,
                    service_date=row.service_date,
                    charge_line_ids=tuple(int(i) for i in row.charge_line_ids.split(",")),
                ),)
        covered = [i for lines in facts.lines.values() for line in lines
                   for i in line.charge_line_ids]
        for chunk in chunks(covered):
            facts.amounts.update(conn.execute(
                select(charge_lines.c.id, charge_lines.c.amount)
                .where(charge_lines.c.id.in_(chunk))).tuples().all())
        for chunk in chunks([claim.patient_id for claim in ready]):
            for row in conn.execute(select(patients).where(patients.c.patient_id.in_(chunk))):
                facts.patients[row.patient_id] = row
        return facts


def _draft(stored: _StoredFacts, claim: Row, billing: BillingSettings
           ) -> tuple[ClaimDraft, Decimal]:
    """Return the claim as stored, and the sum of the charge lines it covers."""
    encounter = stored.encounters[claim.encounter_id]
    lines = stored.lines[claim.id]
    covered = [i for line in lines for i in line.charge_line_ids]
    if len(set(covered)) != len(covered):
        raise X12DataError("a charge line is on more than one service line")
    expected = sum((stored.amounts[i] for i in covered if i in stored.amounts), Decimal(0))

    settings = billing.file
    encounter_class = encounter.encounter_class or ""
    draft = ClaimDraft(
        claim_reference=claim_reference(claim.id),
        patient_control_number=claim.patient_control_number,
        kind=claim.kind,
        frequency_code=claim.frequency_code,
        original_reference=claim.original_reference,
        start=encounter.start,
        end=encounter.end,
        patient=_patient_facts(stored.patients.get(claim.patient_id), claim.patient_id),
        diagnoses=tuple(claim.diagnosis_codes.split(",")) if claim.diagnosis_codes else (),
        lines=lines,
        total=claim.total,
        place_of_service=settings.place_of_service_by_class.get(
            encounter_class, settings.default_place_of_service
        ),
        institutional=settings.institutional_classes.get(encounter_class),
    )
    return draft, expected


def _patient_facts(patient: Row | None, patient_id: str) -> PatientFacts:
    if patient is None or not patient.family_name or patient.birth_date is None:
        raise X12DataError(f"patient {patient_id} lacks a family name or birth date")
    # NOTE: the patient is billed as the subscriber, with the MRN (else the
    # patient id) as member id, because coverage is not captured yet.
    return PatientFacts(
        patient_id=patient.patient_id,
        last_name=patient.family_name,
        first_name=patient.given_name,
        birth_date=patient.birth_date,
        gender=patient.gender,
        member_id=patient.mrn or patient.patient_id,
    )


def _mark_released(
    conn: Connection, candidates: Sequence[Row], texts: dict[int, str],
    now: dt.datetime, run_id: int | None,
) -> list[Row]:
    """Release each claim in ``candidates`` that is still ready; return those released.

    The state changes in one guarded statement, so a claim another worker
    recorded or a late charge sent back is never released twice.
    """
    if not candidates:
        return []
    won = set(conn.execute(
        update(claims)
        .where(claims.c.id.in_([claim.id for claim in candidates]), claims.c.state == READY)
        .values(state=RELEASED, validated_at=now, released_at=now, validation_errors=None,
                hold_reasons=None, run_id=run_id)
        .returning(claims.c.id)
    ).scalars())
    released = [claim for claim in candidates if claim.id in won]
    if not released:
        return []
    conn.execute(
        update(claims).where(claims.c.id == bindparam("b_id")).values(
            x12=bindparam("b_x12"), claim_reference=bindparam("b_reference"),
            interchange_control_number=bindparam("b_id")),
        [{"b_id": claim.id, "b_x12": texts[claim.id],
          "b_reference": claim_reference(claim.id)} for claim in released],
    )
    replaced = [claim.replaces_claim_id for claim in released
                if claim.replaces_claim_id is not None]
    if replaced:
        conn.execute(update(claims).where(claims.c.id.in_(replaced)).values(
            state=REPLACED, replaced_at=now,
        ))
    resolve_many_claim_items(conn, {
        claim.encounter_id: f"claim {claim_reference(claim.id)} released" for claim in released
    }, now=now)
    for claim in released:
        log.info("claim released", extra={"action": "claim_released", "claim_id": claim.id,
                                          "frequency_code": claim.frequency_code})
    return released


def _mark_invalid(
    conn: Connection, claim: Row, errors: list[str], now: dt.datetime, run_id: int | None
) -> bool:
    """Hold ``claim`` as invalid if it is still ready; return whether it was."""
    detail = "; ".join(errors)
    changed = conn.execute(
        update(claims).where(claims.c.id == claim.id, claims.c.state == READY).values(
            state=HELD, hold_reasons=json.dumps([Reason.CLAIM_INVALID.value]),
            validation_errors=detail, run_id=run_id, checked_at=now,
        )
    ).rowcount
    if changed != 1:
        return False
    rejection = Rejection(
        Reason.CLAIM_INVALID,
        f"claim {claim_reference(claim.id)} of encounter {claim.encounter_id} failed "
        f"validation and was not released: {detail}",
    )
    sync_claim_items(conn, claim.encounter_id, claim.message_id, [rejection], now=now,
                     amount_at_risk=claim.total)
    log.warning("claim held: validation failed", extra={
        "action": "claim_invalid", "claim_id": claim.id, "errors": len(errors),
    })
    return True
