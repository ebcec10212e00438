"""Map FHIR R4 resources and Bundles to canonical records.

Input is a document from :func:`carebridge.ingest.fhir.json.load_fhir_json`,
so decimals are already ``Decimal``. Finance-relevant resources map as follows
(element paths are FHIR R4):

* Patient → Patient
* Encounter → Encounter, plus a Service for the visit from ``Encounter.type``
* Procedure → Service (``Procedure.code``, ``performed[x]``)
* Condition with ``Condition.encounter``, and ``Encounter.reasonCode`` → Diagnosis
* Immunization → Service (``Immunization.vaccineCode``, CVX)
* SupplyDelivery → SupplyUse (``suppliedItem.itemCodeableConcept``,
  ``suppliedItem.quantity``)
* ChargeItem → Service priced by ``ChargeItem.priceOverride``

Every other resource type is counted in ``CanonicalBatch.ignored``. Service
and usage keys follow the scheme in :mod:`carebridge.ingest.files.synthea`, so
a Synthea event delivered both as CSV and as FHIR gets one key.

NOTE: every FHIR source uses that ``synthea:`` key scheme, which assumes
encounter ids are unique across senders (true of Synthea UUIDs). ChargeItems
and events without an encounter or a full date-time are keyed by resource id
(``fhir:{type}/{id}``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from carebridge.errors import ParseError
from carebridge.ingest.fhir.elements import (
    as_date,
    fhir_datetime,
    fhir_decimal,
    pick_coding,
    reference_id,
    resolve_reference,
)
from carebridge.ingest.files.synthea import (
    encounter_service_key,
    immunization_service_key,
    procedure_service_key,
    supply_usage_key,
)
from carebridge.model.authorizations import Authorization, AuthorizationStatus
from carebridge.model.codes import CVX, ICD10CM, SNOMED
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

_ONE = Decimal(1)
# Condition.verificationStatus codes under which the condition is no diagnosis.
_NOT_DIAGNOSED = frozenset({"refuted", "entered-in-error"})
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
        """Count ``base_key`` and return its occurrence number in this document."""
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


def _required_id(resource: dict[str, Any], path: str) -> str:
    resource_id = resource.get("id")
    if not resource_id:
        raise ParseError("missing resource id", location=f"{path}.id")
    return str(resource_id)


def _required_patient(
    resource: dict[str, Any], element: str, context: _Context, path: str
) -> str:
    patient_id = reference_id(
        resource.get(element), ("Patient",), context.full_urls, f"{path}.{element}"
    )
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
            birth_date=as_date(fhir_datetime(birth, f"{path}.birthDate")),
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
    for reason in resource.get("reasonCode") or []:
        _add_diagnosis(reason, encounter_id, context)
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
            service_date=as_date(start),
            patient_id=patient_id,
            encounter_id=encounter_id,
            source_message_id=context.message_id,
            description=coding[2],
        )
    )


def _map_procedure(resource: dict[str, Any], context: _Context, path: str) -> None:
    coding = pick_coding(resource.get("code"), SNOMED)
    if coding is None:
        raise ParseError(
            "Procedure has no coded Procedure.code", location=f"{path}.code"
        )
    if "performedPeriod" in resource:
        element = "performedPeriod.start"
        performed = resource["performedPeriod"].get("start")
    else:
        element, performed = "performedDateTime", resource.get("performedDateTime")
    start = fhir_datetime(performed, f"{path}.{element}")
    encounter_id = reference_id(
        resource.get("encounter"),
        ("Encounter",),
        context.full_urls,
        f"{path}.encounter",
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
            service_date=as_date(start),
            patient_id=_required_patient(resource, "subject", context, path),
            encounter_id=encounter_id,
            source_message_id=context.message_id,
            description=coding[2],
        )
    )


def _map_condition(resource: dict[str, Any], context: _Context, path: str) -> None:
    verification = pick_coding(resource.get("verificationStatus"), None)
    if verification and verification[1] in _NOT_DIAGNOSED:
        context.batch.ignore(f"Condition with verificationStatus {verification[1]}")
        return
    encounter_id = reference_id(
        resource.get("encounter"), ("Encounter",), context.full_urls, f"{path}.encounter"
    )
    if not encounter_id:
        context.batch.ignore("Condition without encounter")
        return
    if not _add_diagnosis(resource.get("code"), encounter_id, context):
        context.batch.ignore("Condition without a coded Condition.code")


def _add_diagnosis(
    concept: dict[str, Any] | None, encounter_id: str, context: _Context
) -> bool:
    """Record a coded concept as a diagnosis of the encounter; ICD-10-CM wins."""
    coding = pick_coding(concept, ICD10CM)
    if coding is None:
        return False
    context.batch.diagnoses.append(
        Diagnosis(
            encounter_id=encounter_id,
            code_system=coding[0],
            code=coding[1],
            source_message_id=context.message_id,
            description=coding[2],
        )
    )
    return True


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
        resource.get("encounter"),
        ("Encounter",),
        context.full_urls,
        f"{path}.encounter",
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
            service_date=as_date(given_at),
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


def _supplied_quantity(
    resource: dict[str, Any], context: _Context, path: str
) -> Decimal:
    quantity = (resource.get("suppliedItem") or {}).get("quantity")
    if quantity is None:
        context.batch.warnings.append(
            f"SupplyDelivery {resource.get('id')} has no suppliedItem.quantity; using 1"
        )
        return _ONE
    return fhir_decimal(quantity.get("value"), f"{path}.suppliedItem.quantity.value")


def _map_supply_delivery(
    resource: dict[str, Any], context: _Context, path: str
) -> None:
    item = resource.get("suppliedItem") or {}
    coding = pick_coding(item.get("itemCodeableConcept"), SNOMED)
    if coding is None:
        # An itemReference (Medication, Substance, Device) carries no code here.
        context.batch.ignore("SupplyDelivery without itemCodeableConcept")
        context.batch.warnings.append(
            f"SupplyDelivery {resource.get('id')} has no coded suppliedItem; not posted"
        )
        return
    quantity = _supplied_quantity(resource, context, path)
    if "occurrenceDateTime" in resource:
        element, occurred = "occurrenceDateTime", resource["occurrenceDateTime"]
    else:
        element = "occurrencePeriod.start"
        occurred = (resource.get("occurrencePeriod") or {}).get("start")
    fhir_datetime(occurred, f"{path}.{element}")  # raises if the value is invalid
    supplied_on = _local_date(occurred)
    patient_id = _required_patient(resource, "patient", context, path)
    if supplied_on is not None:
        base = supply_usage_key(patient_id, coding[1], supplied_on)
        key = supply_usage_key(
            patient_id, coding[1], supplied_on, context.occurrence(base)
        )
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
        raise ParseError(
            "ChargeItem has no coded ChargeItem.code", location=f"{path}.code"
        )
    quantity_element = resource.get("quantity")
    quantity = (
        fhir_decimal(quantity_element.get("value"), f"{path}.quantity.value")
        if quantity_element
        else _ONE
    )
    price = resource.get("priceOverride")
    amount = (
        fhir_decimal(price.get("value"), f"{path}.priceOverride.value")
        if price
        else None
    )
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
            service_date=as_date(fhir_datetime(occurred, f"{path}.occurrence[x]")),
            patient_id=reference_id(
                resource.get("subject"),
                ("Patient",),
                context.full_urls,
                f"{path}.subject",
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
    resolved = resolve_reference(
        resource.get("context"),
        ("Encounter", "EpisodeOfCare"),
        context.full_urls,
        f"{path}.context",
    )
    if resolved is None or resolved[0] == "EpisodeOfCare":
        return None
    return resolved[1]


_MAPPERS = {
    "Patient": _map_patient,
    "Encounter": _map_encounter,
    "Procedure": _map_procedure,
    "Condition": _map_condition,
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
            items.append(
                fhir_decimal(item["net"].get("value"), f"{item_path}.net.value")
            )
            continue
        if item.get("unitPrice") is None:
            raise ParseError("item has neither net nor unitPrice", location=item_path)
        unit_price = fhir_decimal(
            item["unitPrice"].get("value"), f"{item_path}.unitPrice.value"
        )
        quantity = (item.get("quantity") or {}).get("value", 1)
        factor = item.get("factor", 1)
        items.append(
            fhir_decimal(quantity, f"{item_path}.quantity.value")
            * unit_price
            * fhir_decimal(factor, f"{item_path}.factor")
        )
    total = claim.get("total")
    total_value = (
        None if total is None else fhir_decimal(total.get("value"), "Claim.total.value")
    )
    return items, total_value


# --- Authorizations (ServiceRequest, preauthorization Claim and ClaimResponse) ---
#
# These resources are not mapped by map_fhir: the authorization workflow reads
# the stored message again and calls map_authorizations, so that charge
# capture and authorizations stay independent.

AUTHORIZATION_RESOURCES = frozenset({"ServiceRequest", "Claim", "ClaimResponse"})
"""Resource types :func:`map_authorizations` reads."""

# ServiceRequest.status (FHIR R4 request-status) as an authorization status.
# An active or completed referral authorizes its service; a draft or one on
# hold does not yet.
_REQUEST_STATUS = {
    "draft": AuthorizationStatus.PENDING,
    "active": AuthorizationStatus.APPROVED,
    "on-hold": AuthorizationStatus.PENDING,
    "revoked": AuthorizationStatus.CANCELLED,
    "completed": AuthorizationStatus.APPROVED,
    "entered-in-error": AuthorizationStatus.CANCELLED,
    "unknown": AuthorizationStatus.PENDING,
}
# Claim.status (FHIR R4 fm-status): a preauthorization request waits for
# its ClaimResponse unless it was withdrawn.
_CLAIM_STATUS = {
    "active": AuthorizationStatus.PENDING,
    "draft": AuthorizationStatus.PENDING,
    "cancelled": AuthorizationStatus.CANCELLED,
    "entered-in-error": AuthorizationStatus.CANCELLED,
}
ALL_ITEMS = "*"
"""Item sequence of a ClaimResponse decision that covers every item of its Claim."""


def map_authorizations(document: dict[str, Any], message_id: int) -> list[Authorization]:
    """Map ServiceRequests and preauthorization Claims and ClaimResponses to authorizations.

    A ServiceRequest gives one authorization keyed ``fhir:ServiceRequest/{id}``.
    A Claim with ``use = preauthorization`` gives one per item, keyed
    ``fhir:Claim/{id}#{item.sequence}``, pending until its ClaimResponse:
    outcome ``complete`` or ``partial`` approves each item it lists (an item
    with an adjudication ``reason`` is denied), ``error`` denies them, and a
    ClaimResponse without items decides every item (key ``...#*``). Other
    resources, and Claims for other uses, are skipped.

    Raises:
        ParseError: a required element is missing or invalid; ``location``
            is its element path.
    """
    found: list[Authorization] = []
    resource_type = document.get("resourceType")
    if resource_type == "Bundle":
        full_urls: dict[str, tuple[str, str]] = {}
        entries = document.get("entry", [])
        for entry in entries:
            resource = entry.get("resource")
            if isinstance(resource, dict) and entry.get("fullUrl"):
                resource_id = _resource_id(resource, entry["fullUrl"])
                if resource_id:
                    full_urls[entry["fullUrl"]] = (resource["resourceType"], resource_id)
        for index, entry in enumerate(entries):
            resource = entry.get("resource")
            if not isinstance(resource, dict):
                continue
            resource = dict(resource)
            if "id" not in resource and entry.get("fullUrl"):
                resource["id"] = _resource_id(resource, entry["fullUrl"])
            path = f"Bundle.entry[{index}].resource"
            found.extend(_authorizations_of(resource, message_id, full_urls, path))
    else:
        found.extend(_authorizations_of(document, message_id, {}, str(resource_type)))
    return found


def _authorizations_of(
    resource: dict[str, Any],
    message_id: int,
    full_urls: dict[str, tuple[str, str]],
    path: str,
) -> list[Authorization]:
    resource_type = resource.get("resourceType")
    if resource_type not in AUTHORIZATION_RESOURCES:
        return []
    if resource_type != "ServiceRequest" and resource.get("use") != "preauthorization":
        return []
    if resource_type == "ServiceRequest":
        return [_service_request(resource, message_id, full_urls, path)]
    if resource_type == "Claim":
        return _preauthorization_claim(resource, message_id, full_urls, path)
    return _preauthorization_response(resource, message_id, full_urls, path)


def _period_dates(
    period: dict[str, Any] | None, path: str
) -> tuple[dt.date | None, dt.date | None]:
    period = period or {}
    start = as_date(fhir_datetime(period.get("start"), f"{path}.start"))
    end = as_date(fhir_datetime(period.get("end"), f"{path}.end"))
    return start, end


def _service_request(
    resource: dict[str, Any],
    message_id: int,
    full_urls: dict[str, tuple[str, str]],
    path: str,
) -> Authorization:
    resource_id = _required_id(resource, path)
    coding = pick_coding(resource.get("code"), None)
    if coding is None:
        raise ParseError("ServiceRequest has no coded code", location=f"{path}.code")
    status = _REQUEST_STATUS.get(str(resource.get("status")))
    if status is None:
        raise ParseError(
            f"unknown ServiceRequest.status {resource.get('status')!r}",
            location=f"{path}.status",
        )
    units = None
    quantity = resource.get("quantityQuantity")
    if quantity is not None:
        units = fhir_decimal(quantity.get("value"), f"{path}.quantityQuantity.value")
    if "occurrencePeriod" in resource:
        valid_from, valid_to = _period_dates(
            resource["occurrencePeriod"], f"{path}.occurrencePeriod"
        )
    else:
        valid_from = as_date(
            fhir_datetime(resource.get("occurrenceDateTime"), f"{path}.occurrenceDateTime")
        )
        valid_to = None
    identifiers = resource.get("identifier") or []
    reference = next((str(i["value"]) for i in identifiers if i.get("value")), None)
    patient = reference_id(resource.get("subject"), ("Patient",), full_urls, f"{path}.subject")
    key = f"fhir:ServiceRequest/{resource_id}"
    return Authorization(
        auth_key=key,
        source="fhir:ServiceRequest",
        status=status,
        patient_id=patient,
        code_system=coding[0],
        code=coding[1],
        source_message_id=message_id,
        units=units,
        valid_from=valid_from,
        valid_to=valid_to,
        reference=reference,
        request_key=key,
    )


def _preauthorization_claim(
    resource: dict[str, Any],
    message_id: int,
    full_urls: dict[str, tuple[str, str]],
    path: str,
) -> list[Authorization]:
    resource_id = _required_id(resource, path)
    status = _CLAIM_STATUS.get(str(resource.get("status")))
    if status is None:
        raise ParseError(
            f"unknown Claim.status {resource.get('status')!r}", location=f"{path}.status"
        )
    patient = reference_id(resource.get("patient"), ("Patient",), full_urls, f"{path}.patient")
    request_key = f"fhir:Claim/{resource_id}"
    found = []
    for index, item in enumerate(resource.get("item") or []):
        item_path = f"{path}.item[{index}]"
        coding = pick_coding(item.get("productOrService"), None)
        if coding is None:
            raise ParseError(
                "Claim item has no coded productOrService",
                location=f"{item_path}.productOrService",
            )
        quantity = item.get("quantity")
        units = (
            fhir_decimal(quantity.get("value"), f"{item_path}.quantity.value")
            if quantity is not None
            else None
        )
        if "servicedPeriod" in item:
            valid_from, valid_to = _period_dates(
                item["servicedPeriod"], f"{item_path}.servicedPeriod"
            )
        else:
            valid_from = as_date(
                fhir_datetime(item.get("servicedDate"), f"{item_path}.servicedDate")
            )
            valid_to = None
        found.append(
            Authorization(
                auth_key=f"{request_key}#{item.get('sequence', index + 1)}",
                source="fhir:Claim",
                status=status,
                patient_id=patient,
                code_system=coding[0],
                code=coding[1],
                source_message_id=message_id,
                units=units,
                valid_from=valid_from,
                valid_to=valid_to,
                request_key=request_key,
            )
        )
    return found


def _preauthorization_response(
    resource: dict[str, Any],
    message_id: int,
    full_urls: dict[str, tuple[str, str]],
    path: str,
) -> list[Authorization]:
    claim_id = reference_id(resource.get("request"), ("Claim",), full_urls, f"{path}.request")
    if not claim_id:
        raise ParseError(
            "preauthorization ClaimResponse names no request Claim",
            location=f"{path}.request",
        )
    outcome = resource.get("outcome")
    if outcome == "queued":
        decided = AuthorizationStatus.PENDING
    elif outcome in ("complete", "partial"):
        decided = AuthorizationStatus.APPROVED
    elif outcome == "error":
        decided = AuthorizationStatus.DENIED
    else:
        raise ParseError(
            f"unknown ClaimResponse.outcome {outcome!r}", location=f"{path}.outcome"
        )
    valid_from, valid_to = _period_dates(
        resource.get("preAuthPeriod"), f"{path}.preAuthPeriod"
    )
    patient = reference_id(resource.get("patient"), ("Patient",), full_urls, f"{path}.patient")
    request_key = f"fhir:Claim/{claim_id}"

    def decision(sequence: object, status: AuthorizationStatus) -> Authorization:
        return Authorization(
            auth_key=f"{request_key}#{sequence}",
            source="fhir:ClaimResponse",
            status=status,
            patient_id=patient,
            code_system=None,
            code=None,
            source_message_id=message_id,
            valid_from=valid_from,
            valid_to=valid_to,
            reference=resource.get("preAuthRef"),
            request_key=request_key,
        )

    items = resource.get("item") or []
    if not items:
        return [decision(ALL_ITEMS, decided)]
    found = []
    for index, item in enumerate(items):
        sequence = item.get("itemSequence")
        if sequence is None:
            raise ParseError(
                "ClaimResponse item has no itemSequence",
                location=f"{path}.item[{index}].itemSequence",
            )
        refused = any(a.get("reason") for a in item.get("adjudication") or [])
        status = (
            AuthorizationStatus.DENIED
            if refused and decided is AuthorizationStatus.APPROVED
            else decided
        )
        found.append(decision(sequence, status))
    return found
