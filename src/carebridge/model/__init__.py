"""Canonical records shared by every layer; imports nothing else of carebridge."""

from carebridge.model.records import (
    NULL,
    CanonicalBatch,
    ChargeLine,
    Diagnosis,
    Encounter,
    Guarantor,
    Null,
    Patient,
    Service,
    ServiceKind,
    SupplyIssue,
    SupplyUse,
    TransactionType,
)

__all__ = [
    "NULL",
    "CanonicalBatch",
    "ChargeLine",
    "Diagnosis",
    "Encounter",
    "Guarantor",
    "Null",
    "Patient",
    "Service",
    "ServiceKind",
    "SupplyIssue",
    "SupplyUse",
    "TransactionType",
]
