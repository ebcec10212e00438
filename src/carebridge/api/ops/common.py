"""Shared parts of the operations routes: pages, cursors, error responses, parameter types.

Every list route pages by keyset: it returns at most ``limit`` items and,
when more may follow, a ``next`` link that repeats the query with a
``cursor`` naming the last item returned. Every cursor the schema admits is
a valid position, so a request is never rejected for its cursor: lists by
id take the last id, the work queue its own sort key, master data the last
key.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

MAX_ID = 2**31 - 1
"""Largest id a route accepts: ids are 32-bit integers on PostgreSQL."""

# Printable text only: PostgreSQL rejects NUL in text parameters, and no
# id, code or name carebridge stores contains control characters.
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]+$"

BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
"""Well-formed base64 (RFC 4648 alphabet, padded), without line breaks."""


class Problem(BaseModel):
    """An error response: a short code, a message for the caller, and the parameter at fault."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": "not-found", "detail": "message 42 not found"},
        {"error": "invalid", "detail": "query.limit: Input should be less than or equal "
         "to 500", "location": "query.limit"},
    ]})

    error: str
    detail: str
    location: str | None = None


def problems(*statuses: int, **described: str) -> dict[int | str, dict[str, Any]]:
    """Build the ``responses=`` of a route: 401, 403, 422 and 429 plus ``statuses``.

    ``described`` maps ``s404="..."`` style keys to a description of that status.
    """
    texts = {
        401: "No credentials, or they are invalid or expired.",
        403: "The client's roles do not grant the scope this route needs.",
        404: "No such record, or it belongs to a team the caller may not see.",
        409: "The record is not in a state that allows this action.",
        410: "The content was pruned by retention; the message names the archive.",
        422: "A path, query or body value is invalid; `location` names it.",
        429: "The client is over its rate limit.",
    }
    for key, text in described.items():
        texts[int(key.removeprefix("s"))] = text
    declared = sorted({401, 403, 422, 429, *statuses})
    return {status: {"model": Problem, "description": texts[status]} for status in declared}


class Page(BaseModel, Generic[T]):
    """One page of a list. ``next`` is the link to the following page, absent on the last."""

    items: list[T]
    next: str | None = Field(
        default=None, description="URL of the next page; absent when this is the last page."
    )
    next_cursor: str | None = Field(
        default=None, description="The `cursor` value of the next page."
    )


Limit = Annotated[int, Query(ge=1, le=500, description="Items per page (1 to 500).")]
IdCursor = Annotated[
    int | None,
    Query(ge=1, le=MAX_ID, description="The `next_cursor` of the previous page."),
]
"""The cursor of lists ordered by id, newest first: the next page contains smaller ids."""


def id_path(description: str) -> Any:
    """A path parameter that is a positive 32-bit id."""
    return Path(ge=1, le=MAX_ID, description=description)


def text_query(description: str, max_length: int = 200) -> Any:
    """An optional query parameter of printable text."""
    return Query(min_length=1, max_length=max_length,
                 pattern=TEXT_PATTERN, description=description)


def next_link(request: Request, cursor: str) -> str:
    """Return the URL of this request with ``cursor`` replaced."""
    return str(request.url.include_query_params(cursor=cursor))


def page(request: Request, items: list[Any], cursor: str | int | None) -> dict[str, Any]:
    """Build a page; ``cursor`` is where the next page starts, ``None`` on the last page."""
    if cursor is None:
        return {"items": items}
    return {"items": items, "next": next_link(request, str(cursor)),
            "next_cursor": str(cursor)}


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """Return ``value`` in UTC; a naive value is taken as UTC (as SQLite returns it).

    An instant that cannot be shown in UTC (the first or last day of the
    calendar with an offset) becomes the earliest or latest UTC datetime,
    so a filter with it keeps its meaning.
    """
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        edge = dt.datetime.min if value.year < 5000 else dt.datetime.max
        return edge.replace(tzinfo=dt.UTC)


def parse_json(text: str | None) -> Any:
    """Return the JSON value stored in a text column, or the text itself if it is not JSON."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def like_escape(value: str) -> str:
    """Escape ``%``, ``_`` and ``\\`` so that ``value`` matches literally in LIKE (escape ``\\``)."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
