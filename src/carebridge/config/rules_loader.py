"""Load the rule files of a configuration folder (``rules/*.yaml``) into a :class:`RuleBook`.

Each file is one complete version of the rules::

    version: "2025.1"
    effective_from: 2025-01-01
    validation: {supplies: {...}, procurement: {...}, authorizations: {...}}
    coding_edits: [{system, code, action: replace|reject, replacement, reason}]
    pricing: [{charge_code | revenue_code_prefix, multiplier}]
    routing: {reason_code: team}
    approvals: {par_auto_approve_below, chains: [{category, steps: [{name, team, from_amount}]}]}
    authorizations: {required: [{system, code}], expiry_warning_days}
    supplies: {par_levels: [{location, item_code, par, order_up_to, supplier, category}],
               item_categories: {item_code: category}}
    procurement: {suppliers: [{code, name}], budgets: {department: annual amount}}

Every error names the file, line and field, like the other configuration
files. A folder without ``rules/`` has no rule versions (see
:data:`carebridge.config.rules.EMPTY_RULES`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import NoReturn

from carebridge.config.loader import YamlDocument, read_csv, read_yaml, validate_yaml
from carebridge.config.rules import (
    ANY_CATEGORY,
    ApprovalStep,
    CodingEdit,
    ParLevel,
    PricingRule,
    RuleBook,
    RuleSet,
    StockCount,
    Validation,
)
from carebridge.config.rules_schema import TEAM, RulesFile, StockCountRow
from carebridge.errors import ConfigurationError
from carebridge.workflows.reasons import Reason

logger = logging.getLogger(__name__)


def load_rules(
    folder: Path, *, item_codes: Collection[str], departments: Collection[str]
) -> RuleBook:
    """Load and cross-check every ``*.yaml`` file of ``folder``.

    Args:
        folder: The ``rules`` folder; a missing folder gives an empty book.
        item_codes: The item master's item codes, which par levels and
            item categories must name.
        departments: Department codes, which par-level locations and
            budgets must name.

    Raises:
        ConfigurationError: For the first invalid file, value or reference,
            naming file, line and field; also when two files share a
            version or an effective date.
    """
    if not folder.is_dir():
        return RuleBook()
    versions: list[RuleSet] = []
    seen_versions: dict[str, Path] = {}
    seen_dates: dict[object, Path] = {}
    for path in sorted(folder.glob("*.yaml")):
        document = read_yaml(path)
        parsed = validate_yaml(document, RulesFile)
        if parsed.version in seen_versions:
            _fail(document, ("version",), f"version {parsed.version} is also in "
                  f"{seen_versions[parsed.version].name}; give each file its own version")
        if parsed.effective_from in seen_dates:
            _fail(document, ("effective_from",), f"{seen_dates[parsed.effective_from].name} "
                  "starts on the same date; give each version its own effective_from")
        seen_versions[parsed.version] = path
        seen_dates[parsed.effective_from] = path
        _check_references(document, parsed, item_codes, departments)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        versions.append(_rule_set(parsed, path, f"sha256:{digest}"))
    versions.sort(key=lambda rules: rules.effective_from or 0)
    logger.info("rules loaded: %s", ", ".join(
        f"{rules.version} from {rules.effective_from}" for rules in versions) or "none")
    return RuleBook(tuple(versions))


def _fail(document: YamlDocument, location: Sequence[str | int], message: str) -> NoReturn:
    raise ConfigurationError(
        message,
        path=str(document.path),
        line=document.line_of(location),
        field=".".join(str(step) for step in location),
    )


def _check_references(
    document: YamlDocument,
    parsed: RulesFile,
    item_codes: Collection[str],
    departments: Collection[str],
) -> None:
    known_reasons = {reason.value for reason in Reason}
    for reason, team in parsed.routing.items():
        if reason not in known_reasons:
            _fail(document, ("routing", reason), f"unknown reason code {reason!r}")
        if not _is_team(team):
            _fail(document, ("routing", reason), f"team {team!r} is not a lower-case name")

    categories: dict[str, int] = {}
    for index, chain in enumerate(parsed.approvals.chains):
        if chain.category in categories:
            _fail(document, ("approvals", "chains", index, "category"),
                  f"category already has the chain at approvals.chains.{categories[chain.category]}")
        categories[chain.category] = index

    suppliers = {supplier.code for supplier in parsed.procurement.suppliers}
    if len(suppliers) != len(parsed.procurement.suppliers):
        _fail(document, ("procurement", "suppliers"), "a supplier code is listed twice")
    for department in parsed.procurement.budgets:
        if department not in departments:
            _fail(document, ("procurement", "budgets", department),
                  f"department {department} is not in departments.yaml")

    for item_code, category in parsed.supplies.item_categories.items():
        where = ("supplies", "item_categories", item_code)
        if item_code not in item_codes:
            _fail(document, where, f"item {item_code} is not in supply_items.csv")
        _check_category(document, where, category, categories)

    pairs: dict[tuple[str, str], int] = {}
    for index, level in enumerate(parsed.supplies.par_levels):
        where = ("supplies", "par_levels", index)
        if level.location not in departments:
            _fail(document, (*where, "location"),
                  f"location {level.location} is not a department in departments.yaml")
        if level.item_code not in item_codes:
            _fail(document, (*where, "item_code"),
                  f"item {level.item_code} is not in supply_items.csv")
        if level.supplier is not None and level.supplier not in suppliers:
            _fail(document, (*where, "supplier"),
                  f"supplier {level.supplier} is not in procurement.suppliers")
        if level.category is not None:
            _check_category(document, (*where, "category"), level.category, categories)
        pair = (level.location, level.item_code)
        if pair in pairs:
            _fail(document, (*where, "item_code"),
                  f"{pair[0]}/{pair[1]} already has a par level at supplies.par_levels.{pairs[pair]}")
        pairs[pair] = index

    edits: set[tuple[str, str]] = set()
    for index, edit in enumerate(parsed.coding_edits):
        if (edit.system, edit.code) in edits:
            _fail(document, ("coding_edits", index, "code"),
                  f"{edit.system} {edit.code} already has a coding edit")
        edits.add((edit.system, edit.code))


def _check_category(
    document: YamlDocument,
    where: tuple[str | int, ...],
    category: str,
    chains: dict[str, int],
) -> None:
    if chains and category not in chains and ANY_CATEGORY not in chains:
        _fail(document, where, f"category {category!r} has no approval chain and no "
              "'*' chain exists; add one under approvals.chains")


def _is_team(team: str) -> bool:
    return re.fullmatch(TEAM, team) is not None


def _rule_set(parsed: RulesFile, path: Path, digest: str) -> RuleSet:
    validation = parsed.validation
    return RuleSet(
        version=parsed.version,
        effective_from=parsed.effective_from,
        digest=digest,
        path=path.name,
        validation=Validation(
            max_issue_quantity=validation.supplies.max_issue_quantity,
            max_request_amount=validation.procurement.max_request_amount,
            max_request_quantity=validation.procurement.max_request_quantity,
            max_authorized_units=validation.authorizations.max_units,
        ),
        coding_edits={
            (edit.system, edit.code): CodingEdit(
                edit.system, edit.code, edit.action, edit.replacement, edit.reason
            )
            for edit in parsed.coding_edits
        },
        pricing=tuple(
            PricingRule(entry.multiplier, entry.charge_code, entry.revenue_code_prefix)
            for entry in parsed.pricing
        ),
        routing=dict(parsed.routing),
        approval_chains={
            chain.category: tuple(
                ApprovalStep(step.name, step.team, step.from_amount) for step in chain.steps
            )
            for chain in parsed.approvals.chains
        },
        par_auto_approve_below=parsed.approvals.par_auto_approve_below,
        budgets=dict(parsed.procurement.budgets),
        suppliers={supplier.code: supplier.name for supplier in parsed.procurement.suppliers},
        item_categories=dict(parsed.supplies.item_categories),
        authorization_required=frozenset(
            (entry.system, entry.code) for entry in parsed.authorizations.required
        ),
        expiry_warning_days=parsed.authorizations.expiry_warning_days,
        par_levels={
            (level.location, level.item_code): ParLevel(
                level.location, level.item_code, level.par, level.order_up_to,
                level.supplier, level.category,
            )
            for level in parsed.supplies.par_levels
        },
    )


def load_stock_counts(
    path: Path, *, item_codes: Collection[str], departments: Collection[str]
) -> tuple[StockCount, ...]:
    """Read ``stock_counts.csv``; a missing file gives no counts.

    Raises:
        ConfigurationError: For an invalid row, an unknown item or location,
            or a second count of one item at one location on one day.
    """
    if not path.is_file():
        return ()
    counts = []
    rows = read_csv(path, StockCountRow, key=("location", "item_code", "counted_on"))
    for row in rows:
        value: StockCountRow = row.value
        if value.location not in departments:
            raise ConfigurationError(
                f"location {value.location} is not a department in departments.yaml",
                path=str(path), line=row.line, field="location",
            )
        if value.item_code not in item_codes:
            raise ConfigurationError(
                f"item {value.item_code} is not in supply_items.csv",
                path=str(path), line=row.line, field="item_code",
            )
        counts.append(
            StockCount(value.location, value.item_code, value.quantity, value.counted_on, row.line)
        )
    return tuple(counts)
