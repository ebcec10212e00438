"""FHIR R4 JSON input: parsing with exact decimals, validation and mapping."""

from carebridge.ingest.fhir.json import (
    load_fhir_json,
    parse_fhir_json,
    validate_resource,
)
from carebridge.ingest.fhir.mapping import claim_amounts, map_fhir

__all__ = [
    "claim_amounts",
    "load_fhir_json",
    "map_fhir",
    "parse_fhir_json",
    "validate_resource",
]
