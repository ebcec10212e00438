"""Readers for FHIR data types: Reference, dateTime, decimal and CodeableConcept.

Each reader raises :class:`~carebridge.errors.ParseError` located at the FHIR
element path that the caller passes in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from carebridge.errors import ParseError
from carebridge.model.codes import code_system_from


def reference_id(
    reference: dict[str, Any] | None,
    expected_types: Iterable[str],
    full_urls: Mapping[str, tuple[str, str]],
    path: str,
) -> str | None:
    """Resolve a Reference to the id of the resource it points to.

    Returns ``None`` for a missing reference, a contained (``#``) or a
    conditional (``Type?search``) reference, which name no id.

    Raises:
        ParseError: the reference points to a type not in ``expected_types``.
    """
    resolved = resolve_reference(reference, tuple(expected_types), full_urls, path)
    return resolved[1] if resolved else None


def resolve_reference(
    reference: dict[str, Any] | None,
    expected: tuple[str, ...],
    full_urls: Mapping[str, tuple[str, str]],
    path: str,
) -> tuple[str, str] | None:
    """Resolve a Reference to ``(resource type, id)``.

    ``full_urls`` maps each Bundle ``fullUrl`` to its resource type and id. The
    type is ``""`` for a ``urn:uuid:`` reference that is not in the Bundle.
    """
    if not reference or not reference.get("reference"):
        return None
    text = str(reference["reference"])
    if text in full_urls:
        target_type, target_id = full_urls[text]
    elif text.startswith("urn:uuid:"):
        target_type, target_id = "", text.removeprefix("urn:uuid:")
    elif text.startswith("#") or "?" in text:
        return None
    else:
        parts = text.split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        if len(parts) < 2:
            raise ParseError(
                f"invalid reference {text!r}", location=f"{path}.reference"
            )
        target_type, target_id = parts[-2], parts[-1]
    if target_type and target_type not in expected:
        raise ParseError(
            f"reference {text!r} points to {target_type}; "
            f"expected {' or '.join(expected)}",
            location=f"{path}.reference",
        )
    return target_type, target_id


def fhir_datetime(value: Any, path: str) -> dt.datetime | dt.date | None:
    """Read a FHIR dateTime: an aware UTC datetime, a date, or ``None``.

    A value with a time gives a datetime in UTC (FHIR requires the offset when
    a time is present). A full date gives a date. A year or year-month, or a
    missing value, gives ``None``.
    """
    if value is None:
        return None
    text = str(value)
    try:
        if "T" in text:
            moment = dt.datetime.fromisoformat(text)
            if moment.tzinfo is None:
                raise ValueError("time without a UTC offset")
            return moment.astimezone(dt.UTC)
        if len(text) == 10:
            return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise ParseError(f"invalid dateTime {text!r}: {exc}", location=path) from exc
    return None


def as_date(value: dt.datetime | dt.date | None) -> dt.date | None:
    if isinstance(value, dt.datetime):
        return value.date()
    return value


def fhir_decimal(value: Any, path: str) -> Decimal:
    """Return a FHIR decimal element as ``Decimal``, rejecting floats and strings.

    A float means the JSON was parsed without ``parse_float=Decimal`` and its
    precision is already lost, so it is rejected rather than converted.
    """
    if isinstance(value, Decimal) and value.is_finite():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, float):
        raise ParseError(
            f"decimal {value!r} was parsed as a float; parse FHIR JSON with "
            "load_fhir_json so that precision is kept",
            location=path,
        )
    raise ParseError(
        f"invalid decimal {value!r}: expected a JSON number", location=path
    )


def pick_coding(
    concept: dict[str, Any] | None, preferred_system: str | None
) -> tuple[str, str, str | None] | None:
    """Choose one coding of a CodeableConcept: ``(code_system, code, display)``.

    The first coding in ``preferred_system`` wins, then the first in a system
    carebridge recognises, then the first with a code. An unrecognised system
    keeps its URI as the code system. Returns ``None`` if no coding has a code.
    """
    codings = [c for c in (concept or {}).get("coding", []) if c.get("code")]
    if not codings:
        return None
    systems = [code_system_from(c.get("system")) for c in codings]
    index = next(
        (i for i, s in enumerate(systems) if s and s == preferred_system), None
    )
    if index is None:
        index = next((i for i, s in enumerate(systems) if s), 0)
    chosen = codings[index]
    system = systems[index] or str(chosen.get("system") or "")
    display = chosen.get("display") or (concept or {}).get("text")
    return system, str(chosen["code"]), display
