"""Response models of the message routes: metadata, raw content, lineage."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class MessageSummary(BaseModel):
    """A stored message as a search lists it."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 1203, "source": "files", "format": "hl7v2", "message_type": "DFT^P03",
        "control_id": "CTL0011", "received_at": "2025-03-02T10:15:00Z",
        "state": "processed", "patient_id": "MRN0011", "duplicate_of": None,
        "replay_of": None, "processed_at": "2025-03-02T10:15:01Z", "content_pruned": False,
    }]})

    id: int
    source: str
    format: str = Field(description="hl7v2, fhir-json or synthea-csv:{kind}.")
    message_type: str | None = Field(
        default=None, description="HL7 MSH-9 (e.g. ADT^A01) or the FHIR resourceType.")
    control_id: str | None = Field(default=None, description="HL7 MSH-10.")
    received_at: dt.datetime
    state: str = Field(description="received, processed, failed or duplicate.")
    patient_id: str | None = Field(
        default=None, description="The patient the message is about (its ordering key).")
    duplicate_of: int | None = None
    replay_of: int | None = Field(
        default=None, description="The message this one was stored again from.")
    processed_at: dt.datetime | None = None
    content_pruned: bool = False


class MessageDetail(MessageSummary):
    """A stored message's metadata, its outcome and the messages linked to it."""

    origin: str | None = Field(default=None, description="File and offset it was read from.")
    content_sha256: str
    dedup_key: str
    occurrence: int
    error: str | None = None
    summary: Any = Field(default=None, description="Outcome counts written by processing.")
    content_pruned_at: dt.datetime | None = None
    content_archive: str | None = None
    replays: list[int] = Field(default_factory=list,
                               description="Messages stored again from this one.")
    work_item_ids: list[int] = Field(default_factory=list)


class RawContent(BaseModel):
    """The stored bytes of a message: as text when they are UTF-8, else base64."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "message_id": 1203, "encoding": "text", "content_sha256": "9f2c...",
        "size": 214, "content": "MSH|^~\\&|CHGSYS|SENDFAC|...",
    }]})

    message_id: int
    encoding: Literal["text", "base64"]
    content_sha256: str
    size: int = Field(description="Length in bytes.")
    content: str


class PatientRecord(BaseModel):
    patient_id: str
    mrn: str | None = None
    family_name: str | None = None
    given_name: str | None = None
    birth_date: dt.date | None = None
    gender: str | None = None
    source_message_id: int
    updated_message_id: int


class EncounterRecord(BaseModel):
    encounter_id: str
    patient_id: str
    encounter_class: str | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    code: str | None = None
    code_system: str | None = None
    department: str | None = None
    source_message_id: int
    updated_message_id: int


class ServiceRecord(BaseModel):
    id: int
    service_key: str
    origin: str
    kind: str
    code_system: str | None = None
    code: str | None = None
    quantity: Decimal | None = None
    service_date: dt.date | None = None
    patient_id: str | None = None
    encounter_id: str | None = None
    outcome: str = Field(description="charged, work_item, duplicate or waiting.")
    work_item_id: int | None = None


class ChargeLineRecord(BaseModel):
    id: int
    service_id: int
    service_key: str
    charge_code: str
    revenue_code: str
    hcpcs: str | None = None
    units: Decimal
    unit_price: Decimal
    amount: Decimal
    currency: str
    service_date: dt.date
    department: str
    gl_account: str
    chargemaster_version: str
    journal_id: int | None = None


class SupplyUsageRecord(BaseModel):
    id: int
    usage_key: str
    code_system: str | None = None
    code: str | None = None
    quantity: Decimal | None = None
    outcome: str
    work_item_id: int | None = None


class SupplyIssueRecord(BaseModel):
    id: int
    usage_id: int
    item_code: str
    quantity: Decimal
    unit_cost: Decimal
    total_cost: Decimal
    currency: str
    service_date: dt.date
    department: str
    journal_id: int | None = None


class WorkItemRef(BaseModel):
    id: int
    reason: str
    team: str
    status: str


class DeliveryRef(BaseModel):
    id: int
    destination: str
    kind: str
    record_id: int
    state: str
    replay_of: int | None = None


class Lineage(BaseModel):
    """Everything derived from one message, and what it was delivered as."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "message_id": 1203, "state": "processed", "replay_of": None, "replays": [],
        "duplicates": [], "patients": [], "encounters": [],
        "services": [{"id": 88, "service_key": "hl7:SENDFAC:TXN0011", "origin": "clinical",
                      "kind": "procedure", "code_system": "CPT", "code": "99213",
                      "quantity": "1", "service_date": "2024-05-01",
                      "patient_id": "MRN0011", "encounter_id": "VIS0011",
                      "outcome": "charged", "work_item_id": None}],
        "charge_lines": [], "supply_usages": [], "supply_issues": [],
        "journal_ids": [12], "work_items": [], "deliveries": [],
    }]})

    message_id: int
    state: str
    replay_of: int | None = None
    replays: list[int]
    duplicates: list[int] = Field(description="Messages recorded as copies of this one "
                                  "(the first 100).")
    patients: list[PatientRecord]
    encounters: list[EncounterRecord]
    services: list[ServiceRecord]
    charge_lines: list[ChargeLineRecord]
    supply_usages: list[SupplyUsageRecord]
    supply_issues: list[SupplyIssueRecord]
    journal_ids: list[int] = Field(description="Journals with a line from this message.")
    work_items: list[WorkItemRef]
    deliveries: list[DeliveryRef] = Field(
        description="Deliveries of the journals in journal_ids.")


class ReplayAccepted(BaseModel):
    """A message stored again; workers process it like any received message."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"message_id": 1610, "replay_of": 1203, "state": "received"},
    ]})

    message_id: int
    replay_of: int
    state: str
