"""Build a :class:`Configuration` from a configuration folder.

The folder holds (names fixed, relative to the folder)::

    carebridge.yaml                    currency, accounts, house chargemaster, rules
    accounts.csv                       chart of accounts
    departments.yaml                   departments and their accounts
    revenue_codes.csv                  CPT/HCPCS ranges -> UB-04 revenue code
    revenue_code_departments.csv       revenue code prefix -> department
    encounter_class_departments.csv    encounter class / PV1-2 -> department
    supply_items.csv                   item master
    crosswalks/*.csv                   source code -> charge code
    rules/*.yaml                       versioned business rules (optional)
    stock_counts.csv                   physical stock counts per location (optional)
    billing.yaml                       claims master data (optional: no claims without it)
    diagnosis_crosswalk.csv            SNOMED CT diagnosis -> ICD-10-CM (named in billing.yaml)

Checks across files run after every file has passed its own schema; each
names the file, line and field of the reference that does not resolve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import time
from pathlib import Path
from typing import NoReturn

import pydantic

from carebridge.config.chargemaster import load_chargemaster
from carebridge.config.loader import (
    CsvRow,
    YamlDocument,
    _describe,
    read_csv,
    read_yaml,
    validate_yaml,
)
from carebridge.config.model import (
    Account,
    ApiSettings,
    BillingSettings,
    ChargeItem,
    ChargemasterVersion,
    ChargeRules,
    Configuration,
    Department,
    DestinationConfig,
    ListenerConfig,
    RetentionPolicy,
    SigningKey,
    SupplyItem,
)
from carebridge.config.rules_loader import load_rules, load_stock_counts
from carebridge.config.schema import (
    AccountRow,
    BillingFile,
    CrosswalkRow,
    DepartmentsFile,
    DiagnosisCrosswalkRow,
    EncounterClassRow,
    MainFile,
    RevenueCodeDepartmentRow,
    RevenueCodeRangeRow,
    SupplyItemRow,
)
from carebridge.destinations.registry import validate_settings
from carebridge.errors import ConfigurationError
from carebridge.ingest.hl7v2.parser import charset_codec

logger = logging.getLogger(__name__)


def load_configuration(config_dir: Path) -> Configuration:
    """Load, validate and cross-check every file of a configuration folder.

    Args:
        config_dir: The folder holding ``carebridge.yaml`` and its companions.

    Returns:
        The read-only configuration. Chargemaster items without a revenue
        code get one from ``revenue_codes.csv``; every item with a revenue
        code gets its department from ``revenue_code_departments.csv``.

    Raises:
        ConfigurationError: For the first invalid file, value or reference,
            naming file, line and field.
    """
    started = time.perf_counter()
    config_dir = Path(config_dir)
    logger.info("loading configuration from %s", config_dir)
    main_doc = read_yaml(config_dir / "carebridge.yaml")
    main = validate_yaml(main_doc, MainFile)
    accounts = _load_accounts(config_dir / "accounts.csv")
    _check_main_accounts(main_doc, main, accounts)
    destinations = _load_destinations(main_doc, main)
    listeners = _load_listeners(main_doc, main)
    departments = _load_departments(config_dir / "departments.yaml", accounts)
    range_rows = _load_ranges(config_dir / "revenue_codes.csv")
    ranges = [row.value for row in range_rows]
    routes = _load_routes(config_dir / "revenue_code_departments.csv", departments)
    _check_ranges_routed(config_dir / "revenue_codes.csv", range_rows, routes)
    classes = _load_classes(config_dir / "encounter_class_departments.csv", departments)
    chargemaster, version, problems, cdm_path = _load_house_chargemaster(
        config_dir, main, main_doc
    )
    chargemaster = _classify(chargemaster, ranges, routes)
    crosswalk, crosswalk_files = _load_crosswalks(
        config_dir / "crosswalks", chargemaster
    )
    supplies = _load_supplies(config_dir / "supply_items.csv", chargemaster)
    item_codes = {item.item_code for item in supplies.values()}
    rule_book = load_rules(config_dir / "rules", item_codes=item_codes, departments=departments)
    stock_counts = load_stock_counts(
        config_dir / "stock_counts.csv", item_codes=item_codes, departments=departments
    )
    billing = _load_billing(config_dir)
    sources = [
        "carebridge.yaml",
        "accounts.csv",
        "departments.yaml",
        "revenue_codes.csv",
        "revenue_code_departments.csv",
        "encounter_class_departments.csv",
        "supply_items.csv",
        *crosswalk_files,
        *(f"rules/{rules.path}" for rules in rule_book.versions),
        str(cdm_path),
    ]
    if billing is not None:
        sources += ["billing.yaml", billing.file.diagnosis_crosswalk]
    configuration = Configuration(
        accounts=accounts,
        departments=departments,
        receivable_account=main.accounts.receivable,
        inventory_account=main.accounts.inventory,
        chargemaster=chargemaster,
        chargemaster_version=version,
        crosswalk=crosswalk,
        revenue_code_ranges=tuple(
            (r.range_start, r.range_end, r.revenue_code) for r in ranges
        ),
        revenue_code_departments={r.revenue_code_prefix: r.department for r in routes},
        encounter_class_departments=classes,
        supply_items=supplies,
        rules=ChargeRules(
            earliest_service_date=main.rules.earliest_service_date,
            latest_service_date=main.rules.latest_service_date,
            max_units=main.rules.max_units,
            max_amount=main.rules.max_amount,
            encounter_wait_hours=main.rules.encounter_wait_hours,
            currency=main.currency,
        ),
        sources=tuple(sources),
        chargemaster_problems=problems,
        version=main.version,
        effective_from=main.effective_from,
        destinations=destinations,
        retention=_retention(config_dir, main),
        listeners=listeners,
        api=_api(config_dir, main),
        billing=billing,
        rule_book=rule_book,
        stock_counts=stock_counts,
    )
    logger.info(
        "configuration %s loaded in %.2fs: %d accounts, %d departments, %d chargemaster "
        "items (%d bad rows), %d crosswalk entries, %d supply items",
        main.version,
        time.perf_counter() - started,
        len(accounts),
        len(departments),
        len(chargemaster),
        len(problems),
        len(crosswalk),
        len(supplies),
    )
    return configuration


def _rows(path: Path, model: type, key: tuple[str, ...]) -> list[CsvRow]:
    return read_csv(path, model, key=key)


def _load_accounts(path: Path) -> dict[str, Account]:
    accounts: dict[str, Account] = {}
    ledger_names: dict[str, int] = {}
    for row in _rows(path, AccountRow, ("number",)):
        value: AccountRow = row.value
        if value.ledger_name in ledger_names:
            raise ConfigurationError(
                f"ledger name already used on line {ledger_names[value.ledger_name]}",
                path=str(path),
                line=row.line,
                field="ledger_name",
            )
        ledger_names[value.ledger_name] = row.line
        accounts[value.number] = Account(
            value.number, value.name, value.type, value.ledger_name
        )
    return accounts


def _check_main_accounts(doc, main: MainFile, accounts: dict[str, Account]) -> None:
    for name in ("receivable", "inventory"):
        number = getattr(main.accounts, name)
        if number not in accounts:
            raise ConfigurationError(
                f"account {number} is not in accounts.csv",
                path=str(doc.path),
                line=doc.line_of(("accounts", name)),
                field=f"accounts.{name}",
            )


def _load_destinations(
    doc: YamlDocument, main: MainFile
) -> tuple[DestinationConfig, ...]:
    """Check each ``destinations:`` entry's name and type-specific settings."""
    configs: list[DestinationConfig] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(main.destinations):
        if entry.name in seen:
            message = f"name already used by destinations.{seen[entry.name]}"
            _destination_error(doc, (index, "name"), message)
        seen[entry.name] = index
        try:
            settings = validate_settings(entry.type, entry.settings)
        except LookupError as exc:
            message = f"{exc.args[0]}; correct it and restart"
            _destination_error(doc, (index, "type"), message)
        except pydantic.ValidationError as exc:
            problem = exc.errors()[0]
            location = (index, "settings", *problem["loc"])
            _destination_error(doc, location, _describe(problem))
        values = entry.model_dump(exclude={"kinds", "settings"})
        configs.append(
            DestinationConfig(**values, kinds=tuple(entry.kinds), settings=settings)
        )
    return tuple(configs)


def _retention(config_dir: Path, main: MainFile) -> RetentionPolicy:
    """Build the retention policy; a relative ``archive_dir`` is relative to the folder."""
    section = main.retention
    archive = None
    if section.archive_dir is not None:
        archive = (config_dir / section.archive_dir).resolve()
    return RetentionPolicy(
        content_days=section.content_days,
        errored_content_days=section.errored_content_days,
        archive_dir=archive,
    )


def _api(config_dir: Path, main: MainFile) -> ApiSettings:
    """Build the API settings; key file paths are relative to the folder."""
    section = main.api

    def resolve(path: str | None) -> Path | None:
        return None if path is None else (config_dir / path).resolve()

    keys = tuple(
        SigningKey(
            kid=entry.kid,
            algorithm=entry.algorithm,
            secret_env=entry.secret_env,
            secret_file=resolve(entry.secret_file),
            private_key_file=resolve(entry.private_key_file),
            public_key_file=resolve(entry.public_key_file),
        )
        for entry in section.signing_keys
    )
    values = section.model_dump(exclude={"signing_keys", "cors_origins"})
    return ApiSettings(
        **values, signing_keys=keys, cors_origins=tuple(section.cors_origins)
    )


def _load_listeners(doc: YamlDocument, main: MainFile) -> tuple[ListenerConfig, ...]:
    """Check each ``listeners:`` entry: unique name and address, known charset."""
    configs: list[ListenerConfig] = []
    names: dict[str, int] = {}
    addresses: dict[tuple[str, int], int] = {}
    for index, entry in enumerate(main.listeners):
        if entry.name in names:
            used = f"name already used by listeners.{names[entry.name]}"
            _listener_error(doc, (index, "name"), used)
        names[entry.name] = index
        address = (entry.host, entry.port)
        if entry.port and entry.enabled and address in addresses:
            _listener_error(doc, (index, "port"), f"port already used by listeners.{addresses[address]}")
        addresses[address] = index
        try:
            charset_codec(entry.default_charset)
        except ValueError as exc:
            _listener_error(doc, (index, "default_charset"), str(exc))
        values = entry.model_dump()
        for key in ("tls_cert", "tls_key"):
            if values[key] is not None:
                values[key] = str((doc.path.parent / values[key]).resolve())
        for key in ("message_types", "versions", "processing_ids"):
            values[key] = tuple(values[key])
        configs.append(ListenerConfig(**values))
    return tuple(configs)


def _listener_error(doc: YamlDocument, location: tuple, message: str) -> NoReturn:
    path = ("listeners", *location)
    raise ConfigurationError(
        message, path=str(doc.path), line=doc.line_of(path),
        field=".".join(str(step) for step in path),
    )


def _destination_error(
    doc: YamlDocument, location: tuple, message: str
) -> NoReturn:
    path = ("destinations", *location)
    raise ConfigurationError(
        message,
        path=str(doc.path),
        line=doc.line_of(path),
        field=".".join(str(step) for step in path),
    )


def _load_departments(
    path: Path, accounts: dict[str, Account]
) -> dict[str, Department]:
    doc = read_yaml(path)
    parsed = validate_yaml(doc, DepartmentsFile)
    departments: dict[str, Department] = {}
    for index, entry in enumerate(parsed.departments):
        if entry.code in departments:
            raise ConfigurationError(
                "duplicate department code",
                path=str(path),
                line=doc.line_of(("departments", index, "code")),
                field=f"departments.{index}.code",
            )
        for name in ("revenue_account", "supply_expense_account"):
            if getattr(entry, name) not in accounts:
                raise ConfigurationError(
                    f"account {getattr(entry, name)} is not in accounts.csv",
                    path=str(path),
                    line=doc.line_of(("departments", index, name)),
                    field=f"departments.{index}.{name}",
                )
        departments[entry.code] = Department(**entry.model_dump())
    return departments


def _load_ranges(path: Path) -> list[CsvRow]:
    rows = _rows(path, RevenueCodeRangeRow, ())
    ordered = sorted(rows, key=lambda row: (row.value.range_start, row.value.range_end))
    for before, after in itertools.pairwise(ordered):
        if after.value.range_start <= before.value.range_end:
            raise ConfigurationError(
                f"range overlaps the range on line {before.line}",
                path=str(path),
                line=after.line,
                field="range_start",
            )
    return rows


def _load_routes(
    path: Path, departments: dict[str, Department]
) -> list[RevenueCodeDepartmentRow]:
    rows = _rows(path, RevenueCodeDepartmentRow, ("revenue_code_prefix",))
    for row in rows:
        _require_department(path, row, departments)
    return [row.value for row in rows]


def _load_classes(path: Path, departments: dict[str, Department]) -> dict[str, str]:
    rows = _rows(path, EncounterClassRow, ("encounter_class",))
    for row in rows:
        _require_department(path, row, departments)
    return {row.value.encounter_class: row.value.department for row in rows}


def _require_department(
    path: Path, row: CsvRow, departments: dict[str, Department]
) -> None:
    if row.value.department not in departments:
        raise ConfigurationError(
            f"department {row.value.department} is not in departments.yaml",
            path=str(path),
            line=row.line,
            field="department",
        )


def department_for(revenue_code: str, routes: dict[str, str]) -> str | None:
    """Return the department of ``revenue_code`` by longest matching prefix."""
    for length in range(len(revenue_code), 0, -1):
        department = routes.get(revenue_code[:length])
        if department is not None:
            return department
    return None


def code_shape(code: str) -> str:
    """Return the family of a CPT/HCPCS code: ranges only hold their own family.

    Five digits is CPT Category I; a trailing F or T is CPT Category II/III;
    a leading letter is HCPCS Level II, one family per letter.
    """
    if code.isdigit():
        return "CPT"
    return code[0] if code[0].isalpha() else f"CPT-{code[-1]}"


def revenue_code_for(
    hcpcs: str, ranges: tuple[tuple[str, str, str], ...]
) -> str | None:
    """Return the revenue code of the range holding ``hcpcs``, if any."""
    shape = code_shape(hcpcs)
    for start, end, revenue_code in ranges:
        if code_shape(start) == shape and start <= hcpcs <= end:
            return revenue_code
    return None


def _check_ranges_routed(
    path: Path, ranges: list[CsvRow], routes: list[RevenueCodeDepartmentRow]
) -> None:
    table = {route.revenue_code_prefix: route.department for route in routes}
    for row in ranges:
        if department_for(row.value.revenue_code, table) is None:
            raise ConfigurationError(
                f"revenue code {row.value.revenue_code} has no department in "
                "revenue_code_departments.csv",
                path=str(path),
                line=row.line,
                field="revenue_code",
            )


def _load_house_chargemaster(config_dir: Path, main: MainFile, doc: YamlDocument):
    ref = main.chargemaster
    path = (config_dir / ref.path).resolve()
    if not path.is_file():
        raise ConfigurationError(
            f"chargemaster file {path} not found; paths are relative to "
            "carebridge.yaml, so fix the path or copy the file next to it",
            path=str(doc.path),
            line=doc.line_of(("chargemaster", "path")),
            field="chargemaster.path",
        )
    load = load_chargemaster(path, ref.format, encoding=ref.encoding)
    for error in load.errors:
        logger.warning("chargemaster row not loaded: %s", error)
    problems = tuple(str(error) for error in load.errors)
    logger.info(
        "chargemaster %s: %d rows read, %d items, %d bad, %d blank, %d collapsed",
        path.name,
        load.rows_read,
        len(load.items),
        len(load.errors),
        load.blank_rows,
        load.collapsed_rows,
    )
    checksum = hashlib.sha256(path.read_bytes()).hexdigest()
    version = ChargemasterVersion(
        ref.version_id, ref.effective_from, f"sha256:{checksum}"
    )
    return {item.charge_code: item for item in load.items}, version, problems, ref.path


def _classify(
    items: dict[str, ChargeItem],
    ranges: list[RevenueCodeRangeRow],
    routes: list[RevenueCodeDepartmentRow],
) -> dict[str, ChargeItem]:
    table = tuple((r.range_start, r.range_end, r.revenue_code) for r in ranges)
    route_table = {route.revenue_code_prefix: route.department for route in routes}
    classified = {}
    for code, item in items.items():
        revenue_code = item.revenue_code or (
            revenue_code_for(item.hcpcs, table) if item.hcpcs else None
        )
        department = department_for(revenue_code, route_table) if revenue_code else None
        classified[code] = dataclasses.replace(
            item, revenue_code=revenue_code, department=department
        )
    return classified


def _load_crosswalks(
    folder: Path, chargemaster: dict[str, ChargeItem]
) -> tuple[dict[tuple[str, str], str], list[str]]:
    if not folder.is_dir():
        raise ConfigurationError("crosswalks folder not found", path=str(folder))
    crosswalk: dict[tuple[str, str], str] = {}
    origin: dict[tuple[str, str], str] = {}
    files = sorted(folder.glob("*.csv"))
    for path in files:
        for row in _rows(path, CrosswalkRow, ("source_system", "source_code")):
            value: CrosswalkRow = row.value
            key = (value.source_system, value.source_code)
            if key in origin:
                raise ConfigurationError(
                    f"{key[0]} {key[1]} is already mapped at {origin[key]}",
                    path=str(path),
                    line=row.line,
                    field="source_code",
                )
            if value.charge_code not in chargemaster:
                raise ConfigurationError(
                    f"charge code {value.charge_code} is not in the house chargemaster",
                    path=str(path),
                    line=row.line,
                    field="charge_code",
                )
            origin[key] = f"{path.name}:{row.line}"
            crosswalk[key] = value.charge_code
    return crosswalk, [f"crosswalks/{path.name}" for path in files]


def _load_supplies(
    path: Path, chargemaster: dict[str, ChargeItem]
) -> dict[tuple[str, str], SupplyItem]:
    supplies: dict[tuple[str, str], SupplyItem] = {}
    for row in _rows(path, SupplyItemRow, ("system", "code")):
        value: SupplyItemRow = row.value
        if value.charge_code is not None and value.charge_code not in chargemaster:
            raise ConfigurationError(
                f"charge code {value.charge_code} is not in the house chargemaster",
                path=str(path),
                line=row.line,
                field="charge_code",
            )
        supplies[(value.system, value.code)] = SupplyItem(
            item_code=value.item_code,
            description=value.description,
            unit_cost=value.unit_cost,
            chargeable=value.chargeable,
            charge_code=value.charge_code,
            implant=value.implant,
        )
    return supplies


def _load_billing(config_dir: Path) -> BillingSettings | None:
    path = config_dir / "billing.yaml"
    if not path.is_file():
        logger.info("no billing.yaml in %s: claims are not built", config_dir)
        return None
    document = read_yaml(path)
    billing = validate_yaml(document, BillingFile)
    crosswalk_path = config_dir / billing.diagnosis_crosswalk
    if not crosswalk_path.is_file():
        raise ConfigurationError(
            f"diagnosis crosswalk {crosswalk_path} not found; paths are relative to "
            "billing.yaml",
            path=str(path),
            line=document.line_of(("diagnosis_crosswalk",)),
            field="diagnosis_crosswalk",
        )
    rows = _rows(crosswalk_path, DiagnosisCrosswalkRow, ("source_system", "source_code"))
    crosswalk = {
        (row.value.source_system, row.value.source_code): row.value.icd10cm.replace(".", "")
        for row in rows
    }
    return BillingSettings(
        file=billing,
        diagnosis_crosswalk=crosswalk,
        authorization_required=frozenset(
            (rule.system, rule.code.upper()) for rule in billing.authorization_required
        ),
    )
