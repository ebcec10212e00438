"""Parse and validate FHIR JSON without losing decimal precision.

FHIR decimals are "rational numbers with implicit precision": ``135.50`` and
``135.5`` are equal in value but differ in precision, and the specification
forbids reading them as IEEE floats. :func:`load_fhir_json` therefore parses
JSON numbers with a fraction or exponent as :class:`decimal.Decimal`, so a
value keeps its lexical scale (``Decimal("135.50")``).

Each resource is then validated against the ``fhir.resources`` R4B models
(package ``fhir.resources`` 8.3). R4B is the closest release the package
ships to R4 (4.0.1), and R4 and R4B share the resources carebridge maps.
None of the 1,651 resources in the four bundled Synthea R4 bundles fails R4B
validation, so no R4/R4B exception is handled here.

Validation errors become :class:`~carebridge.errors.ParseError` whose
``location`` is a FHIR element path such as ``Claim.item[0].unitPrice.value``,
or ``Bundle.entry[3].resource.item[0].unitPrice.value`` inside a bundle.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import typing
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import ValidationError

from carebridge.errors import ParseError

logger = logging.getLogger(__name__)


def _reject_constant(name: str) -> Any:
    raise ParseError(f"invalid JSON number {name}: FHIR decimals must be finite")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys, which would silently replace
    # an amount; RFC 8259 leaves duplicates undefined, so reject them.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ParseError(f"duplicate JSON property {key!r}")
        result[key] = value
    return result


def parse_fhir_json(raw: bytes) -> dict[str, Any]:
    """Parse FHIR JSON bytes, reading non-integer numbers as ``Decimal``.

    Args:
        raw: the document, UTF-8 (a byte-order mark is accepted).

    Returns:
        The resource as nested dicts and lists.

    Raises:
        ParseError: invalid JSON, a duplicate property, ``NaN`` or
            ``Infinity``, or a top level that is not an object with a
            ``resourceType``.
    """
    try:
        document = json.loads(
            raw,
            parse_float=Decimal,
            parse_constant=_reject_constant,
            object_pairs_hook=_object_without_duplicates,
        )
    except json.JSONDecodeError as exc:
        raise ParseError(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ParseError(f"FHIR JSON is not valid UTF-8: {exc}") from exc
    if not isinstance(document, dict):
        raise ParseError("FHIR JSON must be an object with a resourceType")
    resource_type = document.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise ParseError("missing resourceType", location="resourceType")
    return document


def load_fhir_json(raw: bytes, *, validate: bool = True) -> dict[str, Any]:
    """Parse FHIR JSON and validate every resource in it against FHIR R4B.

    A Bundle is validated entry by entry, so an error names the entry.

    Args:
        raw: the document.
        validate: set ``False`` to skip model validation (parsing still keeps
            decimals and rejects malformed JSON).

    Returns:
        The parsed document; decimals are ``Decimal`` with their lexical scale.

    Raises:
        ParseError: invalid JSON or an invalid resource; ``location`` is the
            FHIR element path of the first error.
    """
    document = parse_fhir_json(raw)
    if validate:
        validate_resource(document, path=document["resourceType"])
    return document


def validate_resource(
    resource: dict[str, Any], *, path: str, unknown_elements: str = "reject"
) -> list[str]:
    """Validate one resource (a Bundle with all its entries) against FHIR R4B.

    Besides the model rules, a decimal, integer or boolean element must be a
    JSON number or boolean. FHIR JSON forbids strings there, but the
    ``fhir.resources`` models accept ``"135.50"``.

    Args:
        resource: a resource as returned by :func:`parse_fhir_json`.
        path: the element path of ``resource`` used in error locations, e.g.
            ``Claim`` or ``Bundle.entry[2].resource``.
        unknown_elements: ``"reject"`` raises on an element that FHIR R4B
            does not define; ``"ignore"`` deletes such elements from
            ``resource`` in place and validates the rest.

    Returns:
        The element paths deleted under ``"ignore"`` (empty otherwise).

    Raises:
        ParseError: the first invalid element, located by its element path.
    """
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise ParseError("missing resourceType", location=f"{path}.resourceType")
    if resource_type == "Bundle":
        return _validate_bundle(resource, path, unknown_elements)
    try:
        model_class = get_fhir_model_class(resource_type)
    except (KeyError, ValueError) as exc:
        raise ParseError(
            f"unknown FHIR resource type {resource_type!r}",
            location=f"{path}.resourceType",
        ) from exc
    dropped: list[str] = []
    model = _validate_model(model_class, resource, path, resource_type,
                            unknown_elements, dropped)
    _check_json_primitives(model, resource, path, resource_type)
    return dropped


def _validate_bundle(bundle: dict[str, Any], path: str, unknown_elements: str) -> list[str]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise ParseError("Bundle.entry must be an array", location=f"{path}.entry")
    # Validate the envelope without the entry resources (Bundle.entry.resource
    # is optional), then each resource with its own model. This names the
    # failing entry, and on the 472-entry Synthea bundle it took 0.13 s against
    # 0.39 s for Bundle.model_validate (fhir.resources 8.3, one dev container run).
    envelope = dict(bundle)
    envelope["entry"] = [
        {k: v for k, v in entry.items() if k != "resource"}
        if isinstance(entry, dict)
        else entry
        for entry in entries
    ]
    dropped: list[str] = []
    model = _validate_model(Bundle, envelope, path, "Bundle", unknown_elements, dropped)
    _check_json_primitives(model, envelope, path, "Bundle")
    for index, entry in enumerate(entries):
        if isinstance(entry, dict):
            # Elements dropped from the envelope copy are dropped from the entry too.
            for key in [key for key in entry if key != "resource"]:
                if key not in envelope["entry"][index]:
                    del entry[key]
        resource = entry.get("resource")
        if resource is None:
            continue
        entry_path = f"{path}.entry[{index}].resource"
        if not isinstance(resource, dict):
            raise ParseError("entry resource must be an object", location=entry_path)
        dropped += validate_resource(resource, path=entry_path,
                                     unknown_elements=unknown_elements)
    for key in [key for key in bundle if key not in envelope]:
        del bundle[key]
    return dropped


def _validate_model(
    model_class: type[FHIRAbstractModel],
    resource: dict[str, Any],
    path: str,
    resource_type: str,
    unknown_elements: str = "reject",
    dropped: list[str] | None = None,
) -> FHIRAbstractModel:
    while True:
        try:
            return model_class.model_validate(resource)
        except ValidationError as exc:
            errors = exc.errors()
            unknown = [error for error in errors if error["type"] == "extra_forbidden"]
            if unknown_elements == "ignore" and unknown:
                # Delete every unknown element, then validate again: the
                # remaining errors, if any, are about elements FHIR defines.
                for error in unknown:
                    _delete_element(resource, error["loc"])
                    if dropped is not None:
                        dropped.append(element_path(path, error["loc"]))
                continue
            first = unknown[0] if unknown else errors[0]
            location = element_path(path, first["loc"])
            count = exc.error_count()
            more = f" (and {count - 1} more errors)" if count > 1 else ""
            if first["type"] == "extra_forbidden":
                raise ParseError(
                    f"unknown element {first['loc'][-1]!r}: FHIR R4 {resource_type} "
                    f"does not define it{more}",
                    location=location,
                ) from exc
            message = first["msg"].removeprefix("Value error, ").rstrip(".")
            raise ParseError(
                f"invalid {resource_type}: {message}; value {first.get('input')!r}{more}",
                location=location,
            ) from exc


def _delete_element(resource: Any, loc: Sequence[str | int]) -> None:
    """Delete the element at pydantic location ``loc`` from the nested dicts."""
    parent = resource
    for part in loc[:-1]:
        try:
            parent = parent[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(parent, dict):
        parent.pop(loc[-1], None)


def element_path(base: str, loc: Sequence[str | int]) -> str:
    """Join a pydantic error location to ``base`` as a FHIR element path.

    ``("item", 0, "unitPrice", "value")`` under ``Claim`` gives
    ``Claim.item[0].unitPrice.value``.
    """
    path = base
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part and part != "__root__":
            path += f".{part}"
    return path


_TEXT_TYPES = frozenset({str, dt.date, dt.datetime, dt.time, type(None)})
"""Python types of the FHIR primitives that JSON writes as strings."""


def _leaf_types(annotation: Any) -> Iterator[Any]:
    """Yield the types inside ``annotation``, looking through Optional, List and Annotated."""
    if typing.get_origin(annotation) is typing.Annotated:
        yield from _leaf_types(typing.get_args(annotation)[0])
        return
    arguments = typing.get_args(annotation)
    if not arguments:
        yield annotation
        return
    for argument in arguments:
        yield from _leaf_types(argument)


@functools.cache
def _elements_to_check(model_class: type[FHIRAbstractModel]) -> dict[str, str]:
    """Map the JSON name to the field name of each element that may contain a number.

    Only elements typed as strings, dates and times are left out. Complex
    elements stay in, because a number may sit anywhere inside them.
    """
    return {
        field.alias or name: name
        for name, field in model_class.model_fields.items()
        if not all(leaf in _TEXT_TYPES for leaf in _leaf_types(field.annotation))
    }


def _check_json_primitives(
    model: FHIRAbstractModel, raw: dict[str, Any], path: str, resource_type: str
) -> None:
    """Reject strings sent where the model contains a decimal, integer or boolean.

    The validated model tells which elements are numeric or boolean, so the
    raw JSON value is compared with the model value element by element. Only
    the elements present in ``raw`` are read, and elements that can only
    contain text are skipped.
    """
    elements = _elements_to_check(type(model))
    for alias, raw_value in raw.items():
        name = elements.get(alias)
        if name is None:
            continue
        value = getattr(model, name)
        element = f"{path}.{alias}"
        if isinstance(value, list) and isinstance(raw_value, list):
            for index, (item, raw_item) in enumerate(
                zip(value, raw_value, strict=False)
            ):
                _check_value(item, raw_item, f"{element}[{index}]", resource_type)
        else:
            _check_value(value, raw_value, element, resource_type)


def _check_value(value: Any, raw_value: Any, element: str, resource_type: str) -> None:
    if isinstance(value, FHIRAbstractModel) and isinstance(raw_value, dict):
        _check_json_primitives(value, raw_value, element, resource_type)
        return
    if isinstance(value, bool | int | Decimal) and isinstance(raw_value, str):
        json_type = "boolean" if isinstance(value, bool) else "number"
        raise ParseError(
            f"invalid {resource_type}: expected a JSON {json_type}, "
            f"got string {raw_value!r}",
            location=element,
        )
