"""The FHIR R4 REST routes: metadata, create, update, read, vread, search, Bundles."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from carebridge.api.app import operation_outcome
from carebridge.api.deps import ApiError, context, require
from carebridge.api.fhir import bundles, examples
from carebridge.api.fhir.capability import capability_statement
from carebridge.api.fhir.interactions import Result, create, find, read, update
from carebridge.api.fhir.repository import Criteria, parse_criteria
from carebridge.api.fhir.resources import (
    FHIR_JSON,
    ResourceType,
    check_content_type,
    check_id,
    dump_json,
    etag,
    http_date,
    parse_etag,
    read_body,
)
from carebridge.api.fhir.validation import (
    expect_type,
    unknown_element_policy,
    validate,
    validate_bundle,
)
from carebridge.api.security import Principal, Scope

router = APIRouter(prefix="/fhir", tags=["fhir"])

Writer = Annotated[Principal, Depends(require(Scope.FHIR_WRITE))]
Reader = Annotated[Principal, Depends(require(Scope.FHIR_READ))]
TypeParam = Annotated[ResourceType, Path(alias="type", description="The resource type.")]
IdParam = Annotated[str, Path(alias="id", description="The logical id.",
                              pattern=r"^[A-Za-z0-9\-.]{1,64}$")]


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _respond(result: Result, request: Request, prefer: str | None = None) -> Response:
    headers = {"ETag": etag(result.version_id),
               "Last-Modified": http_date(result.last_updated)}
    if result.status == 201:
        headers["Location"] = (f"{_base(request)}/{result.resource_type}/"
                               f"{result.resource_id}/_history/{result.version_id}")
    minimal = prefer is not None and "return=minimal" in prefer.replace(" ", "")
    return Response(b"" if minimal else result.content, status_code=result.status,
                    media_type=FHIR_JSON, headers=headers)


async def _resource_body(request: Request) -> dict[str, Any]:
    check_content_type(request.headers.get("content-type"))
    return read_body(await request.body())


@router.get(
    "/metadata", summary="The CapabilityStatement (no credentials needed).",
    response_class=Response,
    responses={200: {"description": "What this server supports.",
                     "content": examples.fhir_content({"resourceType": "CapabilityStatement"})}},
)
def metadata(request: Request) -> Response:
    return Response(dump_json(capability_statement(_base(request))), media_type=FHIR_JSON)


_BUNDLE_DOC = """Process a transaction or batch Bundle. Scope: `fhir:write`.

A transaction is all or nothing, in one database transaction. References to
an entry's `fullUrl` are rewritten to the new `Type/id`. A `urn:uuid:` full
URL becomes the new id unless a stored resource of that type has that id. A
batch runs each entry on its own and reports each outcome. Entries may `POST` (with `ifNoneExist`)
or `PUT` (with `ifMatch`) any R4 resource type."""


@router.post(
    "", summary="Process a transaction or batch Bundle.", description=_BUNDLE_DOC,
    response_class=Response,
    openapi_extra=examples.request_body({"transaction": examples.TRANSACTION},
                                        examples.BUNDLE),
    responses={200: {"description": "A transaction-response or batch-response Bundle.",
                     "content": examples.fhir_content(examples.TRANSACTION_RESPONSE)},
               409: examples.write_responses({})[409], 412: examples.write_responses({})[412],
               **examples.ERRORS},
)
async def process_bundle(request: Request, principal: Writer) -> Response:
    check_content_type(request.headers.get("content-type"))
    raw = await request.body()
    document = read_body(raw)
    ctx = context(request)
    policy = unknown_element_policy(ctx.config.api, principal)
    return await run_in_threadpool(_bundle, ctx.engine, principal, document, raw, policy)


router.add_api_route("/", process_bundle, methods=["POST"], include_in_schema=False)


def _bundle(engine: Any, principal: Principal, document: dict[str, Any], raw: bytes,
            policy: str) -> Response:
    expect_type(document, "Bundle", "Bundle")
    kind = document.get("type")
    if kind == "transaction":
        validate_bundle(document, raw, policy, principal)
        entries = bundles.read_entries(document)
        outcomes: list[Any] = bundles.transaction(engine, principal, entries)
    elif kind == "batch":
        envelope = {**document, "entry": [
            {key: value for key, value in entry.items() if key != "resource"}
            for entry in document.get("entry") or [] if isinstance(entry, dict)
        ]}
        validate(envelope, "Bundle", policy, principal)
        outcomes = bundles.batch(engine, principal, document, policy)
    else:
        raise ApiError(400, "invalid", f"Bundle.type {kind!r} cannot be posted here; send a "
                       "transaction or batch", location="Bundle.type")
    response = {
        "resourceType": "Bundle",
        "type": f"{kind}-response",
        "entry": [bundles.response_entry(outcome, _outcome) for outcome in outcomes],
    }
    return Response(dump_json(response), media_type=FHIR_JSON)


def _outcome(error: ApiError) -> dict[str, Any]:
    return operation_outcome(error.status, error.message, error.location)


@router.post(
    "/{type}", summary="Create a resource.",
    description=(
        "Create a resource with a server-assigned id. Scope: `fhir:write`. With "
        "`If-None-Exist` (e.g. `identifier=urn:example:mrn|12345`) an existing match is "
        "returned with 200 instead; concurrent identical requests create one resource."
    ),
    response_class=Response,
    openapi_extra=examples.request_body({"procedure": examples.PROCEDURE,
                                         "preauthorization": examples.CLAIM}),
    responses=examples.write_responses(examples.STORED_PROCEDURE),
)
async def create_resource(
    request: Request, resource_type: TypeParam, principal: Writer,
    if_none_exist: Annotated[str | None, Header(
        description="Conditional create criteria: `identifier` and `_id`.")] = None,
    prefer: Annotated[str | None, Header(
        description="`return=minimal` for an empty body.")] = None,
) -> Response:
    resource = await _resource_body(request)
    ctx = context(request)
    policy = unknown_element_policy(ctx.config.api, principal)
    criteria = (parse_criteria(if_none_exist, resource_type.value, "If-None-Exist")
                if if_none_exist else None)

    def run() -> Result:
        expect_type(resource, resource_type.value, resource_type.value)
        validate(resource, resource_type.value, policy, principal)
        return create(ctx.engine, principal, resource_type.value, resource, criteria)

    return _respond(await run_in_threadpool(run), request, prefer)


@router.put(
    "/{type}/{id}", summary="Update a resource, or create it with this id.",
    description=(
        "Store a new version. Scope: `fhir:write`. The body's `id` must equal the URL's. "
        "With `If-Match: W/\"n\"` the update applies only if version n is current (412 "
        "otherwise). An unknown id creates the resource (201)."
    ),
    response_class=Response,
    openapi_extra=examples.request_body({"procedure": examples.STORED_PROCEDURE}),
    responses=examples.write_responses(examples.STORED_PROCEDURE),
)
async def update_resource(
    request: Request, resource_type: TypeParam, resource_id: IdParam, principal: Writer,
    if_match: Annotated[str | None, Header(description='The version, W/"n".')] = None,
    prefer: Annotated[str | None, Header(
        description="`return=minimal` for an empty body.")] = None,
) -> Response:
    resource = await _resource_body(request)
    ctx = context(request)
    policy = unknown_element_policy(ctx.config.api, principal)
    version = parse_etag(if_match, "If-Match") if if_match else None
    type_name = resource_type.value

    def run() -> Result:
        expect_type(resource, type_name, type_name)
        if resource.get("id") != resource_id:
            raise ApiError(400, "invalid", f"the body's id {resource.get('id')!r} differs "
                           f"from the URL's {resource_id!r}", location=f"{type_name}.id")
        validate(resource, type_name, policy, principal)
        return update(ctx.engine, principal, type_name, resource_id, resource, version)

    return _respond(await run_in_threadpool(run), request, prefer)


@router.get(
    "/{type}/{id}", summary="Read the current version of a resource.",
    description="Scope: `fhir:read`. Each read is written to the audit log.",
    response_class=Response, responses=examples.read_responses(examples.STORED_PROCEDURE),
)
def read_resource(request: Request, resource_type: TypeParam, resource_id: IdParam,
                  principal: Reader) -> Response:
    check_id(resource_id, "id")
    engine = context(request).engine
    return _respond(read(engine, principal, resource_type.value, resource_id), request)


@router.get(
    "/{type}/{id}/_history/{vid}", summary="Read one version of a resource (vread).",
    description="Scope: `fhir:read`. Each read is written to the audit log.",
    response_class=Response, responses=examples.read_responses(examples.STORED_PROCEDURE),
)
def read_version(request: Request, resource_type: TypeParam, resource_id: IdParam,
                 version_id: Annotated[int, Path(alias="vid", ge=1, le=2**31 - 1,
                                                 description="The versionId.")],
                 principal: Reader) -> Response:
    engine = context(request).engine
    result = read(engine, principal, resource_type.value, resource_id, version_id)
    return _respond(result, request)


@router.get(
    "/{type}", summary="Search current resources by _id or identifier.",
    description=(
        "Scope: `fhir:read`. Returns a searchset Bundle. `identifier` takes "
        "`system|value`, `|value` or `value`. Without parameters, lists the type. "
        "Other parameters are ignored, as FHIR allows; each search is audited."
    ),
    response_class=Response,
    responses={200: {"description": "A searchset Bundle.",
                     "content": examples.fhir_content(examples.SEARCHSET)},
               **examples.ERRORS},
)
def search_resources(
    request: Request, resource_type: TypeParam, principal: Reader,
    resource_id: Annotated[str | None, Query(alias="_id", max_length=64)] = None,
    identifier: Annotated[str | None, Query(max_length=400)] = None,
    count: Annotated[int, Query(alias="_count", ge=1, le=500)] = 50,
) -> Response:
    pairs = [(name, value) for name, value in (("_id", resource_id),
                                               ("identifier", identifier)) if value]
    criteria = Criteria(tuple(sorted(pairs))) if pairs else None
    engine = context(request).engine
    found = find(engine, principal, resource_type.value, criteria, count)
    base = _base(request)
    entries = b",".join(
        b'{"fullUrl":' + dump_json(f"{base}/{stored.resource_type}/{stored.resource_id}")
        + b',"resource":' + stored.content.encode("utf-8")
        + b',"search":{"mode":"match"}}'
        for stored in found
    )
    body = (b'{"resourceType":"Bundle","type":"searchset","total":'
            + str(len(found)).encode() + b',"entry":[' + entries + b"]}")
    return Response(body, media_type=FHIR_JSON)
