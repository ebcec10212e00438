"""Validate 837 interchanges: pyx12 against the implementation guide, then the
checks pyx12 does not make.

pyx12 checks structure, required elements, code values and dates. It does
not check that the claim total (CLM02) equals the sum of the line charges
(SV102 on an 837P, SV203 on an 837I). Nor does it check NPI check digits or
that the billing provider's ZIP code is a ZIP+4. :func:`check_claim_text`
adds those checks and reads the interchange text itself, not the data it was
built from.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from decimal import Decimal, InvalidOperation
from typing import Any, Self

import pyx12.map_if
import pyx12.params
import pyx12.x12n_document

from carebridge.claims.build837 import ClaimDraft, build_837
from carebridge.claims.x12 import COMPONENT, ELEMENT, SEGMENT, X12DataError
from carebridge.config.schema import BillingFile
from carebridge.model.identifiers import npi_problem, zip_plus_4_valid

# pyx12 logs the values of invalid elements (birth dates, names) at ERROR.
# Claim data is PHI, so pyx12's logger passes CRITICAL records only.
logging.getLogger("pyx12").setLevel(logging.CRITICAL)

log = logging.getLogger(__name__)

_load_map_file = pyx12.map_if.load_map_file


@functools.lru_cache(maxsize=8)
def _shared_map(map_file: str, map_path: str | None) -> Any:
    return _load_map_file(map_file, pyx12.params.params(), map_path)


def _cached_map_file(map_file: str, param: Any, map_path: str | None = None) -> Any:
    """Return pyx12's map of ``map_file``, parsed once per process.

    pyx12 parses the implementation guide's XML map again on every
    document. In profiles of the claims step that parse took half of
    pyx12's time. The walk keeps its position in a counter of its own and
    never writes to the map (pyx12 4.0), so one parsed map serves every
    document and thread. carebridge always passes default parameters, which
    is what the cached maps were built with.
    """
    return _shared_map(map_file, map_path)


pyx12.map_if.load_map_file = _cached_map_file


def _errors_in(node: Mapping[str, Any], where: str = "") -> list[str]:
    """Collect the error texts of a pyx12 JSON error tree, with their segment."""
    found = []
    label = where
    if "seg_id" in node:
        label = f"{node['seg_id']} (line {node.get('cur_line')})"
    for error in node.get("errors", []):
        text = f"{label}: {error['err_str']}" if label else error["err_str"]
        found.append(text)
    for key in ("groups", "transactions", "segments", "elements"):
        for child in node.get(key, []):
            found.extend(_errors_in(child, label))
    return found


def _run_pyx12(text: str) -> tuple[bool, dict[str, list[str]]]:
    """Validate ``text``; return pyx12's verdict and the errors per ISA13."""
    report = io.StringIO()
    valid = pyx12.x12n_document.x12n_document(
        pyx12.params.params(), io.StringIO(text), None, None, None, report
    )
    errors: dict[str, list[str]] = {}
    document = json.loads(report.getvalue() or '{"interchanges": []}')
    for interchange in document.get("interchanges", []):
        found = _errors_in(interchange)
        if found:
            errors[str(interchange.get("isa_trn_set_id"))] = found
    return bool(valid), errors


def pyx12_errors(interchanges: Mapping[int, str]) -> dict[int, list[str]]:
    """Validate interchanges with pyx12; return the errors of each that fails.

    The interchanges, keyed by their ISA13 control number, are validated as
    one stream, because pyx12 parses its implementation-guide XML maps on
    every call and that parse costs far more than a claim. An interchange
    with errors is validated again on its own, so that one broken
    interchange cannot be blamed on its neighbours.
    """
    if not interchanges:
        return {}
    ordered = sorted(interchanges.items(), key=lambda item: (_version_of(item[1]), item[0]))
    valid, errors = _run_pyx12("".join(text for _, text in ordered))
    if valid and not errors:
        return {}
    suspects = {int(key) for key in errors} if errors else set(interchanges)
    failed: dict[int, list[str]] = {}
    for control in sorted(suspects & set(interchanges)):
        alone_valid, alone = _run_pyx12(interchanges[control])
        messages = [m for found in alone.values() for m in found]
        if not alone_valid and not messages:
            messages = ["pyx12 rejected the interchange without naming an error"]
        if messages:
            failed[control] = messages
    return failed


Drafts = Sequence[tuple[int, ClaimDraft, Decimal]]
"""Claims to build: each claim's id (its ISA13), draft and the sum of the
charge lines it covers."""


def build_and_validate(
    drafts: Drafts, billing: BillingFile, created_at: dt.datetime
) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Build each draft's 837 and check it: first :func:`check_claim_text`, then pyx12.

    Returns:
        The X12 text of each claim that passed, and the problems of the rest,
        both keyed by claim id.
    """
    texts: dict[int, str] = {}
    problems: dict[int, list[str]] = {}
    for claim_id, draft, expected_total in drafts:
        try:
            text = build_837(draft, billing, claim_id, created_at)
        except X12DataError as exc:
            problems[claim_id] = [str(exc)]
            continue
        found = check_claim_text(text, expected_total)
        if found:
            problems[claim_id] = found
        else:
            texts[claim_id] = text
    for claim_id, errors in pyx12_errors(texts).items():
        problems[claim_id] = [f"pyx12: {error}" for error in errors]
        texts.pop(claim_id)
    return texts, problems


PARENT_CHECK_SECONDS = 1.0
"""How often a pool process checks that the process that started it is alive."""


def _exit_with_parent(parent: int) -> None:
    """Start a thread that ends this pool process once ``parent`` has died.

    A pool process waits on a queue whose write end it also has open, so it
    would wait forever after a SIGKILL of its parent. An orphan is adopted
    by another process, which changes its parent id. The parent's id is
    passed in, because the parent may die while this process still starts.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        log.warning("claim validation process stopping: its parent is gone",
                    extra={"action": "validation_pool_orphaned", "parent_pid": parent})
        os._exit(1)

    threading.Thread(target=watch, name="validation-parent-watch", daemon=True).start()


class ValidationPool:
    """A pool of child processes that build and validate batches of claims.

    pyx12 takes about 3 ms a claim, all of it pure Python, so one process
    validates at most a few hundred claims a second. A pool of child
    processes lets a large backlog use every core, and lets the caller
    read the next batch while this one is built and validated. With
    ``processes`` below 2 every batch is handled in the calling process.

    Children are started with ``spawn``: a server forks nothing while its
    other threads may hold locks. Each child exits by itself when its parent
    is gone, so a worker killed with SIGKILL leaves no processes behind.
    """

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._executor: ProcessPoolExecutor | None = None
        if processes > 1:
            self._executor = ProcessPoolExecutor(
                max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_exit_with_parent, initargs=(os.getpid(),))
            log.info("claim validation pool started",
                     extra={"action": "validation_pool_start", "processes": processes})

    def submit(
        self, drafts: Drafts, billing: BillingFile, created_at: dt.datetime
    ) -> Callable[[], tuple[dict[int, str], dict[int, list[str]]]]:
        """Start :func:`build_and_validate` on ``drafts``; return a call that waits for it."""
        if self._executor is None or len(drafts) < 2:
            done = build_and_validate(drafts, billing, created_at)
            return lambda: done
        size = -(-len(drafts) // self.processes)
        futures = [
            self._executor.submit(build_and_validate, list(drafts[start:start + size]),
                                  billing, created_at)
            for start in range(0, len(drafts), size)
        ]

        def wait() -> tuple[dict[int, str], dict[int, list[str]]]:
            texts: dict[int, str] = {}
            problems: dict[int, list[str]] = {}
            for future in futures:
                built, found = future.result()
                texts.update(built)
                problems.update(found)
            return texts, problems

        return wait

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
            log.info("claim validation pool stopped",
                     extra={"action": "validation_pool_stop", "processes": self.processes})

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _version_of(text: str) -> str:
    # GS08 is the last element of the second segment.
    segments = text.split(SEGMENT, 2)
    return segments[1].rsplit(ELEMENT, 1)[-1] if len(segments) > 1 else ""


def _segments(text: str) -> list[list[str]]:
    return [seg.strip().split(ELEMENT) for seg in text.split(SEGMENT) if seg.strip()]


def _decimal(value: str, where: str, problems: list[str]) -> Decimal | None:
    try:
        return Decimal(value)
    except InvalidOperation:
        problems.append(f"{where} {value!r} is not a number")
        return None


def claim_amounts(text: str) -> tuple[Decimal | None, list[Decimal]]:
    """Return CLM02 and the line charges (SV102 or SV203) of a one-claim interchange."""
    problems: list[str] = []
    total = None
    lines: list[Decimal] = []
    for elements in _segments(text):
        name = elements[0]
        if name == "CLM" and len(elements) > 2:
            total = _decimal(elements[2], "CLM02", problems)
        elif name == "SV1" and len(elements) > 2:
            amount = _decimal(elements[2], "SV102", problems)
            lines.extend([amount] if amount is not None else [])
        elif name == "SV2" and len(elements) > 3:
            amount = _decimal(elements[3], "SV203", problems)
            lines.extend([amount] if amount is not None else [])
    return total, lines


def check_claim_text(text: str, expected_total: Decimal | None = None) -> list[str]:
    """Return what is wrong with a one-claim 837 beyond pyx12's checks.

    * CLM02 equals the sum of the line charges, compared as decimals;
    * CLM02 equals ``expected_total`` (the sum of the encounter's charge
      lines) when given;
    * every NPI (an NM1 whose NM108 is ``XX``) has a valid check digit;
    * the billing provider's N4 (after NM1*85) has a 9-digit ZIP+4 code.
    """
    problems: list[str] = []
    segments = _segments(text)
    total, lines = claim_amounts(text)
    if total is None:
        problems.append("no CLM02 claim total")
    elif total != sum(lines, Decimal(0)):
        problems.append(
            f"claim total CLM02 {total:.2f} differs from the sum of its {len(lines)} "
            f"line charges {sum(lines, Decimal(0)):.2f}"
        )
    if total is not None and expected_total is not None and total != expected_total:
        problems.append(
            f"claim total CLM02 {total:.2f} differs from the encounter's charge lines "
            f"{expected_total:.2f}"
        )
    problems.extend(_identifier_problems(segments))
    return problems


def _identifier_problems(segments: Iterable[list[str]]) -> list[str]:
    problems = []
    previous_entity = None
    for elements in segments:
        name = elements[0]
        if name == "NM1":
            previous_entity = elements[1] if len(elements) > 1 else None
            if len(elements) > 9 and elements[8] == "XX":
                problem = npi_problem(elements[9])
                if problem:
                    problems.append(f"NM1*{previous_entity}: {problem}")
        elif name == "N4" and previous_entity == "85":
            zip_code = elements[3] if len(elements) > 3 else ""
            if not zip_plus_4_valid(zip_code):
                problems.append(
                    "billing provider ZIP code (N403 after NM1*85) must be ZIP+4, 9 digits"
                )
    return problems


def component(value: str, index: int) -> str:
    """Return component ``index`` (0-based) of a composite element, or ``""``."""
    parts = value.split(COMPONENT)
    return parts[index] if index < len(parts) else ""
