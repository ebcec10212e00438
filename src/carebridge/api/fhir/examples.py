"""Request and response examples and shared response descriptions for the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from carebridge.api.fhir.resources import FHIR_JSON

PROCEDURE = {
    "resourceType": "Procedure",
    "status": "completed",
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "430193006",
                         "display": "Medication reconciliation (procedure)"}]},
    "subject": {"reference": "Patient/example-patient"},
    "encounter": {"reference": "Encounter/example-encounter"},
    "performedPeriod": {"start": "2024-05-01T09:00:00+00:00",
                        "end": "2024-05-01T09:15:00+00:00"},
}

CLAIM = {
    "resourceType": "Claim",
    "status": "active",
    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type",
                         "code": "professional"}]},
    "use": "preauthorization",
    "patient": {"reference": "Patient/example-patient"},
    "created": "2024-05-01",
    "provider": {"reference": "Organization/example-organization"},
    "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority",
                             "code": "normal"}]},
    "insurance": [{"sequence": 1, "focal": True,
                   "coverage": {"reference": "Coverage/example-coverage"}}],
    "item": [{"sequence": 1,
              "productOrService": {"coding": [{"system": "http://www.ama-assn.org/go/cpt",
                                               "code": "99213"}]},
              "unitPrice": {"value": 135.50, "currency": "USD"}}],
}

STORED_PROCEDURE = {
    **PROCEDURE,
    "id": "5d1f0c8e-2f2b-4d7e-9c1e-0b6f5a3e9c11",
    "meta": {"versionId": "1", "lastUpdated": "2024-05-01T09:20:00.000Z"},
}

TRANSACTION = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {"fullUrl": "urn:uuid:0f5a2b1c-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient", "name": [{"family": "Example"}]},
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": "identifier=urn:example:mrn|12345"}},
        {"fullUrl": "urn:uuid:0f5a2b1c-0000-4000-8000-000000000002",
         "resource": {"resourceType": "Encounter", "status": "finished",
                      "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                "code": "AMB"},
                      "subject": {"reference": "urn:uuid:0f5a2b1c-0000-4000-8000-000000000001"}},
         "request": {"method": "POST", "url": "Encounter"}},
    ],
}

TRANSACTION_RESPONSE = {
    "resourceType": "Bundle",
    "type": "transaction-response",
    "entry": [
        {"response": {"status": "201 Created",
                      "location": "Patient/0f5a2b1c-0000-4000-8000-000000000001/_history/1",
                      "etag": 'W/"1"', "lastModified": "2024-05-01T09:20:00.000Z"}},
        {"response": {"status": "201 Created",
                      "location": "Encounter/0f5a2b1c-0000-4000-8000-000000000002/_history/1",
                      "etag": 'W/"1"', "lastModified": "2024-05-01T09:20:00.000Z"}},
    ],
}

SEARCHSET = {
    "resourceType": "Bundle",
    "type": "searchset",
    "total": 1,
    "entry": [{"fullUrl": "http://127.0.0.1:8080/fhir/Procedure/"
                          "5d1f0c8e-2f2b-4d7e-9c1e-0b6f5a3e9c11",
               "resource": STORED_PROCEDURE, "search": {"mode": "match"}}],
}

UNKNOWN_ELEMENT = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "invalid",
               "diagnostics": "Patient.foo: unknown element 'foo': FHIR R4 Patient does "
                              "not define it",
               "expression": ["Patient.foo"]}],
}

_OBJECT = {"type": "object", "additionalProperties": True}


def fhir_content(example: dict[str, Any]) -> dict[str, Any]:
    return {FHIR_JSON: {"schema": _OBJECT, "example": example}}


_RESOURCE = {
    "type": "object", "additionalProperties": True, "required": ["resourceType"],
    "properties": {"resourceType": {"type": "string", "pattern": "^[A-Z][A-Za-z]+$"}},
}
"""The part of a resource's structure JSON Schema can state; the R4 models check the rest."""

BUNDLE = {
    "type": "object", "additionalProperties": True, "required": ["resourceType", "type"],
    "properties": {
        "resourceType": {"type": "string", "enum": ["Bundle"]},
        "type": {"type": "string", "enum": ["transaction", "batch"]},
        "entry": {"type": "array", "items": {"type": "object"}},
    },
}


def request_body(examples: dict[str, dict[str, Any]],
                 schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build an ``openapi_extra`` request body of FHIR JSON (or plain JSON) with examples."""
    content = {"schema": schema or _RESOURCE,
               "examples": {name: {"value": value} for name, value in examples.items()}}
    return {"requestBody": {"required": True,
                            "content": {FHIR_JSON: content, "application/json": content}}}


_VERSION_HEADERS = {
    "ETag": {"description": 'The version as a weak ETag, W/"<versionId>".',
             "schema": {"type": "string"}},
    "Last-Modified": {"description": "meta.lastUpdated as an HTTP date.",
                      "schema": {"type": "string"}},
}
_LOCATION_HEADER = {
    "Location": {"description": "[base]/{type}/{id}/_history/{versionId}",
                 "schema": {"type": "string"}},
}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": fhir_content(UNKNOWN_ELEMENT)}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _problem("Invalid FHIR: an OperationOutcome whose issue.expression names the "
                  "element."),
    401: _problem("No valid credentials."),
    403: _problem("The client's roles lack the scope."),
    413: _problem("The body is larger than api.max_request_bytes."),
    415: _problem("The body is not application/fhir+json or application/json."),
    422: _problem("A path, query or header parameter is invalid."),
    429: _problem("The client is over its rate limit."),
}


def write_responses(example: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": "Updated, or the conditional create's match.",
              "content": fhir_content(example), "headers": _VERSION_HEADERS},
        201: {"description": "Created.", "content": fhir_content(example),
              "headers": {**_VERSION_HEADERS, **_LOCATION_HEADER}},
        409: _problem("Concurrent requests kept changing the resource; send it again."),
        412: _problem("If-Match names another version, or If-None-Exist matches more "
                      "than one resource."),
        **ERRORS,
    }


def read_responses(example: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": "The resource.", "content": fhir_content(example),
              "headers": _VERSION_HEADERS},
        404: _problem("No such resource or version."),
        **ERRORS,
    }
