"""Pydantic models of each configuration file: one model per file or CSV row.

Models check one value or one row; checks across files (an account a
department names must be in the chart) are in :mod:`carebridge.config.assemble`.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from carebridge.config.chargemaster import FORMATS
from carebridge.config.model import (
    DEFAULT_LISTENER_MESSAGE_TYPES,
    DEFAULT_LISTENER_VERSIONS,
    AccountType,
)
from carebridge.model.codes import DIAGNOSIS_SYSTEMS, ICD10CM_CODE, code_system_from
from carebridge.model.identifiers import npi_problem, zip_plus_4_valid

# Beancount account roots, by account type (beancount's default option names).
LEDGER_ROOTS = {
    AccountType.ASSET: "Assets",
    AccountType.LIABILITY: "Liabilities",
    AccountType.EQUITY: "Equity",
    AccountType.REVENUE: "Income",
    AccountType.EXPENSE: "Expenses",
}
# Beancount: components after the root start with a capital letter or digit.
LEDGER_NAME = r"^[A-Z][A-Za-z]*(:[A-Z0-9][A-Za-z0-9-]*)+$"
REVENUE_CODE = r"^\d{4}$"
CPT_HCPCS = r"^(\d{4}[0-9A-Z]|[A-Z]\d{4})$"


def _shape(code: str) -> str:
    # Mirrors assemble.code_shape: CPT digits, CPT II/III suffix, HCPCS letter.
    if code.isdigit():
        return "CPT"
    return code[0] if code[0].isalpha() else f"CPT-{code[-1]}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)


class ChargemasterRef(_Strict):
    """``chargemaster:`` in carebridge.yaml: which file is the house CDM."""

    path: str = Field(min_length=1)
    format: Literal[FORMATS]  # type: ignore[valid-type]
    version_id: str = Field(min_length=1)
    effective_from: dt.date
    encoding: str | None = None


class AccountRefs(_Strict):
    """``accounts:`` in carebridge.yaml: the balance-sheet accounts used."""

    receivable: str = Field(min_length=1)
    inventory: str = Field(min_length=1)


class RulesSection(_Strict):
    """``rules:`` in carebridge.yaml: limits on automatic charging."""

    earliest_service_date: dt.date
    latest_service_date: dt.date | None = None
    max_units: Decimal = Field(gt=0)
    max_amount: Decimal = Field(gt=0)
    encounter_wait_hours: int = Field(default=24, ge=0)


DELIVERY_KINDS = ("journal", "charge_line", "supply_issue", "purchase_order", "claim")
"""Record kinds the engine enqueues for delivery. ``claim`` is a released claim,
which an ERP destination books as a customer invoice."""


class DestinationEntry(_Strict):
    """One entry of ``destinations:`` in carebridge.yaml.

    ``settings`` belong to the destination ``type`` and are checked by it
    (see :mod:`carebridge.destinations.registry`).
    """

    name: str = Field(min_length=1, max_length=60, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    type: str = Field(min_length=1)
    enabled: bool = True
    kinds: list[Literal[DELIVERY_KINDS]] = Field(  # type: ignore[valid-type]
        min_length=1
    )
    settings: dict[str, Any] = Field(default_factory=dict)
    max_attempts: int = Field(default=10, ge=1, le=1000)
    backoff_base_seconds: float = Field(default=1.0, gt=0)
    backoff_cap_seconds: float = Field(default=300.0, gt=0)
    circuit_failure_threshold: int = Field(default=5, ge=1)
    circuit_cooldown_seconds: float = Field(default=60.0, gt=0)
    lease_seconds: float = Field(default=300.0, gt=0)
    batch_size: int = Field(default=20, ge=1, le=1000)

    @field_validator("kinds")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a kind is listed twice")
        return value

    @field_validator("backoff_cap_seconds")
    @classmethod
    def _cap_above_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("backoff_base_seconds")
        if base is not None and value < base:
            raise ValueError(f"the cap is below backoff_base_seconds ({base})")
        return value


class RetentionSection(_Strict):
    """``retention:`` in carebridge.yaml: how long raw message bytes are kept.

    Metadata rows are kept regardless; these bound the bytes only.
    ``archive_dir`` is relative to carebridge.yaml.
    """

    content_days: int = Field(default=90, ge=1)
    errored_content_days: int = Field(default=365, ge=1)
    archive_dir: str | None = Field(default=None, min_length=1)

    @field_validator("errored_content_days")
    @classmethod
    def _errored_not_shorter(cls, value: int, info: ValidationInfo) -> int:
        content = info.data.get("content_days")
        if content is not None and value < content:
            raise ValueError(f"is shorter than content_days ({content})")
        return value


class ListenerEntry(_Strict):
    """One entry of ``listeners:`` in carebridge.yaml: an MLLP listener.

    TLS paths are relative to carebridge.yaml. The character set is checked
    when the configuration is assembled.
    """

    name: str = Field(min_length=1, max_length=60, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    enabled: bool = True
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(ge=0, le=65535)
    tls_cert: str | None = None
    tls_key: str | None = Field(default=None, validate_default=True)
    default_charset: str = Field(default="UNICODE UTF-8", min_length=1)
    max_frame_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=1024**3)
    idle_timeout_seconds: float = Field(default=600.0, gt=0)
    message_types: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LISTENER_MESSAGE_TYPES), min_length=1
    )
    versions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LISTENER_VERSIONS), min_length=1
    )
    processing_ids: list[Literal["P", "T", "D"]] = Field(
        default_factory=lambda: ["P"], min_length=1
    )

    @field_validator("message_types")
    @classmethod
    def _message_type_shape(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not re.fullmatch(r"[A-Z0-9]{3}\^([A-Z0-9]{3}|\*)", entry):
                raise ValueError(
                    f"{entry!r} is not CODE^TRIGGER or CODE^* (e.g. DFT^P03, ADT^*)"
                )
        return value

    @field_validator("tls_key")
    @classmethod
    def _tls_pair(cls, value: str | None, info: ValidationInfo) -> str | None:
        if (value is None) != (info.data.get("tls_cert") is None):
            raise ValueError("give tls_cert and tls_key together, or neither")
        return value


class SigningKeyEntry(_Strict):
    """One entry of ``api.signing_keys``: a key that signs or checks bearer tokens.

    HS256 keys come from an environment variable or a file (never inline);
    RS256 keys are a PEM private key file (signing) or public key file
    (checking only). Paths are relative to carebridge.yaml.
    """

    kid: str = Field(min_length=1, max_length=60, pattern=r"^[A-Za-z0-9._-]+$")
    algorithm: Literal["HS256", "RS256"] = "HS256"
    secret_env: str | None = Field(default=None, min_length=1)
    secret_file: str | None = Field(default=None, min_length=1)
    private_key_file: str | None = Field(default=None, min_length=1)
    public_key_file: str | None = Field(default=None, min_length=1, validate_default=True)

    @field_validator("public_key_file")
    @classmethod
    def _one_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        algorithm = info.data.get("algorithm")
        given = {
            name for name in ("secret_env", "secret_file", "private_key_file")
            if info.data.get(name) is not None
        }
        if value is not None:
            given.add("public_key_file")
        if algorithm == "HS256" and (len(given) != 1 or not given <= {"secret_env", "secret_file"}):
            raise ValueError("an HS256 key needs exactly one of secret_env or secret_file")
        if algorithm == "RS256" and (
            not given or not given <= {"private_key_file", "public_key_file"}
        ):
            raise ValueError("an RS256 key needs private_key_file or public_key_file")
        return value


class ApiSection(_Strict):
    """``api:`` in carebridge.yaml: the FHIR and operations API of ``carebridge serve``."""

    enabled: bool = True
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8080, ge=0, le=65535)
    signing_keys: list[SigningKeyEntry] = Field(default_factory=list)
    token_ttl_seconds: int = Field(default=900, ge=60, le=86400)
    max_request_bytes: int = Field(default=20 * 1024 * 1024, ge=1024, le=1024**3)
    rate_limit_per_minute: int = Field(default=1200, ge=1)
    connection_max_age_seconds: float = Field(default=1.0, ge=0, le=3600)
    cors_origins: list[str] = Field(default_factory=list)
    fhir_unknown_elements: Literal["reject", "ignore"] = "reject"
    fhir_unknown_elements_by_client: dict[str, Literal["reject", "ignore"]] = Field(
        default_factory=dict
    )
    sla_hours_by_team: dict[str, float] = Field(default_factory=dict)


class MainFile(_Strict):
    """carebridge.yaml."""

    version: str = Field(min_length=1)
    effective_from: dt.date
    currency: str = Field(pattern=r"^[A-Z]{3}$")  # ISO 4217
    accounts: AccountRefs
    chargemaster: ChargemasterRef
    rules: RulesSection
    destinations: list[DestinationEntry] = Field(default_factory=list)
    listeners: list[ListenerEntry] = Field(default_factory=list)
    retention: RetentionSection = Field(default_factory=RetentionSection)
    api: ApiSection = Field(default_factory=ApiSection)


class DepartmentEntry(_Strict):
    """One department in departments.yaml."""

    code: str = Field(min_length=1, pattern=r"^[A-Z0-9_-]+$")
    name: str = Field(min_length=1)
    cost_center: str = Field(min_length=1)
    revenue_account: str = Field(min_length=1)
    supply_expense_account: str = Field(min_length=1)


class DepartmentsFile(_Strict):
    """departments.yaml."""

    version: str = Field(min_length=1)
    effective_from: dt.date
    departments: list[DepartmentEntry] = Field(min_length=1)


class AccountRow(_Strict):
    """A row of accounts.csv; ``ledger_name``'s root must match ``type``."""

    number: str = Field(pattern=r"^\d+$")
    name: str
    type: AccountType
    ledger_name: str = Field(pattern=LEDGER_NAME)

    @field_validator("ledger_name")
    @classmethod
    def _root_matches_type(cls, value: str, info: ValidationInfo) -> str:
        kind = info.data.get("type")
        if kind is not None and value.split(":", 1)[0] != LEDGER_ROOTS[kind]:
            raise ValueError(f"a {kind} account must be under {LEDGER_ROOTS[kind]}:")
        return value


class RevenueCodeRangeRow(_Strict):
    """A row of revenue_codes.csv: a CPT/HCPCS range and its revenue code."""

    system: Literal["CPT", "HCPCS"]
    range_start: str = Field(pattern=CPT_HCPCS)
    range_end: str = Field(pattern=CPT_HCPCS)
    revenue_code: str = Field(pattern=REVENUE_CODE)
    note: str | None = None

    @field_validator("range_end")
    @classmethod
    def _ordered(cls, value: str, info: ValidationInfo) -> str:
        start = info.data.get("range_start")
        if start is not None and (value < start or _shape(value) != _shape(start)):
            raise ValueError(
                f"range end {value} is before or unlike range start {start}"
            )
        return value


class RevenueCodeDepartmentRow(_Strict):
    """A row of revenue_code_departments.csv; the longest prefix wins."""

    revenue_code_prefix: str = Field(pattern=r"^\d{1,4}$")
    department: str
    note: str | None = None


class EncounterClassRow(_Strict):
    """A row of encounter_class_departments.csv."""

    encounter_class: str
    source: str
    department: str
    note: str | None = None


class CrosswalkRow(_Strict):
    """A row of a crosswalks/*.csv file."""

    source_system: str
    source_code: str
    charge_code: str
    note: str | None = None

    @field_validator("source_system")
    @classmethod
    def _known_system(cls, value: str) -> str:
        system = code_system_from(value)
        if system is None:
            raise ValueError(f"unknown code system {value!r}")
        if system in DIAGNOSIS_SYSTEMS:
            raise ValueError(
                f"{value!r} is a diagnosis code system; services are charged by "
                "procedure, service, vaccine or drug codes"
            )
        return system


class SupplyItemRow(_Strict):
    """A row of supply_items.csv (the demo item master)."""

    system: str
    code: str
    item_code: str
    description: str
    unit_cost: Decimal = Field(ge=0)
    implant: bool
    chargeable: bool
    charge_code: str | None = Field(default=None, validate_default=True)
    note: str | None = None

    @field_validator("system")
    @classmethod
    def _known_system(cls, value: str) -> str:
        system = code_system_from(value)
        if system is None:
            raise ValueError(f"unknown code system {value!r}")
        return system

    @field_validator("charge_code")
    @classmethod
    def _charge_code_if_chargeable(
        cls, value: str | None, info: ValidationInfo
    ) -> str | None:
        if info.data.get("chargeable") and not value:
            raise ValueError("a chargeable supply needs a charge_code")
        return value


# --- billing.yaml: claims (837P and 837I) master data ---

X12_ID = r"^[A-Za-z0-9 .-]+$"
"""Identifiers written into X12 segments: no delimiter characters."""
X12_TEXT = r"^[A-Za-z0-9 .,'&/()#-]+$"
"""Names and addresses written into X12 segments: no delimiter characters."""


class AddressEntry(_Strict):
    """A postal address; ``zip`` is the 9-digit ZIP+4 code that 837 billing providers need."""

    line1: str = Field(min_length=1, max_length=55, pattern=X12_TEXT)
    line2: str | None = Field(default=None, max_length=55, pattern=X12_TEXT)
    city: str = Field(min_length=2, max_length=30, pattern=X12_TEXT)
    state: str = Field(pattern=r"^[A-Z]{2}$")
    zip: str

    @field_validator("zip", mode="before")
    @classmethod
    def _zip_plus_4(cls, value: Any) -> Any:
        text = str(value).replace("-", "") if isinstance(value, (str, int)) else value
        if not isinstance(text, str) or not zip_plus_4_valid(text):
            raise ValueError("ZIP code must be ZIP+4: 9 digits, e.g. 021151234 or 02115-1234")
        return text


def _checked_npi(value: Any) -> Any:
    problem = npi_problem(str(value)) if isinstance(value, (str, int)) else "NPI must be text"
    if problem:
        raise ValueError(problem)
    return str(value)


class BillingProviderEntry(_Strict):
    """The organisation that bills (loop 2010AA): NPI, employer id and address."""

    name: str = Field(min_length=1, max_length=60, pattern=X12_TEXT)
    npi: str
    tax_id: str = Field(pattern=r"^\d{9}$")
    taxonomy: str | None = Field(default=None, pattern=r"^[0-9]{3}[0-9A-Z]{6}X$")
    address: AddressEntry

    @field_validator("npi", mode="before")
    @classmethod
    def _npi_check_digit(cls, value: Any) -> Any:
        return _checked_npi(value)


class PersonProviderEntry(_Strict):
    """A physician named on claims: the attending provider of 837I loop 2310A."""

    last_name: str = Field(min_length=1, max_length=60, pattern=X12_TEXT)
    first_name: str = Field(min_length=1, max_length=35, pattern=X12_TEXT)
    npi: str

    @field_validator("npi", mode="before")
    @classmethod
    def _npi_check_digit(cls, value: Any) -> Any:
        return _checked_npi(value)


class PartyEntry(_Strict):
    """The submitter or receiver of an interchange: name and the id it is known by."""

    name: str = Field(min_length=1, max_length=60, pattern=X12_TEXT)
    id: str = Field(min_length=2, max_length=15, pattern=X12_ID)


class SubmitterEntry(PartyEntry):
    """The submitter (loop 1000A) and its EDI contact."""

    contact_name: str = Field(min_length=1, max_length=60, pattern=X12_TEXT)
    contact_phone: str = Field(pattern=r"^\d{10}$")


class PayerEntry(_Strict):
    """The payer claims are sent to (loop 2010BB); ``claim_filing_indicator`` is SBR09."""

    name: str = Field(min_length=1, max_length=60, pattern=X12_TEXT)
    payer_id: str = Field(min_length=2, max_length=80, pattern=X12_ID)
    claim_filing_indicator: Literal[
        "11", "12", "13", "14", "15", "16", "17", "AM", "BL", "CH", "CI", "DS",
        "FI", "HM", "LM", "MA", "MB", "MC", "OF", "TV", "VA", "WC", "ZZ",
    ] = "CI"


class InstitutionalClassEntry(_Strict):
    """The 837I settings of one encounter class: facility type code and CL1 codes."""

    facility_type_code: str = Field(pattern=r"^\d{2}$")
    admission_type_code: str = Field(pattern=r"^\d$")
    admission_source_code: str = Field(pattern=r"^[0-9A-Z]$")
    patient_status_code: str = Field(pattern=r"^\d{2}$")
    inpatient: bool


class AuthorizationRuleEntry(_Strict):
    """A service that needs an approved authorization before it is billed."""

    system: Literal["CPT", "HCPCS", "CDM"]
    code: str = Field(min_length=1)
    note: str | None = None


class BillingFile(_Strict):
    """billing.yaml: parties, provider master data and claim rules."""

    version: str = Field(min_length=1)
    effective_from: dt.date
    usage_indicator: Literal["T", "P"] = "T"
    submitter: SubmitterEntry
    receiver: PartyEntry
    payer: PayerEntry
    billing_provider: BillingProviderEntry
    attending_provider: PersonProviderEntry
    default_place_of_service: str = Field(default="11", pattern=r"^\d{2}$")
    place_of_service_by_class: dict[str, str] = Field(default_factory=dict)
    institutional_classes: dict[str, InstitutionalClassEntry] = Field(default_factory=dict)
    diagnosis_crosswalk: str = Field(default="diagnosis_crosswalk.csv", min_length=1)
    authorization_required: list[AuthorizationRuleEntry] = Field(default_factory=list)

    @field_validator("place_of_service_by_class")
    @classmethod
    def _place_codes(cls, value: dict[str, str]) -> dict[str, str]:
        for encounter_class, code in value.items():
            if not re.match(r"^\d{2}$", str(code)):
                raise ValueError(
                    f"place of service {code!r} for {encounter_class} must be 2 digits"
                )
        return value


class DiagnosisCrosswalkRow(_Strict):
    """A row of the diagnosis crosswalk: a source code and its ICD-10-CM code."""

    source_system: str
    source_code: str = Field(min_length=1)
    icd10cm: str = Field(pattern=ICD10CM_CODE)
    note: str | None = None

    @field_validator("source_system")
    @classmethod
    def _known_system(cls, value: str) -> str:
        system = code_system_from(value)
        if system is None:
            raise ValueError(f"unknown code system {value!r}")
        return system
