"""Generate a large load of realistic messages by cloning the bundled public data.

Each *clone* is one copy of the bundled Synthea CSV export (11 patients with
their encounters, procedures, immunizations and supplies) and of the public
HL7 v2 samples. Every identifier that makes an event distinct is rewritten
from the seed and the clone number:

* Synthea patient and encounter ids become other UUIDs, everywhere they
  appear (``Id``, ``PATIENT``, ``ENCOUNTER``; inside FHIR bundles too);
* in HL7 v2, the first component of MSH-10 (control id), PID-2, PID-3,
  PID-18 (account), PV1-19 (visit number) and FT1-2 (transaction id) get a
  suffix naming the clone.

Codes, dates, quantities and amounts stay as they are, so a clone prices,
fails and duplicates exactly as the bundled data does in ``carebridge demo``:
the same share of charges, ``unknown_code`` work items and reused control
ids. Ids map the same way within a clone, so references between messages
(a procedure to its encounter, a DFT to its patient) still resolve.

The output folder is what ``carebridge ingest`` reads: ``csv/cNNNNN/`` holds
one clone's Synthea files, ``hl7v2/cNNNNN/`` its HL7 files, and, when asked
for, ``fhir/cNNNNN/`` its FHIR bundles. A summary goes to ``.loadgen.json``
(hidden, so that ingesting the folder skips it). Generation streams one
clone at a time and is deterministic for a given seed and message count.

Run ``python -m carebridge.demo.loadgen OUT --messages 100000 --seed 1``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from carebridge.ingest.files.sources import FHIR_JSON, HL7V2, SYNTHEA_CSV, split_path

DATA = Path(str(resources.files("carebridge").joinpath("demo", "data")))
CSV_KINDS = ("patients", "encounters", "procedures", "immunizations", "supplies")
"""Synthea files in the order ``carebridge ingest`` stores them, so that a
prefix of a clone never refers to an encounter it does not contain."""

_UUID = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
_LINE_BREAK = re.compile(r"(\r\n|\r|\n)")
# Segment start after optional MLLP start/end bytes and a UTF-8 BOM read as latin-1.
_SEGMENT = re.compile(r"^([\x0b\x1c\xef\xbb\xbf]*)(MSH|PID|PV1|FT1)(.)", re.DOTALL)
_HL7_ID_FIELDS = {"MSH": (9,), "PID": (2, 3, 18), "PV1": (19,), "FT1": (2,)}
"""Fields whose first component is an event or patient identifier. For MSH
the index counts MSH-2 as 1, because MSH-1 is the separator itself."""


class Template:
    """Text split into literal parts and identifier slots.

    ``parts`` alternates literal text (even positions) and original
    identifiers (odd positions), so a clone is the parts joined with each
    identifier passed through the clone's mapping.
    """

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[str] = [""]

    def literal(self, text: str) -> None:
        """Append text that every clone keeps."""
        self.parts[-1] += text

    def slot(self, identifier: str) -> None:
        """Append an identifier that each clone rewrites."""
        self.parts.append(identifier)
        self.parts.append("")

    def render(self, rewrite: Callable[[str], str]) -> str:
        """Return the text with every identifier rewritten."""
        parts = self.parts[:]
        for index in range(1, len(parts), 2):
            parts[index] = rewrite(parts[index])
        return "".join(parts)


def _uuid_template(text: str, known: frozenset[str]) -> Template:
    template = Template()
    for index, piece in enumerate(_UUID.split(text)):
        if index % 2 and piece in known:
            template.slot(piece)
        else:
            template.literal(piece)
    return template


def _hl7_template(text: str) -> Template:
    """Cut an HL7 v2 file into literals and the identifier fields' first components."""
    template = Template()
    separator, component, repetition = "|", "^", "~"
    for index, segment in enumerate(_LINE_BREAK.split(text)):
        match = _SEGMENT.match(segment) if index % 2 == 0 else None
        if match is None:
            template.literal(segment)
            continue
        seg_id = match.group(2)
        if seg_id == "MSH":
            separator = match.group(3)
            encoding = segment[match.end(3) : match.end(3) + 2]
            component = encoding[:1] or "^"
            repetition = encoding[1:2] or "~"
        fields = segment.split(separator)
        id_fields = _HL7_ID_FIELDS[seg_id]
        for number, value in enumerate(fields):
            if number:
                template.literal(separator)
            if number not in id_fields:
                template.literal(value)
                continue
            for rep_number, rep in enumerate(value.split(repetition)):
                if rep_number:
                    template.literal(repetition)
                first, sep, rest = rep.partition(component)
                if first.strip() and first != '""':
                    template.slot(first)
                else:
                    template.literal(first)
                template.literal(sep + rest)
    return template


@dataclass(slots=True)
class _Unit:
    """One output file of a clone: where it goes and how many messages it holds."""

    folder: str
    name: str
    header: str
    rows: list[Template]
    messages_each: int = 1
    fmt: str = ""


@dataclass(slots=True)
class _Source:
    """The bundled data, cut into templates once."""

    csv: list[_Unit]
    hl7: list[_Unit]
    fhir: list[_Unit]

    def per_clone(self, with_fhir: bool) -> int:
        units = self.csv + self.hl7 + (self.fhir if with_fhir else [])
        return sum(len(unit.rows) * unit.messages_each for unit in units)


def _read_text(path: Path) -> str:
    # latin-1 maps every byte to one character, so bytes survive unchanged.
    return path.read_bytes().decode("latin-1")


def _load_source() -> _Source:
    csv_dir = DATA / "synthea" / "csv"
    known: set[str] = set()
    tables: dict[str, tuple[str, list[str]]] = {}
    for kind in CSV_KINDS:
        lines = _read_text(csv_dir / f"{kind}.csv").splitlines(keepends=True)
        tables[kind] = (lines[0], [line for line in lines[1:] if line.strip()])
    for kind in ("patients", "encounters"):
        known.update(row.split(",", 1)[0] for row in tables[kind][1])
    ids = frozenset(known)
    csv_units = [
        _Unit("csv", f"{kind}.csv", header, [_uuid_template(row, ids) for row in rows],
              fmt=f"{SYNTHEA_CSV}:{kind}")
        for kind, (header, rows) in tables.items()
    ]
    hl7_units = []
    splitter_log = logging.getLogger("carebridge.ingest.files.sources")
    for path in sorted((DATA / "hl7v2").rglob("*.hl7")):
        # Counting the messages of the bundled bad files would log their
        # framing problems on every generation; they are expected here.
        level, splitter_log.level = splitter_log.level, logging.ERROR
        try:
            messages = sum(1 for _ in split_path(path))
        finally:
            splitter_log.setLevel(level)
        name = f"{path.parent.name}__{path.name}"
        hl7_units.append(_Unit("hl7v2", name, "", [_hl7_template(_read_text(path))],
                               messages_each=messages, fmt=HL7V2))
    fhir_units = [
        _Unit("fhir", path.name, "", [_uuid_template(_read_text(path), ids)], fmt=FHIR_JSON)
        for path in sorted((DATA / "synthea" / "fhir").glob("*.json"))
    ]
    return _Source(csv_units, hl7_units, fhir_units)


def _clone_uuid(seed: int, clone: int, original: str) -> str:
    digest = hashlib.blake2b(f"{seed}|{clone}|{original}".encode(), digest_size=16).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:]}"


def _clone_tag(seed: int, clone: int) -> str:
    # The clone number keeps tags unique; the seed part keeps loads of
    # different seeds apart when both go into one database.
    seed_part = hashlib.blake2b(str(seed).encode(), digest_size=3).hexdigest()
    return f"{seed_part}{clone:05d}"


@dataclass(slots=True)
class LoadSummary:
    """What :func:`generate` wrote."""

    folder: str
    messages: int
    seed: int
    clones: int
    files: int
    fhir: bool
    seconds: float
    by_format: dict[str, int] = field(default_factory=dict)


def _plan(source: _Source, messages: int, with_fhir: bool) -> Iterator[tuple[int, list[tuple[_Unit, int]]]]:
    """Yield each clone with the units it writes and how many rows of each.

    Full clones write every row. The last clone writes a prefix of the CSV
    rows in store order, then whole HL7 files (and bundles) that still fit,
    so the total is exactly ``messages``.
    """
    per_clone = source.per_clone(with_fhir)
    full, left = divmod(messages, per_clone)
    units = source.csv + source.hl7 + (source.fhir if with_fhir else [])
    for clone in range(full):
        yield clone, [(unit, len(unit.rows)) for unit in units]
    if not left:
        return
    chosen: list[tuple[_Unit, int]] = []
    for unit in source.csv:
        take = min(left, len(unit.rows))
        if take:
            chosen.append((unit, take))
            left -= take
    for unit in source.hl7 + (source.fhir if with_fhir else []):
        if 0 < unit.messages_each <= left:
            chosen.append((unit, 1))
            left -= unit.messages_each
    if left:
        raise ValueError(f"cannot make exactly {messages} messages from the bundled data")
    yield full, chosen


def generate(out: Path, messages: int, *, seed: int = 1, fhir: bool = False) -> LoadSummary:
    """Write ``messages`` cloned messages under ``out`` and return a summary.

    Args:
        out: folder to write; replaced if it exists.
        messages: exact number of raw messages ``carebridge ingest`` will read.
        seed: selects the fresh identifiers; the same seed and count give
            byte-identical files.
        fhir: also clone the Synthea FHIR bundles. They repeat services the
            CSV rows already carry, so they add duplicates, and at over a
            megabyte each they dominate the bytes read; off by default.
    """
    if messages < 1:
        raise ValueError("messages must be at least 1")
    started = time.perf_counter()
    source = _load_source()
    if out.exists():
        shutil.rmtree(out)
    summary = LoadSummary(folder=str(out), messages=messages, seed=seed, clones=0,
                          files=0, fhir=fhir, seconds=0.0)
    for clone, chosen in _plan(source, messages, fhir):
        uuids: dict[str, str] = {}
        tag = _clone_tag(seed, clone)

        def rewrite_uuid(original: str, clone: int = clone, uuids: dict[str, str] = uuids) -> str:
            new = uuids.get(original)
            if new is None:
                new = uuids[original] = _clone_uuid(seed, clone, original)
            return new

        def rewrite_hl7(original: str, tag: str = tag) -> str:
            return f"{original}-{tag}"

        for unit, rows in chosen:
            folder = out / unit.folder / f"c{clone:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            rewrite = rewrite_hl7 if unit.fmt == HL7V2 else rewrite_uuid
            text = unit.header + "".join(row.render(rewrite) for row in unit.rows[:rows])
            (folder / unit.name).write_bytes(text.encode("latin-1"))
            summary.files += 1
            summary.by_format[unit.fmt] = summary.by_format.get(unit.fmt, 0) + (
                rows * unit.messages_each
            )
        summary.clones += 1
    summary.by_format = dict(sorted(summary.by_format.items()))
    summary.seconds = round(time.perf_counter() - started, 3)
    (out / ".loadgen.json").write_text(json.dumps(asdict(summary), indent=2, sort_keys=True))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m carebridge.demo.loadgen OUT [--messages N] [--seed S]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out", type=Path, help="folder to write (replaced if it exists)")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fhir", action="store_true", help="also clone the FHIR bundles")
    args = parser.parse_args(argv)
    summary = generate(args.out, args.messages, seed=args.seed, fhir=args.fhir)
    json.dump(asdict(summary), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
