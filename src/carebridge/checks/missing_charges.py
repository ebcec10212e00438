"""Likely missing charges, learned from which charges accompanied past encounters.

Every encounter is described by its *features*: its class and type, and
each procedure, immunization, supply or other service documented in it
(``procedure:SNOMED:117015009``). :class:`ChargePatterns` counts, over the
history, how often each charge code was billed on an encounter that had a
feature. The share is the confidence that the feature brings the charge:
a throat culture brings its lab charge nearly always, a wellness visit its
visit charge, a medication reconciliation nothing.

An encounter that has a feature but lacks a charge that the feature brought
in at least :data:`CONFIDENCE_THRESHOLD` of at least :data:`MIN_SUPPORT`
past encounters is flagged, with the typical amount of that charge as the
revenue at risk. The check only flags: it never creates a charge.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

log = logging.getLogger(__name__)

CONFIDENCE_THRESHOLD = 0.9
"""Confidence at or above which an absent charge is flagged.

A charge that follows a documented item one for one has a confidence near
one, less the share already missing in the history.
"""

MIN_SUPPORT = 5
"""Minimum number of past encounters with a feature before its patterns are used."""


CLASS_PREFIX = "class:"
"""Prefix of the feature that names an encounter's class."""


@dataclass(frozen=True, slots=True)
class ChargeRecord:
    """One billed charge line of an encounter."""

    charge_id: str
    charge_code: str
    units: Decimal
    amount: Decimal


@dataclass(frozen=True, slots=True)
class EncounterCharges:
    """An encounter's documented features and the charges billed on it."""

    encounter_id: str
    features: frozenset[str]
    charges: tuple[ChargeRecord, ...] = ()

    @property
    def charge_codes(self) -> set[str]:
        """The distinct charge codes billed on the encounter."""
        return {charge.charge_code for charge in self.charges}


@dataclass(frozen=True, slots=True)
class MissingCharge:
    """A charge that the encounter's documentation usually brings, but is absent.

    ``feature`` is the documented feature with the highest confidence,
    ``support`` the number of past encounters with it, and
    ``expected_amount`` the median amount billed for the charge code.
    """

    encounter_id: str
    charge_code: str
    confidence: float
    feature: str
    support: int
    expected_amount: Decimal


@dataclass(slots=True)
class ChargePatterns:
    """Counts of features and of charge codes billed with each feature."""

    encounters: int = 0
    feature_counts: Counter[str] = field(default_factory=Counter)
    billed_with: dict[str, Counter[str]] = field(default_factory=dict)
    amounts: dict[str, list[Decimal]] = field(default_factory=dict)
    _typical: dict[str, Decimal] = field(default_factory=dict)

    @classmethod
    def fit(cls, history: Iterable[EncounterCharges]) -> ChargePatterns:
        """Count the features and charge codes of past encounters."""
        patterns = cls()
        for encounter in history:
            patterns.encounters += 1
            codes = encounter.charge_codes
            for feature in encounter.features:
                patterns.feature_counts[feature] += 1
                if codes:
                    patterns.billed_with.setdefault(feature, Counter()).update(codes)
            for charge in encounter.charges:
                patterns.amounts.setdefault(charge.charge_code, []).append(charge.amount)
        patterns._typical = {
            code: statistics.median(values) for code, values in patterns.amounts.items()
        }
        return patterns

    def confidence(self, feature: str, charge_code: str) -> float:
        """Return the share of past encounters with ``feature`` that billed ``charge_code``.

        One is added to the denominator, so that a pattern seen on three of
        three encounters counts for less than one seen on a hundred of a
        hundred.
        """
        support = self.feature_counts.get(feature, 0)
        billed = self.billed_with.get(feature, Counter()).get(charge_code, 0)
        return billed / (support + 1)

    def typical_amount(self, charge_code: str) -> Decimal:
        """Return the median amount billed for ``charge_code`` (zero if never billed)."""
        return self._typical.get(charge_code, Decimal("0"))

    def expected_charges(
        self, features: Iterable[str], threshold: float, min_support: int
    ) -> dict[str, tuple[float, str]]:
        """Return the charge codes that ``features`` bring, with confidence and feature."""
        expected: dict[str, tuple[float, str]] = {}
        for feature in sorted(features):
            support = self.feature_counts.get(feature, 0)
            # The class ("ambulatory") is too coarse to bring a charge. It
            # shows which visit charge is usual, but the encounter type
            # decides which one this encounter needs.
            if support < min_support or feature.startswith(CLASS_PREFIX):
                continue
            for code, billed in self.billed_with.get(feature, Counter()).items():
                confidence = billed / (support + 1)
                if confidence >= threshold and confidence > expected.get(code, (0.0, ""))[0]:
                    expected[code] = (confidence, feature)
        return expected


def find_missing_charges(
    patterns: ChargePatterns,
    encounters: Iterable[EncounterCharges],
    *,
    threshold: float = CONFIDENCE_THRESHOLD,
    min_support: int = MIN_SUPPORT,
) -> list[MissingCharge]:
    """Flag each charge that an encounter's features bring but that is absent."""
    flagged: list[MissingCharge] = []
    for encounter in encounters:
        billed = encounter.charge_codes
        expected = patterns.expected_charges(encounter.features, threshold, min_support)
        for code, (confidence, feature) in sorted(expected.items()):
            if code in billed:
                continue
            flagged.append(MissingCharge(
                encounter_id=encounter.encounter_id,
                charge_code=code,
                confidence=round(confidence, 4),
                feature=feature,
                support=patterns.feature_counts[feature],
                expected_amount=patterns.typical_amount(code),
            ))
    log.info("missing-charge check done",
             extra={"action": "missing_charges", "flagged": len(flagged)})
    return flagged


def low_total_baseline(
    history: Sequence[EncounterCharges],
    encounters: Iterable[EncounterCharges],
    *,
    share: float = 0.5,
) -> list[str]:
    """Flag encounters billed below ``share`` of the median total of their class.

    A fixed-threshold rule of the kind a revenue-cycle report uses; it
    returns encounter ids, because it cannot name the missing charge.
    The class is the feature that starts with :data:`CLASS_PREFIX`.
    """
    totals: dict[str, list[Decimal]] = {}
    for encounter in history:
        totals.setdefault(_encounter_class(encounter), []).append(_total(encounter))
    medians = {name: statistics.median(values) for name, values in totals.items()}
    flagged = []
    for encounter in encounters:
        median = medians.get(_encounter_class(encounter))
        if median is not None and median > 0 and _total(encounter) < median * Decimal(
            str(share)
        ):
            flagged.append(encounter.encounter_id)
    return flagged


def _encounter_class(encounter: EncounterCharges) -> str:
    return next((f for f in sorted(encounter.features) if f.startswith(CLASS_PREFIX)), "")


def _total(encounter: EncounterCharges) -> Decimal:
    return sum((charge.amount for charge in encounter.charges), Decimal("0"))
