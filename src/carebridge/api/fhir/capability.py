"""The server's CapabilityStatement (``GET /fhir/metadata``)."""

from __future__ import annotations

from typing import Any

from carebridge import __version__
from carebridge.api.fhir.repository import SEARCH_PARAMETERS
from carebridge.api.fhir.resources import FHIR_JSON, ResourceType

_SEARCH_TYPES = {
    "_id": ("token", "The resource id."),
    "identifier": ("token", "Resource.identifier as system|value, |value or value."),
}

CAPABILITY_DATE = "2025-01-01"
"""The date the statement was last changed by hand; FHIR requires one."""


def capability_statement(base_url: str) -> dict[str, Any]:
    """Describe what ``/fhir`` supports, for clients that read it before they write."""
    search_params = [
        {"name": name, "type": _SEARCH_TYPES[name][0], "documentation": _SEARCH_TYPES[name][1]}
        for name in SEARCH_PARAMETERS
    ]
    resources = [
        {
            "type": resource_type.value,
            "interaction": [{"code": code} for code in
                            ("read", "vread", "update", "create", "search-type")],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "searchParam": search_params,
        }
        for resource_type in ResourceType
    ]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": CAPABILITY_DATE,
        "publisher": "carebridge",
        "kind": "instance",
        "software": {"name": "carebridge", "version": __version__},
        "implementation": {"description": "carebridge FHIR R4 intake", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON, "json"],
        "rest": [{
            "mode": "server",
            "documentation": (
                "Creates and updates are stored and processed into charges, supply "
                "issues and work items. Transaction and batch Bundles may carry any "
                "R4 resource type; the types listed here also have their own routes."
            ),
            "security": {
                "service": [{
                    "coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "OAuth",
                    }],
                }],
                "description": (
                    "Send a bearer token from POST /oauth/token (OAuth2 client "
                    "credentials) or an X-API-Key header. Reads need the fhir:read "
                    "scope, creates, updates and Bundles fhir:write."
                ),
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
        }],
    }
