"""Map FHIR R4 resources and Bundles to canonical records.

Input is a document from :func:`carebridge.ingest.fhir.json.load_fhir_json`,
so decimals are already ``Decimal``. Finance-relevant resources map as follows
(element paths are FHIR R4):

* Patient → Patient
* Encounter → Encounter, plus a Service for the visit from ``Encounter.type``
* Procedure → Service (``Procedure.code``, ``performed[x]``)
* Immunization → Service (``Immunization.vaccineCode``, CVX)
* SupplyDelivery → SupplyUse (``suppliedItem.itemCodeableConcept``,
  ``suppliedItem.quantity``)
* ChargeItem → Service priced by ``ChargeItem.priceOverride``

Every other resource type is counted in ``CanonicalBatch.ignored``. Service
and usage keys follow the scheme in :mod:`carebridge.ingest.files.synthea`, so
a Synthea event delivered both as CSV and as FHIR gets one key.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from carebridge.errors import ParseError
from carebridge.ingest.files.synthea import (
    encounter_service_key,
    immunization_service_key,
    procedure_service_key,
    supply_usage_key,
)
from carebridge.model.codes import CVX, SNOMED, code_system_from
from carebridge.model.records import (
    CanonicalBatch,
    Encounter,
    Patient,
    Service,
    ServiceKind,
    SupplyUse,
)

logger = logging.getLogger(__name__)

_ONE = Decimal(1)
_BUNDLE_TYPES = frozenset({"transaction", "batch", "collection"})

# Statuses (FHIR R4 value sets) under which a resource documents no billable event.
_NOT_PERFORMED = {
    "Encounter": frozenset({"planned", "cancelled", "entered-in-error"}),
    "Procedure": frozenset({"preparation", "not-done", "entered-in-error"}),
    "Immunization": frozenset({"not-done", "entered-in-error"}),
    "SupplyDelivery": frozenset({"in-progress", "abandoned", "entered-in-error"}),
    "ChargeItem": frozenset(
        {"planned", "not-billable", "aborted", "entered-in-error", "unknown"}
    ),
}


@dataclass(slots=True)
class _Context:
    """State shared by the resources of one document."""

    message_id: int
    batch: CanonicalBatch
    full_urls: dict[str, tuple[str, str]] = field(default_factory=dict)
    occurrences: Counter[str] = field(default_factory=Counter)

    def occurrence(self, base_key: str) -> int:
        """Number ``base_key`` among the earlier events of this document with that key."""
        self.occurrences[base_key] += 1
        return self.occurrences[base_key]


def map_fhir(document: dict[str, Any], message_id: int) -> CanonicalBatch:
    """Map one FHIR resource, or a transaction, batch or collection Bundle.

    In a Bundle, references to ``fullUrl`` values (``urn:uuid:…``) and relative
    references (``Encounter/{id}``) resolve to resource ids. Identical
    procedures, immunizations or supplies within one document are numbered in
    entry order, as :func:`carebridge.ingest.files.synthea.number_occurrences`
    numbers CSV rows.

    Args:
        document: a resource from :func:`~carebridge.ingest.fhir.json.load_fhir_json`.
        message_id: id of the stored raw message.

    Returns:
        The canonical records; other resource types are counted in ``ignored``.

    Raises:
        ParseError: an unsupported Bundle type, or a required element that is
            missing or invalid; ``location`` is its element path.
    """
    batch = CanonicalBatch()
    context = _Context(message_id=message_id, batch=batch)
    resource_type = document.get("resourceType")
    if resource_type == "Bundle":
        _map_bundle(document, context, "Bundle")
    else:
        _map_resource(document, context, str(resource_type))
    logger.debug(
        "mapped FHIR %s, message %d: %d services, %d supplies, ignored %s",
        resource_type,
        message_id,
        len(batch.services),
        len(batch.supplies),
        batch.ignored,
    )
    return batch


def _map_bundle(bundle: dict[str, Any], context: _Context, path: str) -> None:
    bundle_type = bundle.get("type")
    if bundle_type not in _BUNDLE_TYPES:
        raise ParseError(
            f"unsupported Bundle.type {bundle_type!r}; expected one of "
            f"{', '.join(sorted(_BUNDLE_TYPES))}",
            location=f"{path}.type",
        )
    entries = bundle.get("entry", [])
    for entry in entries:
        resource = entry.get("resource")
        full_url = entry.get("fullUrl")
        if isinstance(resource, dict) and full_url:
            resource_id = _resource_id(resource, full_url)
            if resource_id:
                context.full_urls[full_url] = (resource["resourceType"], resource_id)
    for index, entry in enumerate(entries):
        resource = entry.get("resource")
        entry_path = f"{path}.entry[{index}].resource"
        if resource is None:
            context.batch.ignore("Bundle.entry without resource")
            continue
        resource = dict(resource)
        if "id" not in resource and entry.get("fullUrl"):
            resource["id"] = _resource_id(resource, entry["fullUrl"])
        if resource.get("resourceType") == "Bundle":
            _map_bundle(resource, context, entry_path)
        else:
            _map_resource(resource, context, entry_path)


def _resource_id(resource: dict[str, Any], full_url: str) -> str | None:
    if resource.get("id"):
        return str(resource["id"])
    if full_url.startswith("urn:uuid:"):
        return full_url.removeprefix("urn:uuid:")
    return full_url.rstrip("/").rsplit("/", 1)[-1] or None


def _map_resource(resource: dict[str, Any], context: _Context, path: str) -> None:
    resource_type = resource.get("resourceType")
    mapper = _MAPPERS.get(str(resource_type))
    if mapper is None:
        context.batch.ignore(str(resource_type))
        return
    status = resource.get("status")
    # A cancelled Encounter is still recorded; its mapper skips only the service.
    not_performed = _NOT_PERFORMED.get(str(resource_type), frozenset())
    if status in not_performed and resource_type != "Encounter":
        context.batch.ignore(f"{resource_type} with status {status}")
        return
    mapper(resource, context, path)


# --- Element readers ---


def reference_id(
    reference: dict[str, Any] | None,
    expected_types: Iterable[str],
    context: _Context,
    path: str,
) -> str | None:
    """Resolve a Reference to the id of the resource it points to.

    Returns ``None`` for a missing reference, a contained (``#``) or a
    conditional (``Type?search``) reference, which name no id.
    """
    resolved = _resolve_reference(reference, tuple(expected_types), context, path)
    return resolved[1] if resolved else None


def _resolve_reference(
    reference: dict[str, Any] | None,
    expected: tuple[str, ...],
    context: _Context,
    path: str,
) -> tuple[str, str] | None:
    """Return ``(resource type, id)``; the type is ``""`` for an unknown urn:uuid."""
    if not reference or not reference.get("reference"):
        return None
    text = str(reference["reference"])
    if text in context.full_urls:
        target_type, target_id = context.full_urls[text]
    elif text.startswith("urn:uuid:"):
        target_type, target_id = "", text.removeprefix("urn:uuid:")
    elif text.startswith("#") or "?" in text:
        return None
    else:
        parts = text.split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        if len(parts) < 2:
            raise ParseError(f"invalid reference {text!r}", location=f"{path}.reference")
        target_type, target_id = parts[-2], parts[-1]
    if target_type and target_type not in expected:
        raise ParseError(
            f"reference {text!r} points to {target_type}; expected {' or '.join(expected)}",
            location=f"{path}.reference",
        )
    return target_type, target_id


def fhir_datetime(value: Any, path: str) -> dt.datetime | dt.date | None:
    """Read a FHIR dateTime: an aware UTC datetime, a date, or ``None``.

    A value with a time gives a datetime in UTC (FHIR requires the offset when
    a time is present). A full date gives a date. A year or year-month, or a
    missing value, gives ``None``.
    """
    if value is None:
        return None
    text = str(value)
    try:
        if "T" in text:
            moment = dt.datetime.fromisoformat(text)
            if moment.tzinfo is None:
                raise ValueError("time without a UTC offset")
            return moment.astimezone(dt.UTC)
        if len(text) == 10:
            return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise ParseError(f"invalid dateTime {text!r}: {exc}", location=path) from exc
    return None


def _as_date(value: dt.datetime | dt.date | None) -> dt.date | None:
    if isinstance(value, dt.datetime):
        return value.date()
    return value


def fhir_decimal(value: Any, path: str) -> Decimal:
    """Return a FHIR decimal element as ``Decimal``, rejecting floats and strings.

    A float means the JSON was parsed without ``parse_float=Decimal`` and its
    precision is already lost, so it is rejected rather than converted.
    """
    if isinstance(value, Decimal) and value.is_finite():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, float):
        raise ParseError(
            f"decimal {value!r} was parsed as a float; parse FHIR JSON with "
            "load_fhir_json so that precision is kept",
            location=path,
        )
    raise ParseError(f"invalid decimal {value!r}: expected a JSON number", location=path)


def pick_coding(
    concept: dict[str, Any] | None, preferred_system: str | None
) -> tuple[str, str, str | None] | None:
    """Choose one coding of a CodeableConcept: ``(code_system, code, display)``.

    The first coding in ``preferred_system`` wins, then the first in a system
    carebridge recognises, then the first with a code; an unrecognised system
    keeps its URI as the code system. Returns ``None`` if no coding has a code.
    """
    codings = [c for c in (concept or {}).get("coding", []) if c.get("code")]
    if not codings:
        return None
    systems = [code_system_from(c.get("system")) for c in codings]
    index = next((i for i, s in enumerate(systems) if s and s == preferred_system), None)
    if index is None:
        index = next((i for i, s in enumerate(systems) if s), 0)
    chosen = codings[index]
    system = systems[index] or str(chosen.get("system") or "")
    display = chosen.get("display") or (concept or {}).get("text")
    return system, str(chosen["code"]), display


def _required_id(resource: dict[str, Any], path: str) -> str:
    resource_id = resource.get("id")
    if not resource_id:
        raise ParseError("missing resource id", location=f"{path}.id")
    return str(resource_id)


def _required_patient(
    resource: dict[str, Any], element: str, context: _Context, path: str
) -> str:
    patient_id = reference_id(resource.get(element), ("Patient",), context, f"{path}.{element}")
    if not patient_id:
        raise ParseError("missing patient reference", location=f"{path}.{element}")
    return patient_id


def _fallback_key(resource: dict[str, Any], path: str) -> str:
    # Events without an encounter or a full date-time cannot use the shared
    # scheme; the resource id is stable for re-sends of the same resource only.
    return f"fhir:{resource['resourceType']}/{_required_id(resource, path)}"


# --- Resource mappers ---


def _map_patient(resource: dict[str, Any], context: _Context, path: str) -> None:
    names = resource.get("name") or [{}]
    name = next((n for n in names if n.get("use") == "official"), names[0])
    given = name.get("given") or [None]
    birth = resource.get("birthDate")
    context.batch.patients.append(
        Patient(
            patient_id=_required_id(resource, path),
            source_message_id=context.message_id,
            mrn=_medical_record_number(resource.get("identifier", [])),
            family_name=name.get("family"),
            given_name=given[0],
            birth_date=_as_date(fhir_datetime(birth, f"{path}.birthDate")),
            gender=resource.get("gender"),
        )
    )


def _medical_record_number(identifiers: list[dict[str, Any]]) -> str | None:
    # Identifier.type uses HL7 v2 table 0203, where MR is the medical record number.
    for identifier in identifiers:
        codings = (identifier.get("type") or {}).get("coding", [])
        if any(c.get("code") == "MR" for c in codings) and identifier.get("value"):
            return str(identifier["value"])
    return None


def _map_encounter(resource: dict[str, Any], context: _Context, path: str) -> None:
    encounter_id = _required_id(resource, path)
    patient_id = _required_patient(resource, "subject", context, path)
    period = resource.get("period") or {}
    start = fhir_datetime(period.get("start"), f"{path}.period.start")
    end = fhir_datetime(period.get("end"), f"{path}.period.end")
    coding = next(
        (c for t in resource.get("type", []) if (c := pick_coding(t, SNOMED))), None
    )
    context.batch.encounters.append(
        Encounter(
            encounter_id=encounter_id,
            patient_id=patient_id,
            source_message_id=context.message_id,
            encounter_class=(resource.get("class") or {}).get("code"),
            start=start if isinstance(start, dt.datetime) else None,
            end=end if isinstance(end, dt.datetime) else None,
            code=coding[1] if coding else None,
            code_system=coding[0] if coding else None,
        )
    )
    status = resource.get("status")
    if status in _NOT_PERFORMED["Encounter"]:
        context.batch.ignore(f"Encounter with status {status}")
        return
    if coding is None:
        context.batch.warnings.append(
            f"Encounter {encounter_id} has no coded Encounter.type; no visit service"
        )
        return
    context.batch.services.append(
        Service(
            service_key=encounter_service_key(encounter_id),
            kind=ServiceKind.ENCOUNTER,
            code_system=coding[0],
            code=coding[1],
            quantity=_ONE,
            service_date=_as_date(start),
            patient_id=patient_id,
            encounter_id=encounter_id,
            source_message_id=context.message_id,
            description=coding[2],
        )
    )


def _map_procedure(resource: dict[str, Any], context: _Context, path: str) -> None:
    coding = pick_coding(resource.get("code"), SNOMED)
    if coding is None:
        raise ParseError("Procedure has no coded Procedure.code", location=f"{path}.code")
    if "performedPeriod" in resource:
        element = "performedPeriod.start"
        performed = resource["performedPeriod"].get("start")
    else:
        element, performed = "performedDateTime", resource.get("performedDateTime")
    start = fhir_datetime(performed, f"{path}.{element}")
    encounter_id = reference_id(
        resource.get("encounter"), ("Encounter",), context, f"{path}.encounter"
    )
    if encounter_id and isinstance(start, dt.datetime):
        base = procedure_service_key(encounter_id, coding[1], start)
        occurrence = context.occurrence(base)
        key = procedure_service_key(encounter_id, coding[1], start, occurrence)
    else:
        key = _fallback_key(resource, path)
    context.batch.services.append(
        Service(
            service_key=key,
            kind=ServiceKind.PROCEDURE,
            code_system=coding[0],
            code=coding[1],
            quantity=_ONE,
            service_date=_as_date(start),
            patient_id=_required_patient(resource, "subject", context, path),
            encounter_id=encounter_id,
            source_message_id=context.message_id,
            description=coding[2],
        )
    )


def _map_immunization(resource: dict[str, Any], context: _Context, path: str) -> None:
    coding = pick_coding(resource.get("vaccineCode"), CVX)
    if coding is None:
        raise ParseError(
            "Immunization has no coded vaccineCode", location=f"{path}.vaccineCode"
        )
    given_at = fhir_datetime(
        resource.get("occurrenceDateTime"), f"{path}.occurrenceDateTime"
    )
    encounter_id = reference_id(
        resource.get("encounter"), ("Encounter",), context, f"{path}.encounter"
    )
    if encounter_id and isinstance(given_at, dt.datetime):
        base = immunization_service_key(encounter_id, coding[1], given_at)
        occurrence = context.occurrence(base)
        key = immunization_service_key(encounter_id, coding[1], given_at, occurrence)
    else:
        key = _fallback_key(resource, path)
    context.batch.services.append(
        Service(
            service_key=key,
            kind=ServiceKind.IMMUNIZATION,
            code_system=coding[0],
            code=coding[1],
            quantity=_ONE,
            service_date=_as_date(given_at),
            patient_id=_required_patient(resource, "patient", context, path),
            encounter_id=encounter_id,
            source_message_id=context.message_id,
            description=coding[2],
        )
    )


def _local_date(value: Any) -> dt.date | None:
    # Synthea writes the supply DATE as the calendar date of the local
    # occurrenceDateTime, so the date part is read as written, not in UTC.
    text = str(value or "")
    return dt.date.fromisoformat(text[:10]) if len(text) >= 10 else None


def _map_supply_delivery(resource: dict[str, Any], context: _Context, path: str) -> None:
    item = resource.get("suppliedItem") or {}
    item_path = f"{path}.suppliedItem"
    coding = pick_coding(item.get("itemCodeableConcept"), SNOMED)
    if coding is None:
        # An itemReference (Medication, Substance, Device) carries no code here.
        context.batch.ignore("SupplyDelivery without itemCodeableConcept")
        context.batch.warnings.append(
            f"SupplyDelivery {resource.get('id')} has no coded suppliedItem; not posted"
        )
        return
    quantity_element = item.get("quantity")
    if quantity_element is None:
        quantity = _ONE
        context.batch.warnings.append(
            f"SupplyDelivery {resource.get('id')} has no suppliedItem.quantity; using 1"
        )
    else:
        quantity = fhir_decimal(quantity_element.get("value"), f"{item_path}.quantity.value")
    occurred = resource.get("occurrenceDateTime") or (
        resource.get("occurrencePeriod") or {}
    ).get("start")
    fhir_datetime(occurred, f"{path}.occurrenceDateTime")  # validates the value
    supplied_on = _local_date(occurred)
    patient_id = _required_patient(resource, "patient", context, path)
    if supplied_on is not None:
        base = supply_usage_key(patient_id, coding[1], supplied_on)
        key = supply_usage_key(patient_id, coding[1], supplied_on, context.occurrence(base))
    else:
        key = _fallback_key(resource, path)
    context.batch.supplies.append(
        SupplyUse(
            usage_key=key,
            code_system=coding[0],
            code=coding[1],
            quantity=quantity,
            service_date=supplied_on,
            patient_id=patient_id,
            encounter_id=None,  # R4 SupplyDelivery has no encounter element
            source_message_id=context.message_id,
            description=coding[2],
        )
    )


def _map_charge_item(resource: dict[str, Any], context: _Context, path: str) -> None:
    coding = pick_coding(resource.get("code"), None)
    if coding is None:
        raise ParseError("ChargeItem has no coded ChargeItem.code", location=f"{path}.code")
    quantity_element = resource.get("quantity")
    quantity = (
        fhir_decimal(quantity_element.get("value"), f"{path}.quantity.value")
        if quantity_element
        else _ONE
    )
    price = resource.get("priceOverride")
    amount = fhir_decimal(price.get("value"), f"{path}.priceOverride.value") if price else None
    if "factorOverride" in resource:
        context.batch.warnings.append(
            f"ChargeItem {resource.get('id')}: factorOverride is not applied"
        )
    occurred = resource.get("occurrenceDateTime") or (
        resource.get("occurrencePeriod") or {}
    ).get("start")
    context.batch.services.append(
        Service(
            service_key=_fallback_key(resource, path),
            kind=ServiceKind.CHARGE_ITEM,
            code_system=coding[0],
            code=coding[1],
            quantity=quantity,
            service_date=_as_date(fhir_datetime(occurred, f"{path}.occurrence[x]")),
            patient_id=reference_id(
                resource.get("subject"), ("Patient",), context, f"{path}.subject"
            ),
            encounter_id=_charge_item_encounter(resource, context, path),
            source_message_id=context.message_id,
            description=coding[2],
            amount=amount,
            currency=str((price or {}).get("currency") or "USD"),
        )
    )


def _charge_item_encounter(
    resource: dict[str, Any], context: _Context, path: str
) -> str | None:
    # ChargeItem.context may also be an EpisodeOfCare, which is not an encounter.
    resolved = _resolve_reference(
        resource.get("context"), ("Encounter", "EpisodeOfCare"), context, f"{path}.context"
    )
    if resolved is None or resolved[0] == "EpisodeOfCare":
        return None
    return resolved[1]


_MAPPERS = {
    "Patient": _map_patient,
    "Encounter": _map_encounter,
    "Procedure": _map_procedure,
    "Immunization": _map_immunization,
    "SupplyDelivery": _map_supply_delivery,
    "ChargeItem": _map_charge_item,
}


def claim_amounts(claim: dict[str, Any]) -> tuple[list[Decimal], Decimal | None]:
    """Return the net amount of each Claim item and the Claim total.

    ``Claim.item.net`` is used where present; otherwise the net is computed as
    FHIR defines it, ``quantity × unitPrice × factor`` (quantity and factor
    default to 1). Amounts keep their lexical scale (``135.50`` stays
    ``Decimal("135.50")``). Comparing the total with the items is left to the
    caller.

    Args:
        claim: a Claim from :func:`~carebridge.ingest.fhir.json.load_fhir_json`.

    Returns:
        The item nets in item order, and ``Claim.total.value`` or ``None``.

    Raises:
        ParseError: an item with neither ``net`` nor ``unitPrice``, or an
            amount that is not a JSON number; ``location`` is its element path.
    """
    items = []
    for index, item in enumerate(claim.get("item", [])):
        item_path = f"Claim.item[{index}]"
        if item.get("net") is not None:
            items.append(fhir_decimal(item["net"].get("value"), f"{item_path}.net.value"))
            continue
        if item.get("unitPrice") is None:
            raise ParseError("item has neither net nor unitPrice", location=item_path)
        unit_price = fhir_decimal(item["unitPrice"].get("value"), f"{item_path}.unitPrice.value")
        quantity = (item.get("quantity") or {}).get("value", 1)
        factor = item.get("factor", 1)
        items.append(
            fhir_decimal(quantity, f"{item_path}.quantity.value")
            * unit_price
            * fhir_decimal(factor, f"{item_path}.factor")
        )
    total = claim.get("total")
    total_value = None if total is None else fhir_decimal(total.get("value"), "Claim.total.value")
    return items, total_value
