"""Labelled encounter sets for measuring the missing-charge and anomaly checks.

The templates are the real Synthea encounters bundled in
``carebridge/demo/data/synthea/csv`` (388 encounters of 11 patients) with
their procedures, immunizations and supplies. Each is priced as carebridge's
charge capture prices it: through the bundled crosswalks to the house
chargemaster, the encounter type to its visit charge and a chargeable
supply through the item master. Items without a chargemaster item bring no
charge, as in the demo run.

An index is built by drawing templates at random. Each drawn encounter is
placed in a year from 2019 to 2024 and its prices rise 4% a year from the
2019 chargemaster, as a yearly price update would. The history used for
learning is not clean: 2% of its charges are missing. Then:

- the missing-charge test set has one charge removed from 15% of its
  encounters that have any, and the labels are those (encounter, charge code)
  pairs;
- the anomaly test set has 5% of its charge lines altered. The units are
  multiplied by ten, or the amount by ten, a tenth or a hundred (a slipped
  decimal point), or the charge code is replaced by another code of the
  history (billed but not documented). The labels are those charge ids.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from dataclasses import dataclass, replace
from decimal import Decimal
from importlib import resources
from pathlib import Path

from carebridge.checks.missing_charges import ChargeRecord, EncounterCharges
from carebridge.config import load_configuration
from carebridge.config.model import Configuration

HISTORY_MISSING_SHARE = 0.02
REMOVED_SHARE = 0.15
ALTERED_SHARE = 0.05
YEARLY_PRICE_RISE = Decimal("1.04")
_CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class _Item:
    feature: str
    charge_code: str | None
    units: Decimal


@dataclass(frozen=True, slots=True)
class Template:
    """A real encounter: its features and the items that may bring a charge."""

    encounter_class: str
    items: tuple[_Item, ...]


@dataclass(frozen=True, slots=True)
class ChargeSets:
    """A history to learn from and two labelled test sets."""

    history: list[EncounterCharges]
    missing_test: list[EncounterCharges]
    removed: set[tuple[str, str]]
    anomaly_test: list[EncounterCharges]
    altered: dict[str, str]


def _demo() -> Path:
    return Path(str(resources.files("carebridge").joinpath("demo")))


def load_templates(config: Configuration | None = None) -> list[Template]:
    """Read the bundled Synthea encounters and the items documented in each."""
    config = config or load_configuration(_demo() / "config")
    folder = _demo() / "data" / "synthea" / "csv"
    items: dict[str, list[_Item]] = defaultdict(list)
    one = Decimal("1")
    for row in _rows(folder / "procedures.csv"):
        code = config.crosswalk.get(("SNOMED", row["CODE"]))
        items[row["ENCOUNTER"]].append(_Item(f"procedure:SNOMED:{row['CODE']}", code, one))
    for row in _rows(folder / "immunizations.csv"):
        code = config.crosswalk.get(("CVX", row["CODE"]))
        items[row["ENCOUNTER"]].append(_Item(f"immunization:CVX:{row['CODE']}", code, one))
    for row in _rows(folder / "supplies.csv"):
        supply = config.supply_items.get(("SNOMED", row["CODE"]))
        code = supply.charge_code if supply is not None and supply.chargeable else None
        items[row["ENCOUNTER"]].append(
            _Item(f"supply:SNOMED:{row['CODE']}", code, Decimal(row["QUANTITY"] or "1"))
        )
    templates = []
    for row in _rows(folder / "encounters.csv"):
        code = config.crosswalk.get(("SNOMED", row["CODE"]))
        own = _Item(f"encounter:SNOMED:{row['CODE']}", code, one)
        templates.append(Template(row["ENCOUNTERCLASS"], (own, *items[row["Id"]])))
    return templates


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


class _Biller:
    def __init__(self, templates: list[Template], config: Configuration, seed: int) -> None:
        self.templates = templates
        self.prices = {code: item.price for code, item in config.chargemaster.items()}
        self.rng = random.Random(seed)
        self.count = 0

    def encounter(self, prefix: str, missing_share: float = 0.0) -> EncounterCharges:
        template = self.rng.choice(self.templates)
        self.count += 1
        encounter_id = f"{prefix}-{self.count:07d}"
        factor = YEARLY_PRICE_RISE ** self.rng.randint(0, 5)
        charges = []
        for number, item in enumerate(template.items):
            if item.charge_code is None or item.charge_code not in self.prices:
                continue
            if self.rng.random() < missing_share:
                continue
            price = (self.prices[item.charge_code] * factor).quantize(_CENT)
            charges.append(ChargeRecord(
                charge_id=f"{encounter_id}-{number}",
                charge_code=item.charge_code,
                units=item.units,
                amount=(price * item.units).quantize(_CENT),
            ))
        features = {f"class:{template.encounter_class}"} | {i.feature for i in template.items}
        return EncounterCharges(encounter_id, frozenset(features), tuple(charges))


def generate_charge_sets(
    history_size: int, test_size: int, seed: int = 0, config: Configuration | None = None
) -> ChargeSets:
    """Draw a history and the two labelled test sets (see the module docstring)."""
    config = config or load_configuration(_demo() / "config")
    biller = _Biller(load_templates(config), config, seed)
    rng = biller.rng
    history = [biller.encounter("history", HISTORY_MISSING_SHARE) for _ in range(history_size)]
    missing_test: list[EncounterCharges] = []
    removed: set[tuple[str, str]] = set()
    for _ in range(test_size):
        encounter = biller.encounter("missing")
        if encounter.charges and rng.random() < REMOVED_SHARE:
            removed_code = rng.choice(encounter.charges).charge_code
            remaining = tuple(c for c in encounter.charges if c.charge_code != removed_code)
            encounter = replace(encounter, charges=remaining)
            removed.add((encounter.encounter_id, removed_code))
        missing_test.append(encounter)
    codes = sorted({c.charge_code for e in history for c in e.charges})
    anomaly_test: list[EncounterCharges] = []
    altered: dict[str, str] = {}
    for _ in range(test_size):
        encounter = biller.encounter("anomaly")
        charges = []
        for charge in encounter.charges:
            if rng.random() < ALTERED_SHARE:
                kind = rng.choice(("units_x10", "amount_x10", "amount_div10",
                                   "amount_x100", "code_swapped"))
                charge = _alter(charge, kind, codes, rng)
                altered[charge.charge_id] = kind
            charges.append(charge)
        anomaly_test.append(replace(encounter, charges=tuple(charges)))
    return ChargeSets(history, missing_test, removed, anomaly_test, altered)


def _alter(charge: ChargeRecord, kind: str, codes: list[str], rng: random.Random) -> ChargeRecord:
    if kind == "units_x10":
        return replace(charge, units=charge.units * 10, amount=charge.amount * 10)
    if kind == "amount_x10":
        return replace(charge, amount=charge.amount * 10)
    if kind == "amount_div10":
        return replace(charge, amount=(charge.amount / 10).quantize(_CENT))
    if kind == "amount_x100":
        return replace(charge, amount=charge.amount * 100)
    other = rng.choice([code for code in codes if code != charge.charge_code])
    return replace(charge, charge_code=other)
