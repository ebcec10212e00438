"""Turn files into raw messages: find them, tell their format, split them.

Nothing here parses content beyond what splitting needs. Each
:class:`RawInput` is stored verbatim before any mapping happens.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from carebridge.errors import InputError
from carebridge.ingest.files.csvrows import read_csv_records
from carebridge.ingest.files.synthea import number_occurrences
from carebridge.ingest.hl7v2.framing import split_file

log = logging.getLogger(__name__)

HL7V2 = "hl7v2"
FHIR_JSON = "fhir-json"
SYNTHEA_CSV = "synthea-csv"
UNKNOWN = "unknown"

SYNTHEA_SKIPPED = (
    "allergies", "careplans", "claims", "claims_transactions", "conditions",
    "devices", "imaging_studies", "medications", "observations", "organizations",
    "payer_transitions", "payers", "providers",
)
"""Synthea CSV exports with no finance event carebridge posts yet; a folder
scan lists them as skipped instead of storing them."""

SYNTHEA_KINDS = ("patients", "encounters", "procedures", "immunizations", "supplies")
"""Synthea CSV exports carebridge ingests, in the order that keeps references
resolvable: patients before encounters before what happens in them."""

_MLLP_START = b"\x0b"
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class RawInput:
    """One raw message cut from a file, not yet stored.

    ``format`` is ``hl7v2``, ``fhir-json`` or ``synthea-csv:{kind}``;
    ``origin`` is the file path with the line or byte offset of the message.
    ``problem`` is set when the bytes cannot be a message at all (a short CSV
    row, bytes outside a frame); such input is still stored, then failed.
    ``occurrence`` numbers rows of one CSV file that describe the same event
    key (Synthea writes two identical rows for two identical supply uses), so
    that the second is a second event, not a resend. ``dedup_digest`` is the
    hash that decides whether a message under a known dedup key is a resend;
    for HL7 v2 it ignores the segment-terminator style. ``ordering_key`` is
    the patient the message is about, when a cheap look finds one.
    """

    format: str
    origin: str
    raw: bytes
    content_sha256: str
    dedup_key: str
    problem: str | None = None
    occurrence: int = 1
    dedup_digest: str = ""
    ordering_key: str | None = None

    def __post_init__(self) -> None:
        if not self.dedup_digest:
            object.__setattr__(self, "dedup_digest", self.content_sha256)
        # Keys come from message content, so a sender can make them any
        # length; past the column's size they are replaced by their hash,
        # which keeps them distinct and stable for deduplication.
        object.__setattr__(self, "dedup_key", bounded(self.dedup_key, 300))
        object.__setattr__(self, "ordering_key", bounded(self.ordering_key, 200))
        object.__setattr__(self, "origin", self.origin[-500:])


def bounded(value: str | None, limit: int) -> str | None:
    """Return ``value``, or ``sha256:`` and its hash when longer than ``limit``."""
    if value is None or len(value) <= limit:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()


def sha256(data: bytes) -> str:
    """Return the hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def hl7_content_digest(payload: bytes) -> str:
    """Return the SHA-256 of an HL7 v2 message with CR segment terminators.

    A resend that only changed LF or CRLF terminators into CR (or back) is the
    same message. The rule matches the parser's: without any CR, LF ends a
    segment; otherwise only a LF directly after a CR is dropped.
    """
    if b"\r" in payload:
        normalised = payload.replace(b"\r\n", b"\r")
    else:
        normalised = payload.replace(b"\n", b"\r")
    return sha256(normalised.rstrip(b"\r"))


def hl7_dedup_key(payload: bytes, digest: str) -> str:
    """Return the transport dedup key (MSH-3, MSH-4, MSH-10) of an HL7 message.

    Only the MSH segment is read. A message without a control id falls back
    to its content hash, so identical resends are still recognised.
    """
    first = payload.split(b"\r", 1)[0].split(b"\n", 1)[0]
    if not first.startswith(b"MSH") or len(first) < 4:
        return f"hl7v2|sha256:{digest}"
    fields = first.split(first[3:4])
    sending_app = fields[2] if len(fields) > 2 else b""
    sending_facility = fields[3] if len(fields) > 3 else b""
    control_id = fields[9] if len(fields) > 9 else b""
    if not control_id.strip():
        return f"hl7v2|sha256:{digest}"
    component = fields[1][:1] if len(fields) > 1 and fields[1] else b"^"
    parts = [
        sending_app.split(component)[0],
        sending_facility.split(component)[0],
        control_id,
    ]
    return "hl7v2|" + "|".join(p.decode("latin-1").strip() for p in parts)


def hl7_ordering_key(payload: bytes) -> str | None:
    """Return PID-3.1 of the first PID segment, read without a full parse."""
    first = payload[:4]
    if not first.startswith(b"MSH") or len(payload) < 8:
        return None
    separator = payload[3:4]
    component = payload[4:5]
    repetition = payload[5:6]
    for segment in payload.replace(b"\n", b"\r").split(b"\r"):
        if segment[:4] == b"PID" + separator:
            fields = segment.split(separator)
            if len(fields) > 3 and fields[3]:
                value = fields[3].split(repetition)[0].split(component)[0]
                return value.decode("latin-1").strip() or None
            return None
    return None


def fhir_ordering_key(data: bytes) -> str | None:
    """Return the id of the patient a FHIR resource or bundle is about."""
    try:
        document = json.loads(data)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    resources = [document]
    if document.get("resourceType") == "Bundle":
        resources = [
            entry.get("resource") or {}
            for entry in document.get("entry") or []
            if isinstance(entry, dict)
        ]
    for resource in resources:
        if isinstance(resource, dict) and resource.get("resourceType") == "Patient":
            return resource.get("id")
    for resource in resources:
        for element in ("subject", "patient"):
            reference = resource.get(element) if isinstance(resource, dict) else None
            if isinstance(reference, dict) and isinstance(reference.get("reference"), str):
                return reference["reference"].rsplit("/", 1)[-1].removeprefix("urn:uuid:")
    return None


def detect_format(path: Path, head: bytes) -> str | None:
    """Return the format of the file at ``path`` from its name and first bytes."""
    body = head[len(_BOM) :] if head.startswith(_BOM) else head
    body = body.lstrip(b" \t\r\n")
    suffix = path.suffix.lower()
    if suffix == ".json" or body.startswith(b"{"):
        return FHIR_JSON
    if suffix == ".csv" and path.stem.lower() in SYNTHEA_KINDS:
        return f"{SYNTHEA_CSV}:{path.stem.lower()}"
    if body.startswith((b"MSH", b"FHS", b"BHS", _MLLP_START)):
        return HL7V2
    return None


def split_hl7(path: Path, data: bytes) -> Iterator[RawInput]:
    """Yield each HL7 v2 message of a file, and one input per framing problem."""
    result = split_file(data)
    for message in result.messages:
        digest = sha256(message.payload)
        yield RawInput(
            format=HL7V2,
            origin=f"{path}@{message.offset}",
            raw=message.payload,
            content_sha256=digest,
            dedup_key=hl7_dedup_key(message.payload, digest),
            dedup_digest=hl7_content_digest(message.payload),
            ordering_key=hl7_ordering_key(message.payload),
        )
    if result.problems:
        log.warning(
            "framing problems in file",
            extra={"action": "ingest_framing_problem", "file": str(path),
                   "problems": len(result.problems)},
        )
        # The whole file is stored once with its problems, so that bytes no
        # message claimed are kept for a person to inspect and replay.
        digest = sha256(data)
        yield RawInput(
            format=HL7V2,
            origin=str(path),
            raw=data,
            content_sha256=digest,
            dedup_key=f"hl7v2-file|sha256:{digest}",
            problem="; ".join(result.problems),
        )


def split_csv(path: Path, data: bytes, kind: str) -> Iterator[RawInput]:
    """Yield each data row of a Synthea CSV export as a raw message."""
    table = read_csv_records(data, source=str(path))
    occurrences = number_occurrences(kind, (record.fields for record in table.records))
    for record, occurrence in zip(table.records, occurrences, strict=True):
        digest = sha256(record.raw)
        suffix = f"#{occurrence}" if occurrence > 1 else ""
        yield RawInput(
            format=f"{SYNTHEA_CSV}:{kind}",
            origin=f"{path}:{record.line}",
            raw=record.raw,
            content_sha256=digest,
            dedup_key=f"{SYNTHEA_CSV}:{kind}|sha256:{digest}{suffix}",
            problem=record.error,
            occurrence=occurrence,
            ordering_key=_csv_patient(kind, record.fields),
        )


def _csv_patient(kind: str, fields: dict[str, str] | None) -> str | None:
    if not fields:
        return None
    return (fields.get("Id") if kind == "patients" else fields.get("PATIENT")) or None


def split_path(path: Path) -> Iterator[RawInput]:
    """Yield the raw messages of one file.

    A file that is empty or whose format is not recognised is yielded whole,
    with the problem, so that it is stored and becomes a work item rather than
    stopping the run.
    """
    data = path.read_bytes()
    fmt = detect_format(path, data[:64])
    if fmt is None or not data.strip():
        digest = sha256(data)
        problem = (
            f"{path}: file is empty" if not data.strip() else
            f"{path}: format not recognised; expected an HL7 v2 message starting "
            "with MSH, FHS, BHS or an MLLP frame, FHIR JSON, or a Synthea CSV "
            f"export named one of {', '.join(SYNTHEA_KINDS)}"
        )
        yield RawInput(UNKNOWN, str(path), data, digest, f"{UNKNOWN}|sha256:{digest}",
                       problem=problem)
        return
    if fmt == HL7V2:
        yield from split_hl7(path, data)
    elif fmt == FHIR_JSON:
        digest = sha256(data)
        yield RawInput(
            FHIR_JSON,
            str(path),
            data,
            digest,
            f"{FHIR_JSON}|sha256:{digest}",
            ordering_key=fhir_ordering_key(data),
        )
    else:
        yield from split_csv(path, data, fmt.split(":", 1)[1])


_SUFFIXES = {".hl7", ".csv", ".json"}


def _order(path: Path) -> tuple[int, str]:
    stem = path.stem.lower()
    if path.suffix.lower() == ".csv" and stem in SYNTHEA_KINDS:
        return (0, f"{SYNTHEA_KINDS.index(stem)}")
    if path.suffix.lower() == ".json":
        return (2, str(path))
    return (1, str(path))


@dataclass(frozen=True, slots=True)
class Discovery:
    """The files a run ingests, in processing order, and those it skipped."""

    files: list[Path]
    skipped: list[tuple[Path, str]]


def discover(paths: Iterable[Path]) -> Discovery:
    """Expand folders into the files carebridge ingests, in processing order.

    Synthea CSV exports come first (patients before encounters before
    services), then HL7 v2 files, then FHIR bundles. Files within a group are
    sorted by path so that a run is repeatable. A file named on the command
    line is always ingested; in a folder, files with other suffixes and
    Synthea exports without finance events are skipped and listed.
    """
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            for candidate in sorted(path.rglob("*")):
                if not candidate.is_file() or candidate.name.startswith("."):
                    continue
                reason = _skip_reason(candidate)
                if reason:
                    skipped.append((candidate, reason))
                else:
                    found.append(candidate)
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return Discovery(sorted(found, key=_order), skipped)


def _skip_reason(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        return f"suffix {suffix or '(none)'} is not ingested from folders (.hl7, .csv, .json)"
    if suffix == ".csv" and path.stem.lower() in SYNTHEA_SKIPPED:
        return "Synthea export without finance events"
    return None
