"""Validate request resources against FHIR R4B with the caller's unknown-element policy."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from carebridge.api.deps import ApiError
from carebridge.api.fhir.resources import SERVED_TYPES
from carebridge.api.security import Principal
from carebridge.config.model import ApiSettings
from carebridge.errors import ParseError
from carebridge.ingest.fhir.json import parse_fhir_json, validate_resource

logger = logging.getLogger(__name__)


def unknown_element_policy(settings: ApiSettings, principal: Principal) -> str:
    """Return ``"reject"`` or ``"ignore"``: the client's own setting, else the default."""
    return settings.fhir_unknown_elements_by_client.get(
        principal.client_id, settings.fhir_unknown_elements
    )


def validate(resource: dict[str, Any], path: str, policy: str, principal: Principal) -> None:
    """Validate ``resource`` in place; raise a 400 ``ApiError`` located at the bad element.

    Under the ``ignore`` policy unknown elements are deleted from
    ``resource``, so that what is stored and returned is valid FHIR.
    """
    try:
        dropped = validate_resource(resource, path=path, unknown_elements=policy)
    except ParseError as exc:
        raise ApiError(400, "invalid", str(exc), location=exc.location) from None
    if dropped:
        # Element paths only: they name FHIR elements, never their values.
        logger.info(
            "unknown FHIR elements ignored",
            extra={"action": "fhir_unknown_ignored", "client_id": principal.client_id,
                   "elements": len(dropped)},
        )


def expect_type(resource: dict[str, Any], expected: str, path: str) -> None:
    """Raise 400 unless ``resource`` is of type ``expected``."""
    actual = resource.get("resourceType")
    if actual != expected:
        raise ApiError(400, "invalid", f"resourceType is {actual!r}; this URL takes "
                       f"{expected}", location=f"{path}.resourceType")


PARALLEL_MIN_ENTRIES = 64
"""Bundles with at least this many entries are validated in worker processes."""

_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()
_parallel = True


def validate_in_this_process() -> None:
    """Validate every Bundle in the calling process, never in worker processes.

    An API that runs in several processes calls this, because its processes
    already spread the requests over the cores.
    """
    global _parallel
    _parallel = False


def preload_models() -> None:
    """Import the models of ``Bundle`` and of the served resource types now, not on first use."""
    for resource_type in ("Bundle", *sorted(SERVED_TYPES)):
        get_fhir_model_class(resource_type)


def _start_validation_process() -> None:
    """Import the common FHIR models, then exempt them from garbage collection.

    Validating a large Bundle allocates enough objects to start several full
    collections, and each would walk every model class again.
    """
    preload_models()
    gc.collect()
    gc.freeze()


def _validation_pool() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # spawn, not fork: forking a process that runs server threads can
            # copy a lock another thread holds, and the child would hang on it.
            _pool = ProcessPoolExecutor(max_workers=os.cpu_count() or 1,
                                        mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_validation_process)
        return _pool


def _validate_entries(raw: bytes, start: int, stop: int) -> tuple[str, str | None] | None:
    """Validate entries ``start`` to ``stop`` of a Bundle; return the first error, if any.

    Runs in a worker process, so it receives the request bytes (cheap to
    send) and parses them again, rather than the parsed document.
    """
    entries = parse_fhir_json(raw).get("entry") or []
    for index in range(start, stop):
        resource = entries[index].get("resource")
        if not isinstance(resource, dict):
            continue
        try:
            validate_resource(resource, path=f"Bundle.entry[{index}].resource")
        except ParseError as exc:
            return str(exc), exc.location
    return None


def validate_bundle(bundle: dict[str, Any], raw: bytes, policy: str,
                    principal: Principal) -> None:
    """Validate a transaction Bundle with its entries, spread over CPU cores when large.

    fhir.resources validation is CPU-bound Python, so one process validates
    on one core whatever the number of threads. So a large Bundle under the
    ``reject`` policy is split into one slice of entries per core, and each
    slice is validated in a worker process. The first error in entry order
    is raised.
    """
    entries = bundle.get("entry")
    cores = os.cpu_count() or 1
    if (not _parallel or policy != "reject" or cores < 2 or not isinstance(entries, list)
            or len(entries) < PARALLEL_MIN_ENTRIES
            or not all(isinstance(entry, dict) for entry in entries)):
        validate(bundle, "Bundle", policy, principal)
        return
    envelope = {**bundle, "entry": [
        {key: value for key, value in entry.items() if key != "resource"}
        for entry in entries
    ]}
    validate(envelope, "Bundle", policy, principal)
    size = -(-len(entries) // cores)
    pool = _validation_pool()
    futures = [pool.submit(_validate_entries, raw, start, min(start + size, len(entries)))
               for start in range(0, len(entries), size)]
    for future in futures:
        error = future.result()
        if error is not None:
            raise ApiError(400, "invalid", error[0], location=error[1])
