"""Map rows of the Synthea CSV export to canonical records.

One row is one message: :func:`map_synthea_row` maps the fields of a row read
by :func:`carebridge.ingest.files.csvrows.read_csv_records`. The ``kind`` is the
file stem (``encounters`` for ``encounters.csv``).

Business keys are shared with the FHIR mapper so that the same clinical event,
delivered once as a CSV row and once inside a Synthea FHIR bundle, gets the same
``service_key`` or ``usage_key``. The pipeline then treats the second delivery
as a duplicate instead of a second charge. The key functions below are the
single definition of that scheme:

* encounter: ``synthea:encounter:{encounter_id}``
* procedure: ``synthea:procedure:{encounter_id}:{code}:{start UTC}``
* immunization: ``synthea:immunization:{encounter_id}:{code}:{date-time UTC}``
* supply: ``synthea:supply:{patient_id}:{code}:{date}``

Supplies are keyed by patient, not encounter, because FHIR R4 SupplyDelivery
has no encounter element. Date-times are written as ``YYYY-MM-DDTHH:MM:SSZ``.
Synthea can emit the same supply twice for one patient, code and date (two
identical rows in ``supplies.csv`` and two SupplyDelivery resources); such
repeats are distinguished by their occurrence number in file or bundle order,
appended as ``#2``, ``#3`` and so on (see :func:`number_occurrences`).

NOTE: service dates of encounters, procedures and immunizations are UTC dates,
because the CSV carries only UTC times. An evening visit in Massachusetts
therefore gets the next calendar day. Supply dates are local dates.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal, InvalidOperation

from carebridge.errors import ParseError
from carebridge.model.codes import CVX, SNOMED
from carebridge.model.records import (
    CanonicalBatch,
    Diagnosis,
    Encounter,
    Patient,
    Service,
    ServiceKind,
    SupplyUse,
)

logger = logging.getLogger(__name__)

SYNTHEA_KINDS = ("patients", "encounters", "procedures", "immunizations", "supplies")
"""File stems of the Synthea CSV files that carebridge maps."""

_KEY_PREFIX = "synthea"
_ONE = Decimal(1)


def format_utc(moment: dt.datetime) -> str:
    """Format an aware date-time as ``YYYY-MM-DDTHH:MM:SSZ`` in UTC (seconds kept)."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _with_occurrence(key: str, occurrence: int) -> str:
    if occurrence < 1:
        raise ValueError(f"occurrence must be 1 or more, got {occurrence}")
    return key if occurrence == 1 else f"{key}#{occurrence}"


def encounter_service_key(encounter_id: str) -> str:
    """Return the service key of the visit itself."""
    return f"{_KEY_PREFIX}:encounter:{encounter_id}"


def procedure_service_key(
    encounter_id: str, code: str, start: dt.datetime, occurrence: int = 1
) -> str:
    """Return the service key of a procedure that started at ``start`` (aware)."""
    key = f"{_KEY_PREFIX}:procedure:{encounter_id}:{code}:{format_utc(start)}"
    return _with_occurrence(key, occurrence)


def immunization_service_key(
    encounter_id: str, code: str, given_at: dt.datetime, occurrence: int = 1
) -> str:
    """Return the service key of an immunization given at ``given_at`` (aware)."""
    key = f"{_KEY_PREFIX}:immunization:{encounter_id}:{code}:{format_utc(given_at)}"
    return _with_occurrence(key, occurrence)


def supply_usage_key(
    patient_id: str, code: str, supplied_on: dt.date, occurrence: int = 1
) -> str:
    """Return the usage key of a supply given to a patient on a calendar date.

    ``supplied_on`` is the date as Synthea writes it in ``supplies.csv``, which
    is the local date of the SupplyDelivery ``occurrenceDateTime``, not its
    UTC date.
    """
    key = f"{_KEY_PREFIX}:supply:{patient_id}:{code}:{supplied_on.isoformat()}"
    return _with_occurrence(key, occurrence)


# --- Field readers: each raises ParseError naming the column and the value. ---


def _text(kind: str, fields: Mapping[str, str], column: str) -> str:
    if column not in fields:
        raise ParseError(f"missing column {column}", location=f"{kind}.{column}")
    value = fields[column].strip()
    if not value:
        raise ParseError(f"empty value in column {column}", location=f"{kind}.{column}")
    return value


def _optional_text(fields: Mapping[str, str], column: str) -> str | None:
    value = fields.get(column, "").strip()
    return value or None


def _datetime(kind: str, fields: Mapping[str, str], column: str) -> dt.datetime:
    value = _text(kind, fields, column)
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise ParseError(
            f"invalid date-time in {column}: {value!r}", location=f"{kind}.{column}"
        ) from exc
    if moment.tzinfo is None:
        raise ParseError(
            f"date-time in {column} has no UTC offset: {value!r}",
            location=f"{kind}.{column}",
        )
    return moment.astimezone(dt.UTC)


def _optional_datetime(
    kind: str, fields: Mapping[str, str], column: str
) -> dt.datetime | None:
    if _optional_text(fields, column) is None:
        return None
    return _datetime(kind, fields, column)


def _date(kind: str, fields: Mapping[str, str], column: str) -> dt.date:
    value = _text(kind, fields, column)
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise ParseError(
            f"invalid date in {column}: {value!r}", location=f"{kind}.{column}"
        ) from exc


def _quantity(kind: str, fields: Mapping[str, str], column: str) -> Decimal:
    value = _text(kind, fields, column)
    try:
        quantity = Decimal(value)
    except InvalidOperation as exc:
        raise ParseError(
            f"invalid {column} {value!r}: expected a decimal number",
            location=f"{kind}.{column}",
        ) from exc
    if not quantity.is_finite() or quantity < 0:
        raise ParseError(
            f"invalid {column} {value!r}: expected a finite number of 0 or more",
            location=f"{kind}.{column}",
        )
    return quantity


# --- Row mappers, one per file. ---


def _map_patient(
    fields: Mapping[str, str], message_id: int, batch: CanonicalBatch
) -> None:
    kind = "patients"
    birth = _optional_text(fields, "BIRTHDATE")
    batch.patients.append(
        Patient(
            patient_id=_text(kind, fields, "Id"),
            source_message_id=message_id,
            family_name=_optional_text(fields, "LAST"),
            given_name=_optional_text(fields, "FIRST"),
            birth_date=_date(kind, fields, "BIRTHDATE") if birth else None,
            gender=_optional_text(fields, "GENDER"),
        )
    )


def _map_encounter(
    fields: Mapping[str, str], message_id: int, batch: CanonicalBatch
) -> None:
    kind = "encounters"
    encounter_id = _text(kind, fields, "Id")
    patient_id = _text(kind, fields, "PATIENT")
    start = _datetime(kind, fields, "START")
    code = _text(kind, fields, "CODE")
    description = _optional_text(fields, "DESCRIPTION")
    batch.encounters.append(
        Encounter(
            encounter_id=encounter_id,
            patient_id=patient_id,
            source_message_id=message_id,
            encounter_class=_optional_text(fields, "ENCOUNTERCLASS"),
            start=start,
            end=_optional_datetime(kind, fields, "STOP"),
            code=code,
            code_system=SNOMED,
        )
    )
    batch.services.append(
        Service(
            service_key=encounter_service_key(encounter_id),
            kind=ServiceKind.ENCOUNTER,
            code_system=SNOMED,
            code=code,
            quantity=_ONE,
            service_date=start.date(),
            patient_id=patient_id,
            encounter_id=encounter_id,
            source_message_id=message_id,
            description=description,
        )
    )
    _map_reason(fields, encounter_id, message_id, batch)


def _map_reason(
    fields: Mapping[str, str], encounter_id: str, message_id: int, batch: CanonicalBatch
) -> None:
    """Record ``REASONCODE`` (SNOMED CT) as a diagnosis of the encounter."""
    reason = _optional_text(fields, "REASONCODE")
    if reason:
        batch.diagnoses.append(
            Diagnosis(
                encounter_id=encounter_id,
                code_system=SNOMED,
                code=reason,
                source_message_id=message_id,
                description=_optional_text(fields, "REASONDESCRIPTION"),
            )
        )


def _map_procedure(
    fields: Mapping[str, str], message_id: int, batch: CanonicalBatch, occurrence: int
) -> None:
    kind = "procedures"
    encounter_id = _text(kind, fields, "ENCOUNTER")
    code = _text(kind, fields, "CODE")
    start = _datetime(kind, fields, "START")
    batch.services.append(
        Service(
            service_key=procedure_service_key(encounter_id, code, start, occurrence),
            kind=ServiceKind.PROCEDURE,
            code_system=SNOMED,
            code=code,
            quantity=_ONE,
            service_date=start.date(),
            patient_id=_text(kind, fields, "PATIENT"),
            encounter_id=encounter_id,
            source_message_id=message_id,
            description=_optional_text(fields, "DESCRIPTION"),
        )
    )
    _map_reason(fields, encounter_id, message_id, batch)


def _map_immunization(
    fields: Mapping[str, str], message_id: int, batch: CanonicalBatch, occurrence: int
) -> None:
    kind = "immunizations"
    encounter_id = _text(kind, fields, "ENCOUNTER")
    code = _text(kind, fields, "CODE")
    given_at = _datetime(kind, fields, "DATE")
    batch.services.append(
        Service(
            service_key=immunization_service_key(
                encounter_id, code, given_at, occurrence
            ),
            kind=ServiceKind.IMMUNIZATION,
            code_system=CVX,
            code=code,
            quantity=_ONE,
            service_date=given_at.date(),
            patient_id=_text(kind, fields, "PATIENT"),
            encounter_id=encounter_id,
            source_message_id=message_id,
            description=_optional_text(fields, "DESCRIPTION"),
        )
    )


def _map_supply(
    fields: Mapping[str, str], message_id: int, batch: CanonicalBatch, occurrence: int
) -> None:
    kind = "supplies"
    patient_id = _text(kind, fields, "PATIENT")
    code = _text(kind, fields, "CODE")
    supplied_on = _date(kind, fields, "DATE")
    batch.supplies.append(
        SupplyUse(
            usage_key=supply_usage_key(patient_id, code, supplied_on, occurrence),
            code_system=SNOMED,
            code=code,
            quantity=_quantity(kind, fields, "QUANTITY"),
            service_date=supplied_on,
            patient_id=patient_id,
            encounter_id=_optional_text(fields, "ENCOUNTER"),
            source_message_id=message_id,
            description=_optional_text(fields, "DESCRIPTION"),
        )
    )


def _base_key(kind: str, fields: Mapping[str, str]) -> str | None:
    """Return the key a row gets with occurrence 1, or ``None`` if it has none."""
    if kind == "procedures":
        start = _datetime(kind, fields, "START")
        return procedure_service_key(
            _text(kind, fields, "ENCOUNTER"), _text(kind, fields, "CODE"), start
        )
    if kind == "immunizations":
        given_at = _datetime(kind, fields, "DATE")
        return immunization_service_key(
            _text(kind, fields, "ENCOUNTER"), _text(kind, fields, "CODE"), given_at
        )
    if kind == "supplies":
        return supply_usage_key(
            _text(kind, fields, "PATIENT"),
            _text(kind, fields, "CODE"),
            _date(kind, fields, "DATE"),
        )
    # Patients and encounters carry their own Id, so a repeated Id is a repeat.
    return None


def number_occurrences(
    kind: str, rows: Iterable[Mapping[str, str] | None]
) -> list[int]:
    """Number each row among the earlier rows of the file that share its key.

    The first row with a given key gets 1, the next identical one 2, and so on.
    Pass the result to :func:`map_synthea_row` as ``occurrence``. Rows that are
    ``None`` (unreadable) or whose key fields are invalid get 1; mapping them
    raises the error.

    Args:
        kind: file stem, one of :data:`SYNTHEA_KINDS`.
        rows: the ``fields`` of every record of one file, in file order.

    Returns:
        One occurrence number per row, in the same order.
    """
    _check_kind(kind)
    seen: Counter[str] = Counter()
    numbers = []
    for fields in rows:
        try:
            key = None if fields is None else _base_key(kind, fields)
        except ParseError:
            key = None
        if key is None:
            numbers.append(1)
            continue
        seen[key] += 1
        numbers.append(seen[key])
    return numbers


_ROW_MAPPERS: dict[str, Callable[..., None]] = {
    "procedures": _map_procedure,
    "immunizations": _map_immunization,
    "supplies": _map_supply,
}


def _check_kind(kind: str) -> None:
    if kind not in SYNTHEA_KINDS:
        raise ParseError(
            f"unknown Synthea CSV kind {kind!r}; "
            f"expected one of {', '.join(SYNTHEA_KINDS)}",
            location=kind,
        )


def map_synthea_row(
    kind: str, fields: Mapping[str, str], message_id: int, *, occurrence: int = 1
) -> CanonicalBatch:
    """Map one row of a Synthea CSV file to canonical records.

    ``encounters`` rows give an Encounter and a Service for the visit itself.
    The ``BASE_COST`` and claim-cost columns are not read, because the
    chargemaster prices services.

    Args:
        kind: file stem, one of :data:`SYNTHEA_KINDS`.
        fields: the row as column name to value.
        message_id: id of the stored raw row.
        occurrence: the row's number among identical rows of its file, from
            :func:`number_occurrences`; 1 for the first or only one.

    Returns:
        The records of the row.

    Raises:
        ParseError: unknown ``kind``, or a required column missing, empty or
            invalid; the location is ``kind.COLUMN``.
    """
    _check_kind(kind)
    batch = CanonicalBatch()
    if kind == "patients":
        _map_patient(fields, message_id, batch)
    elif kind == "encounters":
        _map_encounter(fields, message_id, batch)
    else:
        _ROW_MAPPERS[kind](fields, message_id, batch, occurrence)
    logger.debug("mapped Synthea %s row, message %d", kind, message_id)
    return batch
