"""Duplicate-patient detection by probabilistic record linkage (Splink on DuckDB).

The model is Fellegi–Sunter as Splink implements it: each pair of records
is compared field by field (given name, family name, birth date, gender,
phone), each comparison falls into a level (exact, nickname, typo, day and
month swapped, missing, different), and the levels' m and u probabilities
turn into a match probability. The u probabilities are estimated by random
sampling of the index and the m probabilities by expectation maximisation on
the index itself, so nothing is downloaded and no labels are needed. An
index smaller than :data:`MIN_RECORDS_FOR_TRAINING` keeps the prior m
probabilities written below, because EM on a few hundred pairs is unstable.

Blocking decides which pairs are compared at all: pairs that share a birth
date, a phone number, both names, or a name and part of the birth date (the
rules are in :func:`_settings`). On 2 cores this trains on and scores
100,000 patients in about 20 seconds (see docs/checks.md).
For indexes too large for one process, the same settings run on Splink's
Spark backend (``splink.SparkAPI``) instead of ``DuckDBAPI``.

The model only flags: :func:`find_duplicates` returns scored pairs, and a
merge happens only when a person approves one (see
:mod:`carebridge.checks.actions`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import splink.comparison_level_library as cll
from splink import DuckDBAPI, Linker, SettingsCreator, block_on
from splink.comparison_library import CustomComparison

from carebridge.checks.nicknames import given_name_roots, normalise_name

log = logging.getLogger(__name__)

MATCH_THRESHOLD = 0.8
"""Match probability at or above which a pair is flagged for a person to review."""

MIN_RECORDS_FOR_TRAINING = 1000
"""Smallest index on which the m probabilities are estimated by EM."""

_NOT_DIGITS = re.compile(r"\D")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

FIELDS = ("given_name", "family_name", "birth_date", "gender", "phone")
"""The compared fields, in the order their comparisons are defined."""


@dataclass(frozen=True, slots=True)
class DuplicatePair:
    """Two patient records that the model scores as one person.

    ``agreed``, ``similar``, ``disagreed`` and ``missing`` name the compared
    fields by outcome; ``levels`` gives each field's comparison level.
    """

    left_id: str
    right_id: str
    probability: float
    match_weight: float
    levels: dict[str, str]
    agreed: tuple[str, ...]
    similar: tuple[str, ...]
    disagreed: tuple[str, ...]
    missing: tuple[str, ...]


_SWAPPED_DAY_MONTH = (
    "birth_date_l = substr(birth_date_r, 1, 5) || substr(birth_date_r, 9, 2)"
    " || '-' || substr(birth_date_r, 6, 2)"
)

# Each field's comparison levels, most specific first: (label, SQL condition,
# prior m probability). The null level comes first and the else level
# ("different") last. The m probabilities are priors for small indexes: the
# share of true duplicates expected at each level. EM replaces them on large
# indexes. Exact name levels are adjusted for the name's frequency.
LEVELS: dict[str, list[tuple[str, str, float]]] = {
    "given_name": [
        ("exact", "given_name_l = given_name_r", 0.80),
        ("swapped with family name", "given_name_l = family_name_r", 0.01),
        ("nickname", "list_has_any(given_roots_l, given_roots_r)", 0.05),
        ("typo", "jaro_winkler_similarity(given_name_l, given_name_r) >= 0.92", 0.08),
        ("similar", "jaro_winkler_similarity(given_name_l, given_name_r) >= 0.80", 0.04),
        ("different", "", 0.02),
    ],
    "family_name": [
        ("exact", "family_name_l = family_name_r", 0.82),
        ("swapped with given name", "family_name_l = given_name_r", 0.01),
        ("typo", "jaro_winkler_similarity(family_name_l, family_name_r) >= 0.92", 0.10),
        ("similar", "jaro_winkler_similarity(family_name_l, family_name_r) >= 0.80", 0.04),
        ("different", "", 0.03),
    ],
    "birth_date": [
        ("exact", "birth_date_l = birth_date_r", 0.90),
        ("day and month swapped", _SWAPPED_DAY_MONTH, 0.03),
        ("one digit differs", "damerau_levenshtein(birth_date_l, birth_date_r) <= 1", 0.05),
        ("different", "", 0.02),
    ],
    "gender": [
        ("exact", "gender_l = gender_r", 0.99),
        ("different", "", 0.01),
    ],
    "phone": [
        ("exact", "phone_l = phone_r", 0.85),
        ("one digit differs", "damerau_levenshtein(phone_l, phone_r) <= 1", 0.03),
        ("different", "", 0.12),
    ],
}

_TERM_FREQUENCY_FIELDS = ("given_name", "family_name")


def _comparisons() -> list[CustomComparison]:
    comparisons = []
    for field, levels in LEVELS.items():
        creators: list[cll.ComparisonLevelCreator] = [cll.NullLevel(field)]
        for label, sql, m_probability in levels:
            if not sql:
                creators.append(cll.ElseLevel().configure(m_probability=m_probability))
                continue
            level = cll.CustomLevel(sql, label_for_charts=label)
            level.configure(m_probability=m_probability)
            if label == "exact" and field in _TERM_FREQUENCY_FIELDS:
                level.configure(tf_adjustment_column=field)
            creators.append(level)
        comparisons.append(
            CustomComparison(output_column_name=field, comparison_levels=creators)
        )
    return comparisons


def _level_case_sql(field: str) -> str:
    """Return a SQL CASE naming the comparison level of ``field`` for a pair."""
    whens = [f"WHEN {field}_l IS NULL OR {field}_r IS NULL THEN 'missing'"]
    for label, sql, _ in LEVELS[field]:
        if sql:
            whens.append(f"WHEN {sql} THEN '{label}'")
    return "CASE " + " ".join(whens) + " ELSE 'different' END"


_AGREEING = {"exact"}
_SIMILAR = {"nickname", "typo", "similar", "day and month swapped", "one digit differs",
            "swapped with family name", "swapped with given name"}


def _prior(connection: duckdb.DuckDBPyConnection, table: pa.Table) -> float:
    """Estimate the probability that two random records are one person.

    Counts the pairs that agree on both names and the birth date, or on
    phone and birth date (rules that admit almost no false match), and
    assumes they are 60% of the true pairs, as Splink's direct estimate
    does. With no such pair, one pair in the index is assumed, so that an
    index of distinct patients still gets a positive prior.
    """
    connection.register("carebridge_prior_input", table)
    matches = connection.execute("""
        SELECT count(*) FROM carebridge_prior_input AS l
        JOIN carebridge_prior_input AS r
          ON l.unique_id < r.unique_id AND l.birth_date = r.birth_date
         AND ((l.given_name = r.given_name AND l.family_name = r.family_name)
              OR l.phone = r.phone)
    """).fetchall()
    pairs = table.num_rows * (table.num_rows - 1) / 2
    found = matches[0][0]
    return min(0.5, max(found / 0.6, 1.0) / pairs)


def _settings(prior: float) -> SettingsCreator:
    return SettingsCreator(
        link_type="dedupe_only",
        comparisons=_comparisons(),
        blocking_rules_to_generate_predictions=[
            block_on("birth_date"),
            block_on("phone"),
            block_on("family_name", "given_name"),
            block_on("family_name", "given_roots"),
            block_on("family_name", "birth_year"),
            block_on("given_roots", "birth_year"),
            block_on("given_name", "birth_month_day"),
            block_on("family_name", "birth_month_day"),
            "l.given_name = r.family_name and l.family_name = r.given_name",
        ],
        probability_two_random_records_match=prior,
        retain_matching_columns=False,
        retain_intermediate_calculation_columns=True,
        max_iterations=20,
    )


def prepare_records(records: Iterable[Mapping[str, object]]) -> pa.Table:
    """Normalise patient records into the columns the model compares.

    Each record needs ``unique_id`` and may have ``given_name``,
    ``family_name``, ``birth_date`` (a ``date`` or ISO text), ``gender`` and
    ``phone``; a missing or unreadable value becomes null.
    """
    columns: dict[str, list[object]] = {
        "unique_id": [], "given_name": [], "family_name": [], "given_roots": [],
        "birth_date": [], "birth_year": [], "birth_month_day": [], "gender": [],
        "phone": [],
    }
    for record in records:
        given = normalise_name(_text(record.get("given_name")))
        birth = _text(record.get("birth_date"))
        birth = birth[:10] if birth and _ISO_DATE.match(birth[:10]) else None
        gender = (_text(record.get("gender")) or "").strip().upper()[:1] or None
        digits = _NOT_DIGITS.sub("", _text(record.get("phone")) or "")
        columns["unique_id"].append(str(record["unique_id"]))
        columns["given_name"].append(given)
        columns["family_name"].append(normalise_name(_text(record.get("family_name"))))
        columns["given_roots"].append(list(given_name_roots(given)) or None)
        columns["birth_date"].append(birth)
        columns["birth_year"].append(birth[:4] if birth else None)
        columns["birth_month_day"].append(birth[5:] if birth else None)
        columns["gender"].append(gender if gender in ("M", "F") else None)
        # The last ten digits: drops a leading country code 1.
        columns["phone"].append(digits[-10:] if len(digits) >= 7 else None)
    return pa.table(columns, schema=pa.schema([
        ("unique_id", pa.string()), ("given_name", pa.string()),
        ("family_name", pa.string()), ("given_roots", pa.list_(pa.string())),
        ("birth_date", pa.string()), ("birth_year", pa.string()),
        ("birth_month_day", pa.string()),
        ("gender", pa.string()), ("phone", pa.string()),
    ]))


def _text(value: object) -> str | None:
    if value is None:
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def find_duplicates(
    records: Iterable[Mapping[str, object]],
    *,
    threshold: float = MATCH_THRESHOLD,
    seed: int = 0,
) -> list[DuplicatePair]:
    """Score every blocked pair of ``records`` and return those at or above ``threshold``.

    Trains the model on the records themselves (see the module docstring)
    and returns the pairs ordered by descending probability, each with the
    fields that agreed, were similar, disagreed or were missing.
    """
    table = prepare_records(records)
    if table.num_rows < 2:
        return []
    connection = duckdb.connect(":memory:")
    try:
        db_api = DuckDBAPI(connection)
        frame = db_api.register(table, dataset_display_name="patients")
        linker = Linker(frame, _settings(_prior(connection, table)), log_level=None)
        _train(linker, table.num_rows, seed)
        scored = linker.inference.predict(
            threshold_match_probability=threshold, warning_mode="never"
        )
        rows = _explained_rows(connection, table, scored.physical_name)
    finally:
        connection.close()
    pairs = [_pair(row) for row in rows]
    pairs.sort(key=lambda pair: (-pair.probability, pair.left_id, pair.right_id))
    log.info("duplicate-patient linkage scored the index",
             extra={"action": "linkage", "records": table.num_rows, "flagged": len(pairs)})
    return pairs


def _train(linker: Linker, records: int, seed: int) -> None:
    training = linker.training
    training.estimate_u_using_random_sampling(max_pairs=1e6, seed=seed)
    if records < MIN_RECORDS_FOR_TRAINING:
        return
    training.estimate_parameters_using_expectation_maximisation(
        block_on("birth_date"), estimate_without_term_frequencies=True
    )
    training.estimate_parameters_using_expectation_maximisation(
        block_on("family_name", "given_name"), estimate_without_term_frequencies=True
    )


def _explained_rows(
    connection: duckdb.DuckDBPyConnection, table: pa.Table, predictions: str
) -> list[dict[str, object]]:
    # Splink 5 keeps each comparison's match weight but not its level, so the
    # levels are named here from the same SQL conditions the model used.
    connection.register("carebridge_linkage_input", table)
    sides = ", ".join(
        f"l.{column} AS {column}_l, r.{column} AS {column}_r"
        for column in ("given_name", "family_name", "given_roots", "birth_date",
                       "gender", "phone")
    )
    levels = ", ".join(f"{_level_case_sql(field)} AS level_{field}" for field in FIELDS)
    sql = f"""
        SELECT unique_id_l, unique_id_r, match_probability, match_weight, {levels}
        FROM (
            SELECT p.unique_id_l, p.unique_id_r, p.match_probability, p.match_weight,
                   {sides}
            FROM {predictions} AS p
            JOIN carebridge_linkage_input AS l ON l.unique_id = p.unique_id_l
            JOIN carebridge_linkage_input AS r ON r.unique_id = p.unique_id_r
        )
    """
    cursor = connection.execute(sql)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]


def _pair(row: Mapping[str, object]) -> DuplicatePair:
    levels = {field: str(row[f"level_{field}"]) for field in FIELDS}
    left, right = sorted((str(row["unique_id_l"]), str(row["unique_id_r"])))
    return DuplicatePair(
        left_id=left,
        right_id=right,
        probability=float(row["match_probability"]),  # type: ignore[arg-type]
        match_weight=float(row["match_weight"]),  # type: ignore[arg-type]
        levels=levels,
        agreed=tuple(name for name in FIELDS if levels[name] in _AGREEING),
        similar=tuple(name for name in FIELDS if levels[name] in _SIMILAR),
        disagreed=tuple(name for name in FIELDS if levels[name] == "different"),
        missing=tuple(name for name in FIELDS if levels[name] == "missing"),
    )
