"""Master-data routes: the chargemaster and its versions, crosswalks, supply items.

The chargemaster, crosswalks and item master are those of the loaded
configuration; versions used by earlier postings are read from the charge
lines that name them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from carebridge.api.deps import context, require
from carebridge.api.ops.common import Limit, Page, page, problems, text_query
from carebridge.api.security import Principal, Scope
from carebridge.store.schema import charge_lines

router = APIRouter(prefix="/master-data", tags=["master data"])

Scoped = Annotated[Principal, Depends(require(Scope.MASTER_DATA_READ))]
KeyCursor = Annotated[str | None, text_query(
    "The `next_cursor` of the previous page: the key after which this page starts.")]


class ChargemasterVersionInfo(BaseModel):
    """A chargemaster version: the one in force, or one that earlier charges name."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "version_id": "oshpd-106361458-cdm-2018", "current": True,
        "effective_from": "2019-01-01", "checksum": "sha256:974f2e...", "items": 5454,
        "charge_lines": 397, "first_service_date": "2010-03-14",
        "last_service_date": "2024-11-02",
    }]})

    version_id: str
    current: bool
    effective_from: dt.date | None = None
    checksum: str | None = None
    items: int | None = Field(default=None, description="Items, for the current version.")
    charge_lines: int = Field(description="Charge lines priced with this version.")
    first_service_date: dt.date | None = None
    last_service_date: dt.date | None = None


class ChargemasterItem(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "charge_code": "2806553", "description": "XR CHEST 2 VIEWS", "price": "412.00",
        "revenue_code": "0324", "hcpcs": "71046", "modifiers": [], "hcpcs_units": 1,
        "department": None, "origin": "oshpd-ca_106361458_CDM_2018.csv:3012",
    }]})

    charge_code: str
    description: str
    price: Decimal
    revenue_code: str | None = None
    hcpcs: str | None = Field(default=None, description="CPT/HCPCS code.")
    modifiers: list[str]
    hcpcs_units: int
    department: str | None = None
    origin: str = Field(description="File and line the item was loaded from.")


class CrosswalkEntry(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"source_system": "CPT", "source_code": "71046", "charge_code": "2806553"}]})

    source_system: str
    source_code: str
    charge_code: str


class SupplyItemEntry(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "system": "SNOMED", "code": "337388004", "item_code": "SUP-100231",
        "description": "Blood glucose test strip", "unit_cost": "0.32",
        "chargeable": False, "charge_code": None, "implant": False,
    }]})

    system: str
    code: str
    item_code: str
    description: str
    unit_cost: Decimal
    chargeable: bool
    charge_code: str | None = None
    implant: bool


def _page_of(request: Request, entries: Iterable[tuple[str, dict[str, Any]]],
             keep: Callable[[dict[str, Any]], bool], cursor: str | None,
             limit: int) -> dict[str, Any]:
    """Page ``(key, item)`` pairs in key order after ``cursor``, keeping what ``keep`` accepts."""
    items: list[dict[str, Any]] = []
    last = None
    for key, item in sorted(entries, key=lambda pair: pair[0]):
        if cursor is not None and key <= cursor:
            continue
        if not keep(item):
            continue
        if len(items) == limit:
            return page(request, items, last)
        items.append(item)
        last = key
    return page(request, items, None)


@router.get(
    "/chargemaster/versions", response_model=list[ChargemasterVersionInfo],
    responses=problems(), summary="List chargemaster versions",
    description=(
        "Scope: `masterdata:read`. The version in force first, then every version "
        "that stored charge lines were priced with."
    ),
)
def chargemaster_versions(request: Request, principal: Scoped) -> Any:
    ctx = context(request)
    current = ctx.config.chargemaster_version
    with ctx.engine.connect() as conn:
        used = conn.execute(
            select(charge_lines.c.chargemaster_version, func.count(),
                   func.min(charge_lines.c.service_date), func.max(charge_lines.c.service_date))
            .group_by(charge_lines.c.chargemaster_version)
            .order_by(charge_lines.c.chargemaster_version)
        ).all()
    stats = {row[0]: row for row in used}
    versions = [{
        "version_id": current.version_id, "current": True,
        "effective_from": current.effective_from, "checksum": current.checksum,
        "items": len(ctx.config.chargemaster),
        "charge_lines": stats[current.version_id][1] if current.version_id in stats else 0,
        "first_service_date": stats[current.version_id][2] if current.version_id in stats
        else None,
        "last_service_date": stats[current.version_id][3] if current.version_id in stats
        else None,
    }]
    for version_id, count, first, last in used:
        if version_id != current.version_id:
            versions.append({"version_id": version_id, "current": False,
                             "charge_lines": count, "first_service_date": first,
                             "last_service_date": last})
    return versions


@router.get(
    "/chargemaster/items", response_model=Page[ChargemasterItem], responses=problems(),
    summary="Search the chargemaster in force",
    description=(
        "Scope: `masterdata:read`. Ordered by charge code. `code`, `cpt` and "
        "`revenue_code` match exactly; `description` matches a part, ignoring case."
    ),
)
def chargemaster_items(
    request: Request, principal: Scoped, limit: Limit = 50, cursor: KeyCursor = None,
    code: Annotated[str | None, text_query("Charge code.", 60)] = None,
    cpt: Annotated[str | None, text_query("CPT/HCPCS code.", 20)] = None,
    revenue_code: Annotated[str | None, Query(
        pattern=r"^[0-9]{4}$", description="4-digit UB-04 revenue code.")] = None,
    description: Annotated[str | None, text_query("Part of the description.", 100)] = None,
) -> Any:
    fragment = description.casefold() if description else None

    def keep(item: dict[str, Any]) -> bool:
        return ((code is None or item["charge_code"] == code)
                and (cpt is None or item["hcpcs"] == cpt)
                and (revenue_code is None or item["revenue_code"] == revenue_code)
                and (fragment is None or fragment in item["description"].casefold()))

    entries = (
        (item.charge_code, {
            "charge_code": item.charge_code, "description": item.description,
            "price": item.price, "revenue_code": item.revenue_code, "hcpcs": item.hcpcs,
            "modifiers": list(item.modifiers), "hcpcs_units": item.hcpcs_units,
            "department": item.department, "origin": item.origin,
        })
        for item in context(request).config.chargemaster.values()
    )
    return _page_of(request, entries, keep, cursor, limit)


@router.get(
    "/crosswalks", response_model=Page[CrosswalkEntry], responses=problems(),
    summary="List crosswalk entries",
    description=(
        "Scope: `masterdata:read`. Source codes (SNOMED, CVX, CPT, HCPCS) and the "
        "charge code each maps to, ordered by system and code."
    ),
)
def crosswalks(
    request: Request, principal: Scoped, limit: Limit = 50, cursor: KeyCursor = None,
    system: Annotated[str | None, text_query("Source code system, e.g. SNOMED.", 20)] = None,
    code: Annotated[str | None, text_query("Source code.", 60)] = None,
    charge_code: Annotated[str | None, text_query("Charge code it maps to.", 60)] = None,
) -> Any:
    def keep(item: dict[str, Any]) -> bool:
        return ((system is None or item["source_system"] == system)
                and (code is None or item["source_code"] == code)
                and (charge_code is None or item["charge_code"] == charge_code))

    entries = (
        (f"{source_system}|{source_code}", {"source_system": source_system,
                                        "source_code": source_code, "charge_code": target})
        for (source_system, source_code), target in context(request).config.crosswalk.items()
    )
    return _page_of(request, entries, keep, cursor, limit)


@router.get(
    "/supply-items", response_model=Page[SupplyItemEntry], responses=problems(),
    summary="List the item master's supplies",
    description="Scope: `masterdata:read`. Ordered by code system and code.",
)
def supply_items(
    request: Request, principal: Scoped, limit: Limit = 50, cursor: KeyCursor = None,
    system: Annotated[str | None, text_query("Code system, e.g. SNOMED.", 20)] = None,
    code: Annotated[str | None, text_query("Supply code.", 60)] = None,
    item_code: Annotated[str | None, text_query("Item-master code.", 60)] = None,
    chargeable: Annotated[bool | None, Query(description="Only chargeable (true) or "
                                             "not chargeable (false) items.")] = None,
) -> Any:
    def keep(item: dict[str, Any]) -> bool:
        return ((system is None or item["system"] == system)
                and (code is None or item["code"] == code)
                and (item_code is None or item["item_code"] == item_code)
                and (chargeable is None or item["chargeable"] == chargeable))

    entries = (
        (f"{key_system}|{key_code}", {
            "system": key_system, "code": key_code, "item_code": item.item_code,
            "description": item.description, "unit_cost": item.unit_cost,
            "chargeable": item.chargeable, "charge_code": item.charge_code,
            "implant": item.implant,
        })
        for (key_system, key_code), item in context(request).config.supply_items.items()
    )
    return _page_of(request, entries, keep, cursor, limit)
