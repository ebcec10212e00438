"""Charge capture: decide whether a documented service becomes a priced charge.

The checks run in a fixed order and the first that fails names the work
item's reason, so that the same input always gives the same outcome. Pricing
follows one rule: a price the source sent (HL7 FT1-11/FT1-12, FHIR
ChargeItem) is kept as sent after checking it is consistent; otherwise the
house chargemaster's price times the units, rounded half-up to the cent.
The rules in force on the service date apply first: a coding edit replaces
a code before the crosswalk (or refuses it), and a pricing rule multiplies
the chargemaster's unit price.
"""

from __future__ import annotations

import datetime as dt
from decimal import ROUND_HALF_UP, Decimal

from carebridge.config.model import ChargeItem, Configuration
from carebridge.model import ChargeLine, Service, TransactionType
from carebridge.model.codes import CDM
from carebridge.workflows.reasons import Reason, Rejection

CENT = Decimal("0.01")


def to_cents(amount: Decimal) -> Decimal:
    """Round ``amount`` half-up to the cent (the currency's minor unit)."""
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


def revenue_code_for(item: ChargeItem, config: Configuration) -> str | None:
    """Return the item's UB-04 revenue code, or the one its HCPCS range implies."""
    if item.revenue_code:
        return item.revenue_code
    if not item.hcpcs:
        return None
    code = item.hcpcs.upper()
    for low, high, revenue_code in config.revenue_code_ranges:
        # Ranges compare as strings of equal length, which orders CPT
        # (5 digits) and HCPCS level II (letter + 4 digits) codes correctly.
        if len(low) == len(code) and low <= code <= high:
            return revenue_code
    return None


def department_for(
    item: ChargeItem, revenue_code: str, service: Service, config: Configuration
) -> str | None:
    """Return the department a charge belongs to.

    The chargemaster line decides first, then the revenue code's department
    (exact code, then its 3-digit prefix), then the department the source
    named.
    """
    if item.department and item.department in config.departments:
        return item.department
    for key in (revenue_code, revenue_code[:3]):
        department = config.revenue_code_departments.get(key)
        if department:
            return department
    if service.department and service.department in config.departments:
        return service.department
    return None


class ChargeCapture:
    """Prices services against one configuration and one as-of date."""

    def __init__(self, config: Configuration, as_of: dt.date) -> None:
        self.config = config
        self.rules = config.rules
        self.latest = config.rules.latest_service_date or as_of

    def check_service(self, service: Service, encounter_found: bool) -> Rejection | None:
        """Return the first rule ``service`` breaks, or ``None``."""
        if service.encounter_id is None:
            return Rejection(
                Reason.ENCOUNTER_NOT_FOUND,
                "no encounter id was sent (HL7 PV1-19 visit number, FHIR encounter "
                "reference); correct the message and replay it",
            )
        if not encounter_found:
            return Rejection(
                Reason.ENCOUNTER_NOT_FOUND,
                f"encounter {service.encounter_id} not found; send or register the "
                "encounter, then resume this charge",
            )
        if service.quantity <= 0:
            return Rejection(
                Reason.UNITS_NOT_POSITIVE,
                f"units {service.quantity} must be greater than 0",
            )
        if service.quantity != service.quantity.to_integral_value():
            return Rejection(
                Reason.UNITS_NOT_WHOLE,
                f"units {service.quantity} are not a whole number; HCPCS units are "
                "billed whole, so correct the units or the unit of measure",
            )
        if service.quantity > self.rules.max_units:
            return Rejection(
                Reason.UNITS_TOO_HIGH,
                f"units {service.quantity} exceed the maximum {self.rules.max_units}",
            )
        if service.service_date is None:
            return Rejection(Reason.DATE_MISSING, "service date missing")
        earliest = self.rules.earliest_service_date
        if not earliest <= service.service_date <= self.latest:
            return Rejection(
                Reason.DATE_OUT_OF_RANGE,
                f"service date {service.service_date} outside {earliest}..{self.latest}",
            )
        return None

    def price(self, service: Service, encounter_found: bool) -> ChargeLine | Rejection:
        """Return the priced charge line for ``service``, or why there is none."""
        rejection = self.check_service(service, encounter_found)
        if rejection:
            return rejection
        rules = self.config.rule_book.in_force(service.service_date)
        code = service.code
        edit = rules.coding_edit(service.code_system, code)
        if edit is not None:
            if edit.action != "replace" or not edit.replacement:
                return Rejection(
                    Reason.CODE_NOT_BILLABLE,
                    f"{service.code_system} code {code!r} is not billed under rules "
                    f"{rules.version} ({edit.reason or 'coding edit'}); correct the code "
                    "and replay, or reject the item",
                )
            code = edit.replacement
        if service.code_system == CDM:
            charge_code: str | None = code
        else:
            charge_code = self.config.crosswalk.get((service.code_system, code))
        if charge_code is None:
            return Rejection(
                Reason.UNKNOWN_CODE,
                f"{service.code_system} code {code!r} has no crosswalk entry; "
                "add it to the crosswalk or correct the code",
            )
        item = self.config.chargemaster.get(charge_code)
        if item is None:
            return Rejection(
                Reason.PRICE_MISSING,
                f"charge code {charge_code} is not in chargemaster "
                f"{self.config.chargemaster_version.version_id}",
            )
        revenue_code = revenue_code_for(item, self.config)
        if revenue_code is None:
            return Rejection(
                Reason.REVENUE_CODE_MISSING,
                f"charge code {charge_code} has no revenue code and its HCPCS "
                f"{item.hcpcs or '(none)'} matches no revenue-code range",
            )
        department = department_for(item, revenue_code, service, self.config)
        if department is None:
            return Rejection(
                Reason.DEPARTMENT_UNMAPPED,
                f"revenue code {revenue_code} maps to no department",
            )
        multiplier = rules.price_multiplier(charge_code, revenue_code)
        amounts = self._amounts(service, item, multiplier)
        if isinstance(amounts, Rejection):
            return amounts
        unit_price, amount = amounts
        assert service.service_date is not None  # checked by check_service
        return ChargeLine(
            service_key=service.service_key,
            charge_code=charge_code,
            revenue_code=revenue_code,
            hcpcs=item.hcpcs,
            units=service.quantity,
            unit_price=unit_price,
            amount=amount,
            currency=service.currency,
            service_date=service.service_date,
            department=department,
            gl_account=self.config.departments[department].revenue_account,
            patient_id=service.patient_id,
            encounter_id=service.encounter_id,
            source_message_id=service.source_message_id,
        )

    def _amounts(
        self, service: Service, item: ChargeItem, multiplier: Decimal = Decimal(1)
    ) -> tuple[Decimal, Decimal] | Rejection:
        """Return (unit price, signed amount); credits are negative.

        A price the source sent must be positive and consistent with the
        units, since it replaces the chargemaster's; a credit (FT1-6 ``CD``)
        reverses whatever sign was sent. The rules' pricing ``multiplier``
        applies to the chargemaster's price only: the unit price is rounded
        to the cent first, so units times unit price is the amount.
        """
        if service.currency != self.rules.currency:
            return Rejection(
                Reason.CURRENCY_MISMATCH,
                f"currency {service.currency} differs from the ledger currency "
                f"{self.rules.currency}",
            )
        quantity = service.quantity
        source_priced = service.amount is not None or service.unit_price is not None
        if source_priced:
            amounts = self._sent_amounts(service)
            if isinstance(amounts, Rejection):
                return amounts
        else:
            unit = item.price if multiplier == 1 else to_cents(item.price * multiplier)
            amounts = (unit, to_cents(unit * quantity))
        unit_price, amount = amounts
        if amount <= 0 or unit_price <= 0:
            if not source_priced:
                return Rejection(
                    Reason.PRICE_MISSING,
                    f"charge code {item.charge_code} has price {item.price}",
                )
            return Rejection(
                Reason.AMOUNT_INVALID,
                f"sent amount {amount} (unit price {unit_price}) is not positive; "
                "send a credit (FT1-6 CD) to reverse a charge",
            )
        if amount > self.rules.max_amount:
            return Rejection(
                Reason.AMOUNT_TOO_HIGH,
                f"amount {amount} exceeds the maximum {self.rules.max_amount} for "
                "one charge line; review it before posting",
            )
        if service.transaction_type is TransactionType.CREDIT:
            amount = -amount
        return unit_price, amount

    def _sent_amounts(self, service: Service) -> tuple[Decimal, Decimal] | Rejection:
        """Return the unit price and amount the source sent, checked."""
        quantity = service.quantity
        sent_amount = service.amount
        sent_unit = service.unit_price
        if service.transaction_type is TransactionType.CREDIT:
            # Senders write credits with either sign; the sign is applied later.
            sent_amount = None if sent_amount is None else abs(sent_amount)
            sent_unit = None if sent_unit is None else abs(sent_unit)
        if sent_amount is not None:
            if to_cents(sent_amount) != sent_amount:
                return Rejection(
                    Reason.AMOUNT_MISMATCH,
                    f"amount {sent_amount} has fractions of a cent; send it "
                    "rounded to the cent",
                )
            if sent_unit is not None and to_cents(sent_unit * quantity) != sent_amount:
                return Rejection(
                    Reason.AMOUNT_MISMATCH,
                    f"units {quantity} x unit price {sent_unit} = "
                    f"{to_cents(sent_unit * quantity)}, but the sent amount is "
                    f"{sent_amount}",
                )
            unit = sent_unit if sent_unit is not None else to_cents(sent_amount / quantity)
            return unit, sent_amount
        assert sent_unit is not None
        return sent_unit, to_cents(sent_unit * quantity)
