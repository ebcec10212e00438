"""FHIR resource types served, ids, versions and JSON with exact decimals."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from decimal import Decimal
from enum import StrEnum
from typing import Any

from carebridge.api.deps import ApiError
from carebridge.errors import ParseError
from carebridge.ingest.fhir.json import parse_fhir_json

FHIR_JSON = "application/fhir+json"
ACCEPTED_CONTENT_TYPES = frozenset({
    "application/fhir+json", "application/json", "application/json+fhir",
})
"""Request content types read as FHIR JSON; ``application/json+fhir`` is the
DSTU2 name that older clients still send."""


class ResourceType(StrEnum):
    """The resource types with REST interactions under ``/fhir/{type}``.

    Transaction and batch Bundles may carry any other R4B resource type too:
    those are validated, versioned and stored with the Bundle's message, but
    have no routes of their own.
    """

    PATIENT = "Patient"
    ENCOUNTER = "Encounter"
    PROCEDURE = "Procedure"
    IMMUNIZATION = "Immunization"
    CHARGE_ITEM = "ChargeItem"
    SUPPLY_DELIVERY = "SupplyDelivery"
    SERVICE_REQUEST = "ServiceRequest"
    COVERAGE = "Coverage"
    CLAIM = "Claim"


SERVED_TYPES = frozenset(member.value for member in ResourceType)

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
"""The FHIR R4 ``id`` datatype."""


def check_id(value: str, location: str) -> str:
    """Return ``value`` if it is a valid FHIR id; raise a 400 ``ApiError`` otherwise."""
    if not _ID.fullmatch(value):
        raise ApiError(400, "invalid", f"invalid resource id {value!r}: expected 1 to 64 "
                       "letters, digits, '-' or '.'", location=location)
    return value


def new_id() -> str:
    return str(uuid.uuid4())


def etag(version_id: int) -> str:
    return f'W/"{version_id}"'


def parse_etag(value: str, header: str) -> int:
    """Read the version number of an ETag such as ``W/"3"`` or ``"3"``."""
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise ApiError(400, "invalid", f"invalid {header} {value!r}: expected W/\"<version>\"",
                       location=header)
    return int(text)


def instant(moment: dt.datetime) -> str:
    """Format a FHIR ``instant`` in UTC with millisecond precision."""
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def http_date(moment: dt.datetime) -> str:
    """Format an HTTP date (RFC 9110) for ``Last-Modified``."""
    return moment.astimezone(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def check_content_type(content_type: str | None) -> None:
    """Raise 415 unless the request body is declared as FHIR JSON or JSON."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media and media not in ACCEPTED_CONTENT_TYPES:
        raise ApiError(415, "not-supported", f"unsupported content type {media!r}; send "
                       "application/fhir+json")


def read_body(raw: bytes) -> dict[str, Any]:
    """Parse a request body as FHIR JSON with decimals kept as ``Decimal``."""
    if not raw.strip():
        raise ApiError(400, "invalid", "the request body is empty; send a FHIR resource")
    try:
        return parse_fhir_json(raw)
    except ParseError as exc:
        raise ApiError(400, "invalid", str(exc), location=exc.location) from None


def dump_json(document: Any) -> bytes:
    """Serialise ``document`` to compact UTF-8 JSON, writing each ``Decimal`` as parsed.

    ``json.dumps`` cannot write a Decimal as a number, and converting it to
    float would turn ``135.50`` into ``135.5``. Each Decimal is written as a
    placeholder string holding a random marker, and the placeholders are then
    replaced by the Decimal's own text. A sender cannot forge the marker,
    which is new for every call.
    """
    marker = uuid.uuid4().hex

    def placeholder(value: Any) -> str:
        if isinstance(value, Decimal):
            return f"{marker}{value}"
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    text = json.dumps(document, default=placeholder, ensure_ascii=False,
                      separators=(",", ":"))
    if marker in text:
        # Each part after the first starts with a Decimal's text and the
        # placeholder's closing quote. A regular expression that contains the
        # marker would be compiled again on every call, which split() avoids.
        first, *rest = text.split(f'"{marker}')
        text = first + "".join(part.replace('"', "", 1) for part in rest)
    return text.encode("utf-8")
