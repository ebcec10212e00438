"""The database schema: raw messages, canonical records, postings, work items.

Everything durable lives here so that a step's outputs and the mark that the
step is done commit in one transaction. Money and quantities are stored by
:class:`DecimalText` so that SQLite keeps their exact value.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine


class DecimalText(TypeDecorator[Decimal]):
    """A ``Decimal`` stored exactly: as text on SQLite, unscaled NUMERIC elsewhere.

    SQLite has no decimal type and would round-trip through float. The
    NUMERIC has no fixed scale so that a value reads back with the scale it
    was written with (``135.50`` stays ``135.50``, not ``135.5000``).
    """

    impl = String(40)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(40))
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, Decimal):
            raise TypeError(f"expected Decimal, got {type(value).__name__}")
        return str(value) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return Decimal(value) if isinstance(value, str) else Decimal(str(value))


metadata = MetaData()

messages = Table(
    "messages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source", String(200), nullable=False),
    Column("origin", String(500), nullable=True),
    Column("format", String(40), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("content_sha256", String(64), nullable=False),
    Column("dedup_key", String(300), nullable=False),
    Column("occurrence", Integer, nullable=False, default=1),
    Column("ordering_key", String(200), nullable=True),
    Column("lane", Integer, nullable=False, default=0),
    Column("state", String(20), nullable=False),
    Column("duplicate_of", Integer, ForeignKey("messages.id"), nullable=True),
    Column("error", Text, nullable=True),
    Column("summary", Text, nullable=True),
    Column("processed_at", DateTime(timezone=True), nullable=True),
    Column("run_id", Integer, nullable=True),
    Column("processed_run_id", Integer, nullable=True),
    Column("content_pruned_at", DateTime(timezone=True), nullable=True),
    Column("content_archive", String(300), nullable=True),
    Column("replay_of", Integer, nullable=True),
    Column("diagnoses_stored", Integer, nullable=False, server_default="0"),
    Index("ix_messages_state_id", "state", "id"),
    Index("ix_messages_state_lane_id", "state", "lane", "id"),
    Index("ix_messages_dedup_key", "dedup_key"),
)
"""Every raw input, stored verbatim before anything else happens.

``run_id`` is the run that read the message and ``processed_run_id`` the run
that processed it; they differ when a run finishes what a stopped one left.

``state`` is ``received`` until processed, then ``processed``, ``failed`` (a
work item records the reason) or ``duplicate`` (``duplicate_of`` names the
first copy). ``origin`` locates the message in its file (path and line or
byte offset). ``occurrence`` numbers identical CSV rows of one file that are
distinct events. ``ordering_key`` is the patient the message is about, and
``lane`` a hash of it: messages of one lane are processed one batch at a
time in id order, so updates for a patient apply in the order they arrived.

The bytes themselves are in ``message_bodies`` (or ``retained_bodies``), so
that retention can drop them and keep this row: ``content_pruned_at`` is set
when they were pruned and ``content_archive`` names the archive file that
holds them since (see :mod:`carebridge.engine.retention`).

``replay_of`` links a message stored again by a person (a replay, or a
corrected copy sent from a work item) to the message it replaces.
"""

message_bodies = Table(
    "message_bodies",
    metadata,
    Column("message_id", Integer, ForeignKey("messages.id"), primary_key=True),
    Column("received_at", DateTime(timezone=True), primary_key=True),
    Column("raw", LargeBinary, nullable=False),
    postgresql_partition_by="RANGE (received_at)",
)
"""The raw bytes of each message, verbatim, keyed by id and arrival time.

On PostgreSQL the table is partitioned by month of ``received_at`` (one
partition per month, ``message_bodies_YYYY_MM``), so pruning a month drops
a partition and gives its space back at once. ``received_at`` is the
message's own, which is why it is part of the key: a partitioned table's
key must contain the partition column.
"""

retained_bodies = Table(
    "retained_bodies",
    metadata,
    Column("message_id", Integer, ForeignKey("messages.id"), primary_key=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("raw", LargeBinary, nullable=False),
    Column("retained_at", DateTime(timezone=True), nullable=False),
)
"""Bodies kept past their month's partition: messages not processed yet,
failed ones and those with an open work item, until their own retention ends."""

lanes = Table(
    "lanes",
    metadata,
    Column("lane", Integer, primary_key=True, autoincrement=False),
)
"""One row per lane. A worker locks the rows of the lanes it processes
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so two workers never process
messages of the same lane at once."""

message_keys = Table(
    "message_keys",
    metadata,
    Column("dedup_key", String(300), primary_key=True),
    Column("message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("content_sha256", String(64), nullable=False),
)
"""First claim of each dedup key; the primary key makes the check race-free.

``content_sha256`` is the digest that distinguishes a resend from a different message
under the same key (for HL7 v2, taken with CR segment terminators)."""

patients = Table(
    "patients",
    metadata,
    Column("patient_id", String(100), primary_key=True),
    Column("mrn", String(100), nullable=True),
    Column("family_name", Text, nullable=True),
    Column("given_name", Text, nullable=True),
    Column("birth_date", Date, nullable=True),
    Column("gender", String(20), nullable=True),
    Column("home_phone", Text, nullable=True),
    Column("business_phone", Text, nullable=True),
    Column("source_message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("updated_message_id", Integer, ForeignKey("messages.id"), nullable=False),
)

encounters = Table(
    "encounters",
    metadata,
    Column("encounter_id", String(100), primary_key=True),
    Column("patient_id", String(100), nullable=False),
    Column("encounter_class", String(40), nullable=True),
    Column("start", DateTime(timezone=True), nullable=True),
    Column("end", DateTime(timezone=True), nullable=True),
    Column("code", String(40), nullable=True),
    Column("code_system", String(20), nullable=True),
    Column("department", String(40), nullable=True),
    Column("guarantor", Text, nullable=True),
    Column("source_message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("updated_message_id", Integer, ForeignKey("messages.id"), nullable=False),
)

diagnoses = Table(
    "diagnoses",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", Integer, nullable=False),
    Column("position", Integer, nullable=False),
    Column("encounter_id", String(100), nullable=False),
    Column("code_system", Text, nullable=False),
    Column("code", Text, nullable=False),
    Column("description", Text, nullable=True),
    Index("ix_diagnoses_encounter", "encounter_id"),
)
"""Each diagnosis a processed message documents, in the order the message
lists them (``position``).

The claims step reads them for billing readiness. Messages processed before
this table existed have ``messages.diagnoses_stored`` = 0, and their
diagnoses are read by mapping the stored message again.
"""

services = Table(
    "services",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("service_key", String(300), nullable=False),
    Column("message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("origin", String(20), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("code_system", String(20), nullable=True),
    Column("code", String(60), nullable=True),
    Column("quantity", DecimalText, nullable=True),
    Column("service_date", Date, nullable=True),
    Column("patient_id", String(100), nullable=True),
    Column("encounter_id", String(100), nullable=True),
    Column("fingerprint", String(64), nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("work_item_id", Integer, ForeignKey("work_items.id"), nullable=True),
    Index("ix_services_key", "service_key"),
    Index("ix_services_encounter", "encounter_id"),
)
"""One row per service received; ``outcome`` is charged, work_item or duplicate.

``fingerprint`` hashes what the service says (code, units, date, prices), so
a second service under a known key is a duplicate only if it says the same.

``origin`` is ``clinical`` for documented services and ``supply`` for the
charge side of a chargeable supply, so that the run's identity can be
checked per origin.
"""

charge_lines = Table(
    "charge_lines",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("service_key", String(300), nullable=False, unique=True),
    Column("service_id", Integer, ForeignKey("services.id"), nullable=False),
    Column("charge_code", String(60), nullable=False),
    Column("revenue_code", String(4), nullable=False),
    Column("hcpcs", String(20), nullable=True),
    Column("units", DecimalText, nullable=False),
    Column("unit_price", DecimalText, nullable=False),
    Column("amount", DecimalText, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("service_date", Date, nullable=False),
    Column("department", String(40), nullable=False),
    Column("gl_account", String(40), nullable=False),
    Column("patient_id", String(100), nullable=True),
    Column("encounter_id", String(100), nullable=True),
    Column("source_message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("chargemaster_version", String(60), nullable=False),
    Column("journal_id", Integer, ForeignKey("journals.id"), nullable=True),
    Index("ix_charge_lines_encounter", "encounter_id"),
)
"""Priced charges. The unique ``service_key`` makes a second posting impossible."""

supply_usages = Table(
    "supply_usages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("usage_key", String(300), nullable=False),
    Column("message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("code_system", String(20), nullable=True),
    Column("code", String(60), nullable=True),
    Column("quantity", DecimalText, nullable=True),
    Column("fingerprint", String(64), nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("work_item_id", Integer, ForeignKey("work_items.id"), nullable=True),
    Index("ix_supply_usages_key", "usage_key"),
)

supply_issues = Table(
    "supply_issues",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("usage_key", String(300), nullable=False, unique=True),
    Column("usage_id", Integer, ForeignKey("supply_usages.id"), nullable=False),
    Column("item_code", String(60), nullable=False),
    Column("quantity", DecimalText, nullable=False),
    Column("unit_cost", DecimalText, nullable=False),
    Column("total_cost", DecimalText, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("service_date", Date, nullable=False),
    Column("department", String(40), nullable=False),
    Column("expense_account", String(40), nullable=False),
    Column("inventory_account", String(40), nullable=False),
    Column("encounter_id", String(100), nullable=True),
    Column("source_message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("journal_id", Integer, ForeignKey("journals.id"), nullable=True),
)
"""Inventory issues at cost. The unique ``usage_key`` prevents a second issue."""

work_items = Table(
    "work_items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("subject_key", String(320), nullable=False),
    Column("reason", String(40), nullable=False),
    Column("team", String(40), nullable=False),
    Column("message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("detail", Text, nullable=False),
    Column("status", String(20), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("assignee", String(120), nullable=True),
    Column("claimed_at", DateTime(timezone=True), nullable=True),
    Column("due_at", DateTime(timezone=True), nullable=True),
    Column("priority", Integer, nullable=False, default=0, server_default="0"),
    Column("priority_reason", Text, nullable=True),
    Column("amount_at_risk", DecimalText, nullable=True),
    Column("resolved_at", DateTime(timezone=True), nullable=True),
    Column("resolved_by", String(120), nullable=True),
    Column("resolution", Text, nullable=True),
    UniqueConstraint("subject_key", "reason", name="uq_work_items_subject_reason"),
    Index("ix_work_items_team_status", "team", "status"),
)
"""Exceptions for a person. ``subject_key`` names what is stuck: a service,
a supply usage or a whole message (``message:{id}``).

``status`` is ``open`` until a person acts: ``claimed`` (``assignee`` works
on it), then ``resolved``, ``approved`` or ``rejected``. ``due_at`` is the
SLA deadline; ``priority`` and ``priority_reason`` rank the queue (money at
risk, time left). Every change is a row in ``work_item_events``."""

work_item_events = Table(
    "work_item_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("work_item_id", Integer, ForeignKey("work_items.id"), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(120), nullable=False),
    Column("action", String(40), nullable=False),
    Column("detail", Text, nullable=True),
    Index("ix_work_item_events_item", "work_item_id", "id"),
)
"""The history of a work item: claimed, reassigned, resolved, approved."""

patient_links = Table(
    "patient_links",
    metadata,
    Column("merged_patient_id", String(100), primary_key=True),
    Column("surviving_patient_id", String(100), nullable=False),
    Column("work_item_id", Integer, ForeignKey("work_items.id"), nullable=False),
    Column("linked_at", DateTime(timezone=True), nullable=False),
    Column("linked_by", String(120), nullable=False),
    Column("repointed", Text, nullable=False),
    Index("ix_patient_links_surviving", "surviving_patient_id"),
)
"""Approved patient merges, as an ADT A40 would record them.

``merged_patient_id`` was found to be the same person as
``surviving_patient_id`` by the duplicate-patient check, and a person
(``linked_by``) approved the merge through work item ``work_item_id``.
The merged patient's encounters, services and charge lines were re-pointed
to the surviving patient at that moment; ``repointed`` contains the counts
per table as JSON. The merged ``patients`` row stays for lineage."""

api_clients = Table(
    "api_clients",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("client_id", String(120), nullable=False, unique=True),
    Column("roles", String(300), nullable=False),
    Column("secret_hash", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("disabled_at", DateTime(timezone=True), nullable=True),
)
"""Clients of the API. ``roles`` is a comma-separated list; the secret is
kept only as a salted scrypt hash."""

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("client_id", String(120), ForeignKey("api_clients.client_id"), nullable=False),
    Column("key_id", String(40), nullable=False, unique=True),
    Column("key_hash", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)
"""API keys for system integrations, each owned by a client and carrying its
roles. ``key_id`` is the public part of the key; the secret part is hashed."""

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(120), nullable=False),
    Column("action", String(60), nullable=False),
    Column("object_type", String(60), nullable=False),
    Column("object_id", String(200), nullable=True),
    Column("detail", Text, nullable=True),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
"""The audit log, hash-chained: each row's ``hash`` covers its own fields and
the previous row's hash, so an edited or deleted row breaks the chain."""

fhir_resources = Table(
    "fhir_resources",
    metadata,
    Column("resource_type", String(60), primary_key=True),
    Column("resource_id", String(64), primary_key=True),
    Column("version_id", Integer, primary_key=True, autoincrement=False),
    Column("last_updated", DateTime(timezone=True), nullable=False),
    Column("content", Text, nullable=False),
    Column("message_id", Integer, ForeignKey("messages.id"), nullable=True),
    Column("is_current", Integer, nullable=False, default=1),
    Index("ix_fhir_resources_current", "resource_type", "resource_id", "is_current"),
)
"""Every version of every resource received over the FHIR API; the newest
has ``is_current`` 1. ``message_id`` is the stored message it arrived in."""

fhir_conditional_keys = Table(
    "fhir_conditional_keys",
    metadata,
    Column("resource_type", String(60), primary_key=True),
    Column("criteria", String(500), primary_key=True),
    Column("resource_id", String(64), nullable=False),
)
"""One row per conditional create (``If-None-Exist``) criteria; the primary
key makes concurrent identical creates yield one resource."""

journals = Table(
    "journals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("journal_key", String(120), nullable=False, unique=True),
    Column("posting_batch", Integer, nullable=False),
    Column("posting_date", Date, nullable=False),
    Column("department", String(40), nullable=False),
    Column("cost_center", String(40), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("total_debit", DecimalText, nullable=False),
    Column("total_credit", DecimalText, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

journal_lines = Table(
    "journal_lines",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("journal_id", Integer, ForeignKey("journals.id"), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("account", String(40), nullable=False),
    Column("debit", DecimalText, nullable=False),
    Column("credit", DecimalText, nullable=False),
    Column("cost_center", String(40), nullable=False),
    Column("source_kind", String(20), nullable=False),
    Column("source_record_id", Integer, nullable=False),
    Column("source_key", String(300), nullable=False),
    Column("source_message_id", Integer, ForeignKey("messages.id"), nullable=False),
    UniqueConstraint("journal_id", "line_no", name="uq_journal_lines_journal_line"),
)
"""Journal lines; each names the charge or supply issue and the message behind it."""

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("command", String(40), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("chargemaster_version", String(60), nullable=True),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("destination", String(60), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("record_id", Integer, nullable=False),
    Column("idempotency_key", String(300), nullable=False),
    Column("payload", Text, nullable=False),
    Column("state", String(20), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("lease_owner", String(200), nullable=True),
    Column("lease_token", String(64), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("response", String(500), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Column("dead_at", DateTime(timezone=True), nullable=True),
    Column("replay_of", Integer, ForeignKey("deliveries.id"), nullable=True),
    Index("ix_deliveries_due", "destination", "state", "next_attempt_at"),
    Index("ix_deliveries_record", "kind", "record_id"),
)
"""The outbox: one row per record promised to a destination.

Rows are written in the transaction that creates the record, so a record
and its deliveries commit together. ``state`` is ``pending``, ``in_flight``
(claimed under ``lease_owner``/``lease_token`` until ``lease_until``),
``delivered`` or ``dead``. ``payload`` is the JSON built at enqueue time.
A replay of a dead delivery is a new row with the same ``idempotency_key``
and ``replay_of`` naming the dead row, which stays as the record of what
failed.
"""

Index(
    "uq_deliveries_live_key",
    deliveries.c.destination,
    deliveries.c.idempotency_key,
    unique=True,
    sqlite_where=deliveries.c.state != "dead",
    postgresql_where=deliveries.c.state != "dead",
)
# Partial: dead rows are kept for the record, so a replay may reuse their key.

destination_states = Table(
    "destination_states",
    metadata,
    Column("destination", String(60), primary_key=True),
    Column("circuit", String(20), nullable=False),
    Column("consecutive_failures", Integer, nullable=False, default=0),
    Column("opened_at", DateTime(timezone=True), nullable=True),
    Column("retry_at", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
"""Circuit breaker of each destination: ``closed``, ``open`` or ``half_open``.

While ``open``, no delivery to the destination is claimed until
``retry_at``; then one trial delivery runs (``half_open``, which itself
expires at ``retry_at`` in case the trial's worker dies).
"""

waits = Table(
    "waits",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(20), nullable=False),
    Column("wait_key", String(200), nullable=False),
    Column("service_id", Integer, ForeignKey("services.id"), nullable=False),
    Column("message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("payload", Text, nullable=False),
    Column("state", String(20), nullable=False),
    Column("deadline", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("resolved_at", DateTime(timezone=True), nullable=True),
    Index("ix_waits_state_kind_key", "state", "kind", "wait_key"),
    Index("ix_waits_state_deadline", "state", "deadline"),
)
"""Workflow steps parked until something happens: a charge waiting for its
encounter to be registered (``kind`` ``encounter``, ``wait_key`` the
encounter id) until ``deadline``. ``payload`` is the service as received, so
the step resumes from stored state alone. A waiting row costs one index
entry; it is looked at only when its encounter arrives or its time is up."""

claims = Table(
    "claims",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("encounter_id", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("patient_id", String(100), nullable=False),
    Column("kind", String(4), nullable=False),
    Column("frequency_code", String(1), nullable=False),
    Column("state", String(20), nullable=False),
    Column("claim_reference", String(30), nullable=True),
    Column("patient_control_number", String(38), nullable=False),
    Column("replaces_claim_id", Integer, ForeignKey("claims.id"), nullable=True),
    Column("original_reference", String(30), nullable=True),
    Column("total", DecimalText, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("charge_line_count", Integer, nullable=False),
    Column("diagnosis_codes", Text, nullable=True),
    Column("hold_reasons", Text, nullable=True),
    Column("validation_errors", Text, nullable=True),
    Column("x12", Text, nullable=True),
    Column("interchange_control_number", Integer, nullable=True),
    Column("message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("run_id", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("checked_at", DateTime(timezone=True), nullable=False),
    Column("validated_at", DateTime(timezone=True), nullable=True),
    Column("released_at", DateTime(timezone=True), nullable=True),
    Column("replaced_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("encounter_id", "version", name="uq_claims_encounter_version"),
    Index("ix_claims_state", "state"),
)
"""One row per claim of an encounter: version 1 is the original (frequency
code 1), each later version a replacement (frequency code 7) of the one
before, which ``replaces_claim_id`` names and ``original_reference`` quotes
as REF*F8.

``state`` is ``held`` (``hold_reasons`` lists the reason codes, each an open
work item on subject ``claim:{encounter_id}``), ``ready`` (passed the
readiness check, not yet validated and released), ``released`` (``x12`` is
the validated interchange) or ``replaced`` (a later version superseded it).
``charge_line_count`` is how many charge lines of the encounter the claim
covers, so that a late charge or credit is noticed. ``message_id`` is the
message that last updated the encounter; work items name it.
"""

claim_lines = Table(
    "claim_lines",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("claim_id", Integer, ForeignKey("claims.id"), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("procedure_code", String(20), nullable=True),
    Column("revenue_code", String(4), nullable=False),
    Column("units", DecimalText, nullable=False),
    Column("amount", DecimalText, nullable=False),
    Column("service_date", Date, nullable=False),
    Column("charge_line_ids", Text, nullable=False),
    UniqueConstraint("claim_id", "line_no", name="uq_claim_lines_claim_line"),
)
"""Service lines of a claim: the charge lines (``charge_line_ids``,
comma-separated) of one procedure code, revenue code and date, summed, so
that a credit nets against its charge."""

# --- Rules, stock, authorizations and procurement ---

rule_versions = Table(
    "rule_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version", String(60), nullable=False),
    Column("effective_from", Date, nullable=False),
    Column("digest", String(80), nullable=False),
    Column("path", String(300), nullable=False),
    Column("first_seen_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("version", "digest", name="uq_rule_versions_version_digest"),
)
"""Each rule version (``rules/*.yaml``) a process ran with, recorded the first
time one saw it; the audit log has a ``rules.loaded`` row for each."""

workflow_cursors = Table(
    "workflow_cursors",
    metadata,
    Column("step", String(40), primary_key=True),
    Column("last_message_id", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
"""How far a workflow step that reads stored messages again has read: every
processed message up to ``last_message_id`` has been read by it."""

workflow_marks = Table(
    "workflow_marks",
    metadata,
    Column("step", String(40), primary_key=True),
    Column("message_id", Integer, ForeignKey("messages.id"), primary_key=True),
)
"""Messages past a step's cursor that the step has read already. Messages
are processed out of id order across lanes, so the cursor only moves over a
run of read messages; the marks behind it are deleted."""

authorizations = Table(
    "authorizations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("auth_key", String(300), nullable=False, unique=True),
    Column("request_key", String(300), nullable=True),
    Column("source", String(40), nullable=False),
    Column("status", String(20), nullable=False),
    Column("patient_id", String(100), nullable=True),
    Column("code_system", String(20), nullable=True),
    Column("code", String(60), nullable=True),
    Column("units", DecimalText, nullable=True),
    Column("valid_from", Date, nullable=True),
    Column("valid_to", Date, nullable=True),
    Column("reference", String(120), nullable=True),
    Column("source_message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("updated_message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_authorizations_patient_code", "patient_id", "code_system", "code"),
    Index("ix_authorizations_request_key", "request_key"),
)
"""Authorizations and referrals for one service code each (FHIR
ServiceRequest, preauthorization Claim and ClaimResponse, HL7 REF^I12).
``status`` is pending, approved, denied or cancelled; ``valid_to`` is the last
day covered. ``request_key`` groups the records one request created, so
that its decision updates them all."""

scheduled_services = Table(
    "scheduled_services",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("appointment_key", String(300), nullable=False, unique=True),
    Column("patient_id", String(100), nullable=False),
    Column("code_system", String(20), nullable=False),
    Column("code", String(60), nullable=False),
    Column("scheduled_on", Date, nullable=False),
    Column("status", String(40), nullable=True),
    Column("authorization_status", String(20), nullable=True),
    Column("message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
"""Services booked by SIU^S12, with the authorization status found for each
when it was booked (``None`` when the service needs no authorization)."""

stock_levels = Table(
    "stock_levels",
    metadata,
    Column("location", String(40), primary_key=True),
    Column("item_code", String(60), primary_key=True),
    Column("on_hand", DecimalText, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
"""Stock on hand of each item at each location: the sum of its stock moves."""

goods_receipts = Table(
    "goods_receipts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("receipt_key", String(300), nullable=False, unique=True),
    Column("purchase_order_id", Integer, ForeignKey("purchase_orders.id"), nullable=False),
    Column("quantity", DecimalText, nullable=False),
    Column("lot_number", String(60), nullable=True),
    Column("received_on", Date, nullable=False),
    Column("received_by", String(120), nullable=False),
    Column("message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
"""Goods received against a purchase order; each adds a stock move."""

stock_moves = Table(
    "stock_moves",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("move_key", String(300), nullable=False, unique=True),
    Column("location", String(40), nullable=False),
    Column("item_code", String(60), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("quantity", DecimalText, nullable=False),
    Column("on_hand_after", DecimalText, nullable=False),
    Column("moved_on", Date, nullable=False),
    Column("supply_issue_id", Integer, ForeignKey("supply_issues.id"), nullable=True),
    Column("goods_receipt_id", Integer, ForeignKey("goods_receipts.id"), nullable=True),
    Column("message_id", Integer, ForeignKey("messages.id"), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_stock_moves_supply_issue", "supply_issue_id"),
)
"""Changes of stock on hand, signed: a count (the difference it makes), an
issue (negative) or a goods receipt. The unique ``move_key`` (``count:``,
``issue:{supply issue id}``, ``receipt:{goods receipt id}``) makes a second
move for the same event impossible."""

procurement_requests = Table(
    "procurement_requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_key", String(300), nullable=False, unique=True),
    Column("origin", String(20), nullable=False),
    Column("department", String(40), nullable=False),
    Column("location", String(40), nullable=False),
    Column("category", String(60), nullable=False),
    Column("supplier", String(60), nullable=True),
    Column("item_code", String(60), nullable=False),
    Column("quantity", DecimalText, nullable=False),
    Column("unit_cost", DecimalText, nullable=False),
    Column("amount", DecimalText, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("requested_on", Date, nullable=False),
    Column("needed_by", Date, nullable=True),
    Column("requested_by", String(120), nullable=False),
    Column("note", Text, nullable=True),
    Column("status", String(20), nullable=False),
    Column("rule_version", String(60), nullable=False),
    Column("message_id", Integer, ForeignKey("messages.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_procurement_requests_open", "location", "item_code", "status"),
)
"""Requests to buy: from a department (API) or a par-level signal.
``status`` is ``approving``, ``on_hold`` (a work item must be resolved
first), ``approved``, ``rejected``, ``ordered`` or ``received``. The message
is the stored API request, or the supply usage whose issue fell below par."""

approvals = Table(
    "approvals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", Integer, ForeignKey("procurement_requests.id"), nullable=False),
    Column("step_no", Integer, nullable=False),
    Column("step_name", String(60), nullable=False),
    Column("team", String(40), nullable=False),
    Column("reason", String(40), nullable=False),
    Column("status", String(20), nullable=False),
    Column("work_item_id", Integer, ForeignKey("work_items.id"), nullable=True),
    Column("decided_by", String(120), nullable=True),
    Column("decided_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("request_id", "step_no", name="uq_approvals_request_step"),
)
"""The approval chain of each request, one row per step in order. A step is
``waiting`` until the one before it is approved, then ``open`` with its work
item, then ``approved`` or ``rejected``."""

purchase_orders = Table(
    "purchase_orders",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("po_number", String(40), nullable=False, unique=True),
    Column("request_id", Integer, ForeignKey("procurement_requests.id"), nullable=False,
           unique=True),
    Column("supplier", String(60), nullable=False),
    Column("location", String(40), nullable=False),
    Column("item_code", String(60), nullable=False),
    Column("quantity", DecimalText, nullable=False),
    Column("unit_cost", DecimalText, nullable=False),
    Column("amount", DecimalText, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("order_date", Date, nullable=False),
    Column("status", String(20), nullable=False),
    Column("received_quantity", DecimalText, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
"""Purchase orders, one per approved request (the unique ``request_id``);
each is delivered to the destinations whose kinds list ``purchase_order``.
``status`` is ``ordered``, ``partially_received`` or ``received``."""
