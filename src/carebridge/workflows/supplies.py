"""Supply consumption: an inventory issue at cost, and a charge when billable.

An issue credits inventory and debits the consuming department's supply
expense. A chargeable item also yields a :class:`Service` that charge capture
prices like any other, keyed ``supply-charge:{usage_key}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from carebridge.config.model import Configuration
from carebridge.model import Service, ServiceKind, SupplyIssue, SupplyUse
from carebridge.model.codes import CDM
from carebridge.workflows.charge_capture import to_cents
from carebridge.workflows.reasons import Reason, Rejection


@dataclass(frozen=True, slots=True)
class Issued:
    """A supply usage accepted: the issue and, for billable items, the service."""

    issue: SupplyIssue
    charge_service: Service | None


def issue_supply(
    use: SupplyUse, encounter_class: str | None, config: Configuration
) -> Issued | Rejection:
    """Return the inventory issue for ``use``, or why it cannot be posted.

    Args:
        use: the supply usage as the source documented it.
        encounter_class: the class of the encounter it was used in, or
            ``None`` when that encounter is not known.
        config: master data and rules.
    """
    if encounter_class is None:
        return Rejection(
            Reason.ENCOUNTER_NOT_FOUND,
            f"encounter {use.encounter_id or '(none)'} not found for supply usage",
        )
    item = config.supply_items.get((use.code_system, use.code))
    if item is None:
        return Rejection(
            Reason.UNKNOWN_ITEM,
            f"{use.code_system} item {use.code!r} is not in the item master",
        )
    if use.quantity <= 0:
        return Rejection(
            Reason.UNITS_NOT_POSITIVE, f"quantity {use.quantity} must be greater than 0"
        )
    if item.implant and not (use.lot_number or use.serial_number):
        return Rejection(
            Reason.LOT_OR_SERIAL_MISSING,
            f"implant {item.item_code} used without lot or serial number",
        )
    if use.service_date is None:
        return Rejection(Reason.DATE_MISSING, "supply usage date missing")
    department_code = config.encounter_class_departments.get(encounter_class)
    if department_code is None:
        return Rejection(
            Reason.DEPARTMENT_UNMAPPED,
            f"encounter class {encounter_class!r} maps to no department",
        )
    department = config.departments[department_code]
    issue = SupplyIssue(
        usage_key=use.usage_key,
        item_code=item.item_code,
        quantity=use.quantity,
        unit_cost=item.unit_cost,
        total_cost=to_cents(item.unit_cost * use.quantity),
        currency=config.rules.currency,
        service_date=use.service_date,
        department=department.code,
        expense_account=department.supply_expense_account,
        inventory_account=config.inventory_account,
        encounter_id=use.encounter_id,
        source_message_id=use.source_message_id,
    )
    charge_service = None
    if item.chargeable and item.charge_code:
        charge_service = Service(
            service_key=f"supply-charge:{use.usage_key}",
            kind=ServiceKind.SUPPLY,
            code_system=CDM,
            code=item.charge_code,
            quantity=use.quantity,
            service_date=use.service_date,
            patient_id=use.patient_id,
            encounter_id=use.encounter_id,
            source_message_id=use.source_message_id,
            description=item.description,
            department=department.code,
        )
    return Issued(issue, charge_service)
