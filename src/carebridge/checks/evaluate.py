"""Measure each check and a simple baseline on labelled data built from the bundled data.

``carebridge evaluate`` runs this. The labelled sets come from
:mod:`carebridge.checks.labelled_patients` and
:mod:`carebridge.checks.labelled_charges`; nothing is downloaded. Each
check's ``seconds`` is the time to train on the data and score it; building
the labelled sets is not counted.

Metrics:

- duplicate patients: precision and recall over pairs of record ids. The
  baseline flags every pair with equal given name, family name and birth
  date, after lower-casing and removing everything but letters.
- missing charges: over (encounter, charge code) pairs. The baseline, an
  encounter billed below half of the median total of its class, cannot name
  a charge, so it is scored over encounters: an encounter is a true positive
  when a charge was removed from it.
- anomalies: over charge ids. The baseline flags charges with more than 10
  units or an amount above 5,000.00.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from itertools import combinations
from typing import Any

from carebridge.checks.anomalies import ChargeNorms, find_anomalies, fixed_threshold_baseline
from carebridge.checks.labelled_charges import generate_charge_sets
from carebridge.checks.labelled_patients import generate_patient_index
from carebridge.checks.linkage import MATCH_THRESHOLD, find_duplicates
from carebridge.checks.missing_charges import (
    CONFIDENCE_THRESHOLD,
    ChargePatterns,
    find_missing_charges,
    low_total_baseline,
)
from carebridge.checks.nicknames import normalise_name

log = logging.getLogger(__name__)

DEFAULT_PATIENTS = 100_000


def score(found: set[Hashable], truth: set[Hashable], seconds: float) -> dict[str, Any]:
    """Return precision, recall, F1 and counts of ``found`` against ``truth``."""
    hits = len(found & truth)
    precision = hits / len(found) if found else 0.0
    recall = hits / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "seconds": round(seconds, 2),
        "flagged": len(found),
        "true_positives": hits,
        "labelled": len(truth),
    }


def _timed(function: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def exact_match_pairs(records: list[dict[str, str | None]]) -> set[tuple[str, str]]:
    """Pair records with equal normalised given name, family name and birth date."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for record in records:
        given = normalise_name(record.get("given_name"))
        family = normalise_name(record.get("family_name"))
        birth = record.get("birth_date")
        if given and family and birth:
            groups.setdefault((given, family, birth), []).append(str(record["unique_id"]))
    return {
        (left, right)
        for ids in groups.values()
        for left, right in combinations(sorted(ids), 2)
    }


def evaluate_duplicates(patients: int, seed: int) -> dict[str, Any]:
    """Measure duplicate-patient linkage and the exact-match baseline."""
    index = generate_patient_index(patients, seed=seed)
    pairs, seconds = _timed(lambda: find_duplicates(index.records, seed=seed))
    found = {(pair.left_id, pair.right_id) for pair in pairs}
    result = score(found, index.true_pairs, seconds)  # type: ignore[arg-type]
    baseline, baseline_seconds = _timed(lambda: exact_match_pairs(index.records))
    result["baseline"] = score(baseline, index.true_pairs, baseline_seconds)  # type: ignore[arg-type]
    result.update(records=len(index.records), threshold=MATCH_THRESHOLD,
                  errors_found=_recall_by_error(index.errors, index.true_pairs, found))
    return result


def _recall_by_error(
    errors: dict[str, tuple[str, ...]],
    truth: set[tuple[str, str]],
    found: set[tuple[str, str]],
) -> dict[str, float]:
    # The share of true pairs found, per registration error in either record.
    total: dict[str, int] = {}
    hits: dict[str, int] = {}
    for pair in truth:
        kinds = set(errors.get(pair[0], ())) | set(errors.get(pair[1], ()))
        for kind in kinds:
            total[kind] = total.get(kind, 0) + 1
            hits[kind] = hits.get(kind, 0) + (pair in found)
    return {kind: round(hits[kind] / total[kind], 4) for kind in sorted(total)}


def evaluate_charges(patients: int, seed: int) -> dict[str, dict[str, Any]]:
    """Measure the missing-charge and anomaly checks and their fixed-threshold baselines."""
    history_size = max(2000, patients // 5)
    test_size = max(1000, patients // 20)
    sets = generate_charge_sets(history_size, test_size, seed=seed)

    def run_missing() -> set[tuple[str, str]]:
        patterns = ChargePatterns.fit(sets.history)
        flagged = find_missing_charges(patterns, sets.missing_test)
        return {(item.encounter_id, item.charge_code) for item in flagged}

    found, seconds = _timed(run_missing)
    missing = score(found, sets.removed, seconds)  # type: ignore[arg-type]
    baseline, baseline_seconds = _timed(
        lambda: set(low_total_baseline(sets.history, sets.missing_test))
    )
    removed_from = {encounter_id for encounter_id, _ in sets.removed}
    missing["baseline"] = score(baseline, removed_from, baseline_seconds)  # type: ignore[arg-type]
    missing.update(history_encounters=history_size, test_encounters=test_size,
                   threshold=CONFIDENCE_THRESHOLD)

    def run_anomalies() -> set[str]:
        patterns = ChargePatterns.fit(sets.history)
        norms = ChargeNorms.fit(sets.history)
        return {item.charge_id for item in find_anomalies(norms, patterns, sets.anomaly_test)}

    found_charges, seconds = _timed(run_anomalies)
    altered = set(sets.altered)
    anomalies = score(found_charges, altered, seconds)  # type: ignore[arg-type]
    baseline_charges, baseline_seconds = _timed(
        lambda: set(fixed_threshold_baseline(sets.anomaly_test))
    )
    anomalies["baseline"] = score(baseline_charges, altered, baseline_seconds)  # type: ignore[arg-type]
    kinds = sorted(set(sets.altered.values()))
    anomalies["errors_found"] = {
        kind: round(
            sum(1 for c, k in sets.altered.items() if k == kind and c in found_charges)
            / sum(1 for k in sets.altered.values() if k == kind), 4)
        for kind in kinds
    }
    anomalies.update(history_encounters=history_size, test_encounters=test_size)
    return {"missing_charges": missing, "anomalies": anomalies}


def evaluate(patients: int = DEFAULT_PATIENTS, seed: int = 0) -> dict[str, Any]:
    """Run every check and its baseline on labelled sets sized by ``patients``."""
    log.info("evaluation started", extra={"action": "evaluate", "patients": patients})
    report: dict[str, Any] = {"duplicate_patients": evaluate_duplicates(patients, seed)}
    report.update(evaluate_charges(patients, seed))
    report["patients"] = patients
    report["seed"] = seed
    return report


def format_table(report: dict[str, Any]) -> str:
    """Render the report as a table for a person."""
    lines = [
        f"carebridge evaluate: {report['patients']} patients, seed {report['seed']}",
        "",
        f"{'check':<20}{'method':<10}{'precision':>10}{'recall':>9}{'F1':>8}"
        f"{'seconds':>9}{'flagged':>9}{'labelled':>10}",
    ]
    for check in ("duplicate_patients", "missing_charges", "anomalies"):
        for method, row in (("model", report[check]), ("baseline", report[check]["baseline"])):
            lines.append(
                f"{check if method == 'model' else '':<20}{method:<10}"
                f"{row['precision']:>10.4f}{row['recall']:>9.4f}{row['f1']:>8.4f}"
                f"{row['seconds']:>9.2f}{row['flagged']:>9}{row['labelled']:>10}"
            )
    lines += ["", "Baselines: exact name and birth date; encounter total below half its "
              "class median (scored per encounter); units over 10 or amount over 5,000.00."]
    return "\n".join(lines)
