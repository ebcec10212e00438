"""Master data and rules as the workflows see them, once loaded and validated.

The loaders in this package build a :class:`Configuration` from a folder of
versioned YAML and CSV files; everything here is read-only afterwards.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from carebridge.config.rules import RuleBook, StockCount

if TYPE_CHECKING:
    from carebridge.config.schema import BillingFile


class AccountType(StrEnum):
    """The five account classes of double-entry bookkeeping."""

    ASSET = "asset"
    LIABILITY = "liability"
    EQUITY = "equity"
    REVENUE = "revenue"
    EXPENSE = "expense"


@dataclass(frozen=True, slots=True)
class Account:
    """A general-ledger account from the chart of accounts.

    ``ledger_name`` is the beancount account name, e.g.
    ``Assets:Receivable:Patients``; its root must match ``type``.
    """

    number: str
    name: str
    type: AccountType
    ledger_name: str


@dataclass(frozen=True, slots=True)
class Department:
    """A clinical department and the cost center its amounts are charged to."""

    code: str
    name: str
    cost_center: str
    revenue_account: str
    supply_expense_account: str


@dataclass(frozen=True, slots=True)
class ChargeItem:
    """One chargemaster (CDM) line.

    ``origin`` names the file and line the item was loaded from. ``hcpcs`` is
    the bare five-character CPT/HCPCS code; modifiers the hospital appended in
    the same cell (``71046TC``, ``7311026RT``) are in ``modifiers`` and a
    multiplier (``86003 X16``) in ``hcpcs_units``.
    """

    charge_code: str
    description: str
    price: Decimal
    revenue_code: str | None
    hcpcs: str | None
    department: str | None
    origin: str
    modifiers: tuple[str, ...] = ()
    hcpcs_units: int = 1


@dataclass(frozen=True, slots=True)
class ChargemasterVersion:
    """Identity of the chargemaster in force: its id, start date and checksum."""

    version_id: str
    effective_from: dt.date
    checksum: str


@dataclass(frozen=True, slots=True)
class SupplyItem:
    """An item-master entry for a stocked supply."""

    item_code: str
    description: str
    unit_cost: Decimal
    chargeable: bool
    charge_code: str | None
    implant: bool


@dataclass(frozen=True, slots=True)
class ChargeRules:
    """Limits that decide whether a service can be charged automatically."""

    earliest_service_date: dt.date
    latest_service_date: dt.date | None
    max_units: Decimal
    currency: str
    max_amount: Decimal = Decimal("1000000.00")
    encounter_wait_hours: int = 24


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    """A downstream system that posted records are delivered to.

    ``type`` names an entry of :mod:`carebridge.destinations.registry`;
    ``settings`` holds that type's own settings, already validated by it.
    Retries wait ``backoff_base_seconds * 2**(attempt - 1)`` at most, capped
    at ``backoff_cap_seconds`` (full jitter); after ``max_attempts`` a
    delivery is dead. ``circuit_failure_threshold`` consecutive failures
    stop all attempts for ``circuit_cooldown_seconds``.
    """

    name: str
    type: str
    kinds: tuple[str, ...]
    settings: dict[str, Any]
    enabled: bool = True
    max_attempts: int = 10
    backoff_base_seconds: float = 1.0
    backoff_cap_seconds: float = 300.0
    circuit_failure_threshold: int = 5
    circuit_cooldown_seconds: float = 60.0
    lease_seconds: float = 300.0
    batch_size: int = 20


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long raw message bytes are kept (see :mod:`carebridge.engine.retention`).

    Bytes of ordinary messages are pruned after ``content_days``; those of
    failed messages and of messages with an open work item after
    ``errored_content_days``. Pruned bytes go to ``archive_dir`` first.
    """

    content_days: int = 90
    errored_content_days: int = 365
    archive_dir: Path | None = None


DEFAULT_LISTENER_MESSAGE_TYPES = (
    "ADT^*", "BAR^P01", "BAR^P02", "BAR^P12", "DFT^P03", "DFT^P11", "ORU^R01",
)
"""Message types an MLLP listener accepts unless configured: the finance
types carebridge maps, every ADT trigger and ORU^R01 results."""

DEFAULT_LISTENER_VERSIONS = (
    "2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1",
    "2.8", "2.8.1", "2.8.2",
)
"""HL7 v2 versions (MSH-12.1) an MLLP listener accepts unless configured."""


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """An MLLP listener that receives HL7 v2 messages over TCP.

    ``message_types`` entries are ``CODE^TRIGGER`` or ``CODE^*``; a message
    of another type is rejected with ``AR``, as is a version or processing id
    (MSH-11.1) not listed. ``default_charset`` applies when MSH-18 is empty
    (an HL7 table 0211 name or a Python codec). ``tls_cert`` and ``tls_key``
    are absolute paths, both or neither.
    """

    name: str
    port: int
    host: str = "127.0.0.1"
    enabled: bool = True
    tls_cert: str | None = None
    tls_key: str | None = None
    default_charset: str = "UNICODE UTF-8"
    max_frame_bytes: int = 4 * 1024 * 1024
    idle_timeout_seconds: float = 600.0
    message_types: tuple[str, ...] = DEFAULT_LISTENER_MESSAGE_TYPES
    versions: tuple[str, ...] = DEFAULT_LISTENER_VERSIONS
    processing_ids: tuple[str, ...] = ("P",)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A bearer-token key as configured; the secret itself is read when the API starts.

    Paths are absolute. ``secret_env`` names an environment variable.
    """

    kid: str
    algorithm: str
    secret_env: str | None = None
    secret_file: Path | None = None
    private_key_file: Path | None = None
    public_key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """The FHIR and operations API (``api:`` in carebridge.yaml).

    The first signing key that can sign is used for new tokens; every key
    is accepted when checking one, so keys can be rotated by adding the new
    key first and removing the old one after the longest token lifetime.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    signing_keys: tuple[SigningKey, ...] = ()
    token_ttl_seconds: int = 900
    max_request_bytes: int = 20 * 1024 * 1024
    rate_limit_per_minute: int = 1200
    connection_max_age_seconds: float = 1.0
    cors_origins: tuple[str, ...] = ()
    fhir_unknown_elements: str = "reject"
    fhir_unknown_elements_by_client: dict[str, str] = field(default_factory=dict)
    sla_hours_by_team: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BillingSettings:
    """Claims master data and rules from billing.yaml.

    ``diagnosis_crosswalk`` maps ``(code system, code)`` to an ICD-10-CM code
    written without its dot. ``authorization_required`` contains the
    ``(code system, code)`` of services that need an approved authorization.
    """

    file: BillingFile
    diagnosis_crosswalk: dict[tuple[str, str], str]
    authorization_required: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True, slots=True)
class Configuration:
    """Everything the workflows need from master data and rules."""

    accounts: dict[str, Account]
    departments: dict[str, Department]
    receivable_account: str
    inventory_account: str
    chargemaster: dict[str, ChargeItem]
    chargemaster_version: ChargemasterVersion
    crosswalk: dict[tuple[str, str], str]
    revenue_code_ranges: tuple[tuple[str, str, str], ...]
    revenue_code_departments: dict[str, str]
    encounter_class_departments: dict[str, str]
    supply_items: dict[tuple[str, str], SupplyItem]
    rules: ChargeRules
    sources: tuple[str, ...] = field(default=())
    chargemaster_problems: tuple[str, ...] = field(default=())
    version: str = ""
    effective_from: dt.date | None = None
    destinations: tuple[DestinationConfig, ...] = field(default=())
    listeners: tuple[ListenerConfig, ...] = field(default=())
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    api: ApiSettings = field(default_factory=ApiSettings)
    billing: BillingSettings | None = None
    """``None`` when the folder has no billing.yaml: no claims are built."""
    rule_book: RuleBook = field(default_factory=RuleBook)
    """Versions of the business rules from ``rules/*.yaml``, chosen by event date."""
    stock_counts: tuple[StockCount, ...] = ()
    """Physical counts from ``stock_counts.csv`` that set stock on hand."""
