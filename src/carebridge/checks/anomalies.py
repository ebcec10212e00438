"""Unit and amount anomalies, and charges billed without the documentation they need.

Units and unit prices are compared on a log scale with each charge code's
own history: the distance from the code's median in robust standard
deviations (1.4826 times the median absolute deviation). A tenfold slip of
the decimal point is then far from the median whatever the code's price. A code whose
history barely varies gets a floor on its spread (:data:`MIN_LOG_SPREAD`),
so that a yearly price change is not an anomaly.

A charge whose code was almost never billed with any of the encounter's
documented features (:class:`~carebridge.checks.missing_charges.ChargePatterns`)
is a documented-versus-billed mismatch: the bill names something the
clinical record does not show.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from carebridge.checks.missing_charges import ChargePatterns, ChargeRecord, EncounterCharges

log = logging.getLogger(__name__)

Z_THRESHOLD = 4.0
"""Robust z-score at or above which units or a unit price are flagged."""

MIN_LOG_SPREAD = math.log(1.5) / 2
"""Smallest spread of a code's log values: a change of a factor 1.5 is two spreads."""

MIN_HISTORY = 10
"""Minimum number of past charges of a code before its units and prices are judged."""

MISMATCH_CONFIDENCE = 0.02
"""A charge is a mismatch when no documented feature brought it more often than this."""

MISMATCH_MIN_SUPPORT = 20
"""Minimum number of past encounters with a feature before a charge's absence counts."""


@dataclass(frozen=True, slots=True)
class Anomaly:
    """A charge line that does not fit its code's history or its encounter.

    ``kind`` is ``units``, ``unit_price`` or ``not_documented``; ``score``
    is the robust z-score (for ``not_documented``, one minus the highest
    confidence). ``expected`` is the code's median units or unit price,
    ``observed`` the charge's own, and ``amount_at_risk`` the difference
    between the billed amount and the amount the expected value gives.
    """

    charge_id: str
    encounter_id: str
    charge_code: str
    kind: str
    score: float
    expected: Decimal
    observed: Decimal
    amount_at_risk: Decimal
    reason: str


@dataclass(frozen=True, slots=True)
class _Spread:
    median: float
    scale: float


@dataclass(slots=True)
class ChargeNorms:
    """Each charge code's typical units and unit price, on a log scale."""

    units: dict[str, _Spread] = field(default_factory=dict)
    unit_price: dict[str, _Spread] = field(default_factory=dict)

    @classmethod
    def fit(cls, history: Iterable[EncounterCharges]) -> ChargeNorms:
        """Learn the median and spread of units and unit price per charge code."""
        units: dict[str, list[float]] = {}
        prices: dict[str, list[float]] = {}
        for encounter in history:
            for charge in encounter.charges:
                if charge.units <= 0 or charge.amount <= 0:
                    continue
                units.setdefault(charge.charge_code, []).append(math.log(charge.units))
                price = charge.amount / charge.units
                prices.setdefault(charge.charge_code, []).append(math.log(price))
        return cls(units=_spreads(units), unit_price=_spreads(prices))


def _spreads(values_by_code: dict[str, list[float]]) -> dict[str, _Spread]:
    spreads = {}
    for code, values in values_by_code.items():
        if len(values) < MIN_HISTORY:
            continue
        median = statistics.median(values)
        deviation = statistics.median(abs(value - median) for value in values)
        spreads[code] = _Spread(median, max(1.4826 * deviation, MIN_LOG_SPREAD))
    return spreads


def find_anomalies(
    norms: ChargeNorms,
    patterns: ChargePatterns,
    encounters: Iterable[EncounterCharges],
    *,
    z_threshold: float = Z_THRESHOLD,
) -> list[Anomaly]:
    """Flag charges whose units, unit price or code do not fit (see the module docstring)."""
    flagged: list[Anomaly] = []
    for encounter in encounters:
        for charge in encounter.charges:
            found = _value_anomaly(norms, encounter, charge, z_threshold)
            if found is None:
                found = _mismatch(patterns, encounter, charge)
            if found is not None:
                flagged.append(found)
    log.info("anomaly check done", extra={"action": "anomalies", "flagged": len(flagged)})
    return flagged


def _value_anomaly(
    norms: ChargeNorms, encounter: EncounterCharges, charge: ChargeRecord, z_threshold: float
) -> Anomaly | None:
    if charge.units <= 0 or charge.amount <= 0:
        return None  # charge capture rejects these by rule before they are billed
    checks = (
        ("units", norms.units.get(charge.charge_code), charge.units),
        ("unit_price", norms.unit_price.get(charge.charge_code), charge.amount / charge.units),
    )
    for kind, spread, value in checks:
        if spread is None:
            continue
        score = abs(math.log(value) - spread.median) / spread.scale
        if score < z_threshold:
            continue
        expected = Decimal(str(round(math.exp(spread.median), 2)))
        if kind == "units":
            at_risk = abs(charge.amount - charge.amount / charge.units * expected)
        else:
            at_risk = abs(charge.amount - expected * charge.units)
        direction = "above" if math.log(value) > spread.median else "below"
        return Anomaly(
            charge_id=charge.charge_id,
            encounter_id=encounter.encounter_id,
            charge_code=charge.charge_code,
            kind=kind,
            score=round(score, 2),
            expected=expected,
            observed=value.quantize(Decimal("0.01")),
            amount_at_risk=at_risk.quantize(Decimal("0.01")),
            reason=f"{kind.replace('_', ' ')} {value.normalize():f} is {score:.1f} robust "
            f"standard deviations {direction} the usual {expected} for {charge.charge_code}",
        )
    return None


def _mismatch(
    patterns: ChargePatterns, encounter: EncounterCharges, charge: ChargeRecord
) -> Anomaly | None:
    known = [
        feature for feature in encounter.features
        if patterns.feature_counts.get(feature, 0) >= MISMATCH_MIN_SUPPORT
    ]
    if not known or charge.charge_code not in patterns.amounts:
        return None
    best = max(patterns.confidence(feature, charge.charge_code) for feature in known)
    if best > MISMATCH_CONFIDENCE:
        return None
    return Anomaly(
        charge_id=charge.charge_id,
        encounter_id=encounter.encounter_id,
        charge_code=charge.charge_code,
        kind="not_documented",
        score=round(1 - best, 4),
        expected=Decimal("0"),
        observed=charge.amount,
        amount_at_risk=charge.amount,
        reason=f"{charge.charge_code} was billed with at most {best:.1%} of past encounters "
        f"that had this encounter's documentation ({len(known)} features)",
    )


def fixed_threshold_baseline(
    encounters: Iterable[EncounterCharges],
    *,
    max_units: Decimal = Decimal("10"),
    max_amount: Decimal = Decimal("5000"),
) -> list[str]:
    """Flag charges above fixed units or amount limits; return their ids."""
    return [
        charge.charge_id
        for encounter in encounters
        for charge in encounter.charges
        if charge.units > max_units or charge.amount > max_amount
    ]
