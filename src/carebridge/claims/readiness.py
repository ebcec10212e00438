"""Billing readiness: what an encounter needs before its claim is built.

An encounter is considered once it is closed (it has an end time) and none
of its patient's messages waits to be processed. Its claim is then held,
with one work item per reason, unless:

* it has a diagnosis that maps to ICD-10-CM (``diagnosis_missing``);
* every service that a rule in billing.yaml lists has an approved
  authorization (``authorization_missing``);
* no service of the encounter has an open work item (``open_work_items``);
* the patient's name and birth date are known (``patient_incomplete``);
* no service line nets to a credit (``claim_credit_balance``).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from sqlalchemy import Connection, Row, select

from carebridge.claims.build837 import ClaimLineDraft
from carebridge.config.model import BillingSettings
from carebridge.config.rules import RuleBook
from carebridge.ingest.registry import FHIR_VALIDATED_FORMAT, map_raw
from carebridge.model.codes import CDM, CPT, HCPCS, ICD10CM, ICD10CM_CODE
from carebridge.model.records import Diagnosis
from carebridge.store.bodies import raw_column, with_bodies
from carebridge.store.lookups import chunks
from carebridge.store.schema import (
    charge_lines,
    diagnoses,
    encounters,
    messages,
    patients,
    services,
    waits,
    work_items,
)
from carebridge.workflows.reasons import Reason, Rejection

log = logging.getLogger(__name__)

OPEN_STATUSES = ("open", "claimed")
_ICD10CM = re.compile(ICD10CM_CODE)


class AuthorizationLookup(Protocol):
    """A source of approved authorizations, asked once per service a rule lists.

    :data:`NO_AUTHORIZATIONS` has none, so every such service is held until
    a lookup over the recorded authorizations is passed to the claims step.
    """

    def status(
        self, conn: Connection, *, encounter_id: str, patient_id: str,
        system: str, code: str, service_date: dt.date,
    ) -> str:
        """Return ``approved`` when an approved, unexpired authorization with
        units left covers the service; otherwise why not (``missing``,
        ``pending``, ``expired``, ``exhausted``)."""
        ...


class _NoAuthorizations:
    def status(self, conn: Connection, **_service: object) -> str:
        return "missing"


NO_AUTHORIZATIONS: AuthorizationLookup = _NoAuthorizations()


class RecordedAuthorizations:
    """The authorizations carebridge recorded from ServiceRequest, REF^I12 and
    preauthorization Claims (table ``authorizations``)."""

    def status(
        self, conn: Connection, *, encounter_id: str, patient_id: str,
        system: str, code: str, service_date: dt.date,
    ) -> str:
        from carebridge.workflows.authorizations import authorization_status

        # Units count here: the charges are what uses them up.
        return authorization_status(conn, patient_id, code, service_date,
                                    code_system=system, count_units=True)


RECORDED_AUTHORIZATIONS: AuthorizationLookup = RecordedAuthorizations()

_STATE_TEXT = {
    "exhausted": "its authorized units are used up",
    "missing": "none on record",
    "pending": "waiting for the payer's decision",
    "expired": "expired before the service date",
}


@dataclass(slots=True)
class EncounterFacts:
    """The encounter, patient, charges and diagnoses that the readiness check reads."""

    encounter: Row
    patient: Row | None
    charges: list[Row]
    open_work_items: int = 0
    diagnoses: list[Diagnosis] = field(default_factory=list)
    icd10cm: tuple[str, ...] = ()
    unmapped: tuple[str, ...] = ()

    @property
    def encounter_id(self) -> str:
        return self.encounter.encounter_id

    @property
    def total(self) -> Decimal:
        return sum((row.amount for row in self.charges), Decimal(0))


def busy_patients(conn: Connection, patient_ids: Iterable[str]) -> set[str]:
    """Return the patients with a message still waiting to be processed."""
    wanted = sorted(set(patient_ids))
    busy: set[str] = set()
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        busy.update(conn.execute(
            select(messages.c.ordering_key).distinct().where(
                messages.c.state == "received", messages.c.ordering_key.in_(chunk)
            )
        ).scalars())
    return busy


def waiting_encounters(conn: Connection, encounter_ids: Iterable[str]) -> set[str]:
    """Return the encounters that have a charge parked in ``waits``."""
    wanted = sorted(set(encounter_ids))
    found: set[str] = set()
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        found.update(conn.execute(
            select(waits.c.wait_key).distinct().where(
                waits.c.state == "waiting", waits.c.kind == "encounter",
                waits.c.wait_key.in_(chunk),
            )
        ).scalars())
    return found


def load_facts(
    conn: Connection, encounter_ids: Sequence[str], billing: BillingSettings
) -> dict[str, EncounterFacts]:
    """Read encounters, patients, charge lines, open work items and diagnoses."""
    facts: dict[str, EncounterFacts] = {}
    if not encounter_ids:
        return facts
    rows = conn.execute(select(encounters).where(encounters.c.encounter_id.in_(encounter_ids)))
    by_patient: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        facts[row.encounter_id] = EncounterFacts(encounter=row, patient=None, charges=[])
        by_patient[row.patient_id].append(row.encounter_id)
    for row in conn.execute(select(patients).where(patients.c.patient_id.in_(list(by_patient)))):
        for encounter_id in by_patient[row.patient_id]:
            facts[encounter_id].patient = row
    for row in conn.execute(
        select(charge_lines)
        .where(charge_lines.c.encounter_id.in_(list(facts)))
        .order_by(charge_lines.c.id)
    ):
        facts[row.encounter_id].charges.append(row)
    # Two look-ups by index rather than a join: during a bulk load the
    # planner's statistics lag behind and a join was planned as a scan of
    # every work item.
    items_of_services = conn.execute(
        select(services.c.encounter_id, services.c.work_item_id)
        .where(services.c.encounter_id.in_(list(facts)), services.c.work_item_id.is_not(None))
    ).all()
    open_ids: set[int] = set()
    for chunk in chunks(item_id for _, item_id in items_of_services):
        open_ids.update(conn.execute(
            select(work_items.c.id).where(work_items.c.id.in_(chunk),
                                          work_items.c.status.in_(OPEN_STATUSES))
        ).scalars())
    for encounter_id, item_id in items_of_services:
        if item_id in open_ids:
            facts[encounter_id].open_work_items += 1
    _load_diagnoses(conn, facts)
    for item in facts.values():
        item.icd10cm, item.unmapped = _icd10cm_codes(item.diagnoses, billing)
    return facts


def _load_diagnoses(conn: Connection, facts: dict[str, EncounterFacts]) -> None:
    """Read the diagnoses of each encounter from its own messages and those of its services.

    Diagnoses come in message order (the encounter's first message, its
    latest update, then its services' messages by id), and within a message
    in the order it lists them. A message processed before diagnoses were
    stored (``diagnoses_stored`` = 0) is mapped again, and gives none if its
    content was pruned.
    """
    order: dict[int, int] = {}
    for item in facts.values():
        for message_id in (item.encounter.source_message_id, item.encounter.updated_message_id):
            order.setdefault(message_id, len(order))
    service_messages = conn.execute(
        select(services.c.message_id).distinct()
        .where(services.c.encounter_id.in_(list(facts)))
        .order_by(services.c.message_id)
    ).scalars()
    for message_id in service_messages:
        order.setdefault(message_id, len(order))
    found: list[tuple[int, int, Diagnosis]] = []
    for chunk in chunks(list(facts)):
        for row in conn.execute(select(diagnoses).where(diagnoses.c.encounter_id.in_(chunk))):
            if row.message_id in order:
                found.append((order[row.message_id], row.position, Diagnosis(
                    encounter_id=row.encounter_id, code_system=row.code_system,
                    code=row.code, source_message_id=row.message_id,
                    description=row.description,
                )))
    for chunk in chunks(list(order)):
        unstored = conn.execute(
            select(messages.c.id, messages.c.format, messages.c.occurrence, raw_column())
            .select_from(with_bodies())
            .where(messages.c.id.in_(chunk), messages.c.state == "processed",
                   messages.c.diagnoses_stored == 0)
        ).all()
        for row in unstored:
            for position, diagnosis in enumerate(_diagnoses_of(row)):
                if diagnosis.encounter_id in facts:
                    found.append((order[row.id], position, diagnosis))
    found.sort(key=lambda entry: (entry[0], entry[1]))
    for _, _, diagnosis in found:
        facts[diagnosis.encounter_id].diagnoses.append(diagnosis)


def _diagnoses_of(row: Row) -> list[Diagnosis]:
    if row.raw is None:
        return []
    # A processed message passed FHIR validation once, so it is not validated again.
    fmt = FHIR_VALIDATED_FORMAT if row.format == "fhir-json" else row.format
    try:
        return map_raw(fmt, bytes(row.raw), row.id, row.occurrence or 1).diagnoses
    except Exception as exc:  # noqa: BLE001 - one unreadable message must not stop the pass
        log.warning("diagnoses not read", extra={"action": "claim_diagnoses_unread",
                                                 "message_id": row.id,
                                                 "error_type": type(exc).__name__})
        return []


def _icd10cm_codes(
    diagnoses: Sequence[Diagnosis], billing: BillingSettings
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return the ICD-10-CM codes (no dot, first is principal) and the unmapped codes."""
    codes: list[str] = []
    unmapped: list[str] = []
    for diagnosis in diagnoses:
        if diagnosis.code_system == ICD10CM and _ICD10CM.match(diagnosis.code):
            code: str | None = diagnosis.code.replace(".", "").upper()
        else:
            code = billing.diagnosis_crosswalk.get((diagnosis.code_system, diagnosis.code))
        if code is None:
            label = f"{diagnosis.code_system} {diagnosis.code}"
            if label not in unmapped:
                unmapped.append(label)
        elif code not in codes:
            codes.append(code)
    return tuple(codes), tuple(unmapped)


def service_lines(charges: Sequence[Row]) -> list[ClaimLineDraft]:
    """Sum charge lines of one procedure code, revenue code and date into service lines.

    A credit (negative amount) nets against the charge it reverses, so its
    units count negative. Lines that net to zero are left off the claim.
    """
    groups: dict[tuple[str | None, str, dt.date], list[Row]] = defaultdict(list)
    for row in charges:
        groups[(row.hcpcs, row.revenue_code, row.service_date)].append(row)
    lines = []
    for (code, revenue_code, service_date), rows in sorted(
        groups.items(), key=lambda item: (item[0][2], item[0][1], item[0][0] or "")
    ):
        amount = sum((row.amount for row in rows), Decimal(0))
        units = sum((row.units if row.amount >= 0 else -row.units for row in rows), Decimal(0))
        if amount == 0:
            continue
        lines.append(
            ClaimLineDraft(
                line_no=len(lines) + 1,
                procedure_code=code,
                revenue_code=revenue_code,
                units=units,
                amount=amount,
                service_date=service_date,
                charge_line_ids=tuple(row.id for row in rows),
            )
        )
    return lines


def readiness_problems(
    conn: Connection,
    facts: EncounterFacts,
    lines: Sequence[ClaimLineDraft],
    billing: BillingSettings,
    authorizations: AuthorizationLookup,
    rule_book: RuleBook | None = None,
) -> list[Rejection]:
    """Return every reason the encounter's claim must be held; empty when ready."""
    problems = []
    encounter = facts.encounter
    if not facts.icd10cm:
        found = ", ".join(facts.unmapped) or "none"
        problems.append(Rejection(
            Reason.DIAGNOSIS_MISSING,
            f"encounter {encounter.encounter_id} has no ICD-10-CM diagnosis (codes "
            f"without a mapping: {found}); record the diagnosis or add the code to "
            "the diagnosis crosswalk, and the claim is checked again",
        ))
    missing = _unauthorized(conn, facts, billing, authorizations, rule_book)
    if missing:
        problems.append(Rejection(
            Reason.AUTHORIZATION_MISSING,
            f"no approved authorization for {', '.join(missing)} on encounter "
            f"{encounter.encounter_id}; record the authorization, and the claim is "
            "checked again",
        ))
    if facts.open_work_items:
        problems.append(Rejection(
            Reason.OPEN_WORK_ITEMS,
            f"encounter {encounter.encounter_id} has {facts.open_work_items} open work "
            "item(s) on its services; resolve them so that the claim is complete",
        ))
    patient = facts.patient
    if patient is None or not patient.family_name or patient.birth_date is None:
        problems.append(Rejection(
            Reason.PATIENT_INCOMPLETE,
            f"patient {encounter.patient_id} needs a family name and a birth date "
            "on the claim; send a patient update (ADT A08 or FHIR Patient)",
        ))
    credits = [line.line_no for line in lines if line.amount < 0]
    if credits:
        problems.append(Rejection(
            Reason.CLAIM_CREDIT_BALANCE,
            f"service line(s) {', '.join(map(str, credits))} of encounter "
            f"{encounter.encounter_id} net to a credit; review the credits",
        ))
    if not lines and not credits and facts.charges:
        problems.append(Rejection(
            Reason.CLAIM_CREDIT_BALANCE,
            f"the charges of encounter {encounter.encounter_id} net to zero; "
            "there is nothing to bill, so close this item once reviewed",
        ))
    return problems


def _unauthorized(
    conn: Connection,
    facts: EncounterFacts,
    billing: BillingSettings,
    authorizations: AuthorizationLookup,
    rule_book: RuleBook | None = None,
) -> list[str]:
    def required(service_date: dt.date) -> frozenset[tuple[str, str]]:
        # billing.yaml's list, plus the versioned rules in force on the date.
        if rule_book is None:
            return billing.authorization_required
        return billing.authorization_required | rule_book.in_force(
            service_date).authorization_required

    missing = []
    for row in facts.charges:
        keys = [(CDM, row.charge_code.upper())]
        if row.hcpcs:
            keys += [(CPT, row.hcpcs.upper()), (HCPCS, row.hcpcs.upper())]
        for system, code in keys:
            if (system, code) not in required(row.service_date):
                continue
            state = authorizations.status(
                conn, encounter_id=facts.encounter_id, patient_id=facts.encounter.patient_id,
                system=system, code=code, service_date=row.service_date,
            )
            if state != "approved":
                label = f"{system} {code} ({_STATE_TEXT.get(state, state)})"
                if label not in missing:
                    missing.append(label)
            break
    return missing
