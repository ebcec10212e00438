"""Chargemaster (CDM) loaders for the price lists hospitals publish.

Formats, chosen with ``fmt``:

``cms-v3-tall-csv``, ``cms-v3-wide-csv``, ``cms-v3-json``
    The CMS hospital price-transparency files (45 CFR 180.50, template
    v3.0.0). The gross charge is the price. Tall files repeat an item once
    per payer plan; those rows collapse into one item.
``cdm-2019-cpt``
    ``Item No.,Item Description,CPT,Price`` (the OSHPD filing layout).
``cdm-2019-revenue-code``
    ``Service Area,Description,Revenue Code,Patient Pay Charge`` with the
    revenue code inside its label, e.g. ``LABORATORY - ... [0300]``.

Charge codes: the hospital's own code (CMS code type ``CDM`` or ``LOCAL``,
or the item number column) when there is one; otherwise, in CMS files, the
first CPT, HCPCS or NDC code; otherwise a *description code*
``<revenue code>-<SLUG>-<hash>``: the slug keeps the code readable and the
six-hex SHA-1 of the exact description keeps two descriptions that slug alike
apart. The same description under the same revenue code always gets the same
code, so it is stable from one price-list version to the next.

Bad rows never become items and are never dropped silently: each one is a
:class:`ChargemasterRowError` naming the file, the 1-based physical line and
the column. A charge code that appears with two different prices is bad on
every line it appears: which price is right is a question for a person.
Every row read is accounted for::

    rows_read == blank_rows + modifier_rows + collapsed_rows
                 + len(items) + len(errors)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from carebridge.config.model import ChargeItem
from carebridge.errors import ChargemasterRowError, ConfigurationError

FORMATS = (
    "cms-v3-tall-csv",
    "cms-v3-wide-csv",
    "cms-v3-json",
    "cdm-2019-cpt",
    "cdm-2019-revenue-code",
)

_MONEY = re.compile(r"^\(?-?\$?\s*-?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?\)?$")
_HCPCS = re.compile(r"^(\d{4}[0-9A-Z]|[A-Z]\d{4})")
_MODIFIERS = re.compile(r"^(?:[\s-]?[0-9A-Z]{2})+$")
# A trailing multiplier such as "86003 X16" or "88368(4)": units of the code.
_UNITS = re.compile(r"^\s*(?:[Xx](\d+)|\((\d+)\))$")
_REVENUE_LABEL = re.compile(r"\[(\d{3,4})\]\s*$")
_PRICE_COLUMNS = {
    "cms-v3-tall-csv": "standard_charge|gross",
    "cms-v3-wide-csv": "standard_charge|gross",
    "cms-v3-json": "standard_charge|gross",
    "cdm-2019-cpt": "Price",
    "cdm-2019-revenue-code": "Patient Pay Charge",
}
_SLUG_WORDS = {
    "<": " LT ",
    ">": " GT ",
    "=": " EQ ",
    "+": " PLUS ",
    "&": " AND ",
    "%": " PCT ",
}


@dataclass
class ChargemasterLoad:
    """Result of loading one chargemaster file: its items, bad rows and row counts.

    Attributes:
        items: Loaded items, one per charge code, in file order.
        errors: One error per bad row (or per bad item in a tall CMS file).
        rows_read: Data rows after the header, blank ones included.
        blank_rows: Rows with no value in any column; skipped.
        modifier_rows: CMS rows that describe a modifier, not an item.
        collapsed_rows: Rows merged into an earlier item: the other payer
            plans of a tall CMS item, or a repeat with the same price.
    """

    items: list[ChargeItem] = field(default_factory=list)
    errors: list[ChargemasterRowError] = field(default_factory=list)
    rows_read: int = 0
    blank_rows: int = 0
    modifier_rows: int = 0
    collapsed_rows: int = 0


@dataclass
class _Candidate:
    """An item read from one or more rows, before duplicate checks."""

    line: int
    charge_code: str
    description: str
    price: Decimal
    revenue_code: str | None
    hcpcs: str | None
    modifiers: tuple[str, ...] = ()
    units: int = 1


def parse_money(text: str) -> Decimal:
    """Parse a published price such as ``$1,234.00``, ``1,200`` or ``75``.

    Args:
        text: The cell as written.

    Returns:
        The amount as a Decimal, exactly as written (no rounding).

    Raises:
        ValueError: If the text is empty or not an amount.
    """
    cleaned = text.strip()
    if not _MONEY.match(cleaned):
        raise ValueError(f"not an amount: {text!r}")
    negative = cleaned.startswith("(") or "-" in cleaned
    digits = re.sub(r"[^\d.]", "", cleaned)
    try:
        amount = Decimal(digits)
    except InvalidOperation as exc:  # pragma: no cover - the pattern rules it out
        raise ValueError(f"not an amount: {text!r}") from exc
    return -amount if negative else amount


def pad_revenue_code(code: str) -> str:
    """Return a UB-04 revenue code as four digits (CMS examples write ``450``)."""
    code = code.strip()
    return code.zfill(4) if code.isdigit() and len(code) <= 4 else code


def split_hcpcs(cell: str) -> tuple[str, tuple[str, ...], int] | None:
    """Split a CDM code cell into code, modifiers and units.

    ``7311026RT`` gives ``("73110", ("26", "RT"), 1)``; ``86003 X16`` gives
    ``("86003", (), 16)``. Returns ``None`` when the cell does not start with
    a CPT/HCPCS code, so the caller keeps no code rather than a wrong one.
    """
    cell = cell.strip().upper()
    match = _HCPCS.match(cell)
    if not match:
        return None
    code, rest = match.group(1), cell[5:]
    if not rest:
        return code, (), 1
    units = _UNITS.match(rest)
    if units:
        return code, (), int(units.group(1) or units.group(2))
    if _MODIFIERS.match(rest):
        compact = re.sub(r"[\s-]", "", rest)
        return code, tuple(compact[i : i + 2] for i in range(0, len(compact), 2)), 1
    return None


def description_code(revenue_code: str | None, description: str) -> str:
    """Build the stable charge code used when a file carries none.

    Args:
        revenue_code: Four-digit revenue code, if known.
        description: The item description as published.

    Returns:
        ``<revenue code>-<SLUG up to 32 chars>-<6 hex of SHA-1>``.
    """
    exact = " ".join(description.split())
    slug = exact.upper()
    for symbol, word in _SLUG_WORDS.items():
        slug = slug.replace(symbol, word)
    slug = re.sub(r"[^A-Z0-9]+", "-", slug).strip("-")[:32].rstrip("-")
    digest = hashlib.sha1(exact.encode("utf-8")).hexdigest()[:6]
    return "-".join(part for part in (revenue_code, slug, digest) if part)


def load_chargemaster(
    path: Path, fmt: str, *, encoding: str | None = None
) -> ChargemasterLoad:
    """Load one chargemaster file.

    Args:
        path: The file.
        fmt: One of :data:`FORMATS`.
        encoding: Text encoding; by default UTF-8 (a BOM is allowed), then
            Windows-1252, the encoding of most hand-exported CDM files.

    Returns:
        The items, the bad rows and the row counts.

    Raises:
        ConfigurationError: If the format is unknown, or the file cannot be
            read or lacks the columns of its format.
    """
    readers = {
        "cms-v3-tall-csv": _load_cms_csv,
        "cms-v3-wide-csv": _load_cms_csv,
        "cms-v3-json": _load_cms_json,
        "cdm-2019-cpt": _load_cdm_cpt,
        "cdm-2019-revenue-code": _load_cdm_revenue_code,
    }
    if fmt not in readers:
        raise ConfigurationError(
            f"invalid chargemaster format {fmt!r}; expected one of {', '.join(FORMATS)}",
            path=str(path),
        )
    text = _read_text(path, encoding)
    load = ChargemasterLoad()
    candidates = readers[fmt](path, text, load)
    _deduplicate(path, candidates, load, _PRICE_COLUMNS[fmt])
    return load


def _read_text(path: Path, encoding: str | None) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"failed to read chargemaster: {exc}", path=str(path)
        ) from exc
    for candidate in [encoding] if encoding else ["utf-8-sig", "cp1252"]:
        try:
            return data.decode(candidate)
        except (UnicodeDecodeError, LookupError):
            continue
    raise ConfigurationError(
        f"failed to decode chargemaster as {encoding}; set chargemaster.encoding",
        path=str(path),
    )


def _records(text: str, start_line: int = 1) -> Iterator[tuple[int, list[str]]]:
    """Yield CSV records with the physical line each one starts on."""
    reader = csv.reader(io.StringIO(text, newline=""))
    previous_end = start_line - 1
    for record in reader:
        yield previous_end + 1, record
        previous_end = reader.line_num + start_line - 1


def _error(path: Path, line: int, column: str, message: str) -> ChargemasterRowError:
    return ChargemasterRowError(
        f"column {column!r}: {message}", path=str(path), line=line
    )


def _field_count_error(
    path: Path, line: int, record: list[str], header: list[str]
) -> ChargemasterRowError | None:
    """Return an error when a row's field count differs from the header's.

    An unquoted thousands separator (``$1,234.00``) splits a price into two
    cells; reading the row anyway would load a wrong price without notice.
    """
    if len(record) == len(header):
        return None
    return ChargemasterRowError(
        f"expected {len(header)} fields, got {len(record)}; quote values that "
        "contain commas",
        path=str(path),
        line=line,
    )


def _cell(record: list[str], index: int) -> str:
    return record[index].strip() if index < len(record) else ""


def _header_index(
    path: Path, line: int, header: list[str], wanted: tuple[str, ...]
) -> dict[str, int]:
    index = {name.strip(): i for i, name in enumerate(header)}
    missing = [name for name in wanted if name not in index]
    if missing:
        raise ConfigurationError(
            f"chargemaster header is missing column(s) {', '.join(missing)}; check the format",
            path=str(path),
            line=line,
        )
    return index


# NOTE: a price of $0.00 is valid and loads as an item. The OSHPD file has 1,129
# such rows (professional-fee and write-off lines), so a $0 charge can result.
def _price(
    path: Path, line: int, column: str, cell: str, load: ChargemasterLoad
) -> Decimal | None:
    if not cell:
        load.errors.append(_error(path, line, column, "price is missing"))
        return None
    try:
        return parse_money(cell)
    except ValueError:
        load.errors.append(
            _error(path, line, column, f"price {cell!r} is not an amount")
        )
        return None


def _load_cdm_cpt(path: Path, text: str, load: ChargemasterLoad) -> list[_Candidate]:
    records = _records(text)
    header_line, header = next(records, (1, []))
    cols = _header_index(
        path, header_line, header, ("Item No.", "Item Description", "CPT", "Price")
    )
    found: list[_Candidate] = []
    for line, record in records:
        load.rows_read += 1
        if not any(value.strip() for value in record):
            load.blank_rows += 1
            continue
        if problem := _field_count_error(path, line, record, header):
            load.errors.append(problem)
            continue
        number = _cell(record, cols["Item No."])
        description = _cell(record, cols["Item Description"])
        if not number:
            load.errors.append(_error(path, line, "Item No.", "item number is missing"))
            continue
        if not description:
            load.errors.append(
                _error(path, line, "Item Description", "description is missing")
            )
            continue
        price = _price(path, line, "Price", _cell(record, cols["Price"]), load)
        if price is None:
            continue
        code = split_hcpcs(_cell(record, cols["CPT"]))
        hcpcs, modifiers, units = code if code else (None, (), 1)
        found.append(
            _Candidate(line, number, description, price, None, hcpcs, modifiers, units)
        )
    return found


def _load_cdm_revenue_code(
    path: Path, text: str, load: ChargemasterLoad
) -> list[_Candidate]:
    records = _records(text)
    header_line, header = next(records, (1, []))
    wanted = ("Description", "Revenue Code", "Patient Pay Charge")
    cols = _header_index(path, header_line, header, wanted)
    found: list[_Candidate] = []
    for line, record in records:
        load.rows_read += 1
        if not any(value.strip() for value in record):
            load.blank_rows += 1
            continue
        if problem := _field_count_error(path, line, record, header):
            load.errors.append(problem)
            continue
        description = _cell(record, cols["Description"])
        if not description:
            load.errors.append(
                _error(path, line, "Description", "description is missing")
            )
            continue
        label = _REVENUE_LABEL.search(_cell(record, cols["Revenue Code"]))
        if not label:
            load.errors.append(
                _error(path, line, "Revenue Code", "no revenue code in [brackets]")
            )
            continue
        price = _price(
            path,
            line,
            "Patient Pay Charge",
            _cell(record, cols["Patient Pay Charge"]),
            load,
        )
        if price is None:
            continue
        revenue_code = pad_revenue_code(label.group(1))
        code = description_code(revenue_code, description)
        found.append(_Candidate(line, code, description, price, revenue_code, None))
    return found


def _deduplicate(
    path: Path, candidates: list[_Candidate], load: ChargemasterLoad, price_column: str
) -> None:
    """Keep one item per charge code; a code with two prices is bad everywhere."""
    by_code: dict[str, list[_Candidate]] = {}
    for candidate in candidates:
        by_code.setdefault(candidate.charge_code, []).append(candidate)
    for code, group in by_code.items():
        prices = {candidate.price for candidate in group}
        if len(prices) > 1:
            lines = ", ".join(str(c.line) for c in group)
            for candidate in group:
                load.errors.append(
                    _error(
                        path,
                        candidate.line,
                        price_column,
                        f"charge code {code!r} has different prices on lines {lines}",
                    )
                )
            continue
        load.collapsed_rows += len(group) - 1
        first = group[0]
        load.items.append(
            ChargeItem(
                charge_code=code,
                description=first.description,
                price=first.price,
                revenue_code=first.revenue_code,
                hcpcs=first.hcpcs,
                department=None,
                origin=f"{path.name}:{first.line}",
                modifiers=first.modifiers,
                hcpcs_units=first.units,
            )
        )
    load.errors.sort(key=lambda error: error.line)
    load.items.sort(key=lambda item: int(item.origin.rsplit(":", 1)[1]))


# CMS price-transparency v3 (45 CFR 180.50; CMS template v3.0.0) ------------
# Code types that name the hospital's own item, then standard codes, in the
# order they are preferred as the charge code.
_OWN_CODE_TYPES = ("CDM", "LOCAL")
_STANDARD_CODE_TYPES = ("CPT", "HCPCS", "NDC")
# Item-level columns: rows that agree on these describe the same item.
_ITEM_COLUMNS = ("setting", "drug_unit_of_measurement", "drug_type_of_measurement")


def _cms_charge_code(
    codes: list[tuple[str, str]], description: str
) -> tuple[str, str | None, str | None]:
    """Pick charge code, revenue code and CPT/HCPCS from an item's codes."""
    by_type: dict[str, str] = {}
    for code, kind in codes:
        by_type.setdefault(kind, code)
    revenue_code = pad_revenue_code(by_type["RC"]) if "RC" in by_type else None
    hcpcs = by_type.get("CPT") or by_type.get("HCPCS")
    for kind in _OWN_CODE_TYPES + _STANDARD_CODE_TYPES:
        if kind in by_type:
            return by_type[kind], revenue_code, hcpcs
    return description_code(revenue_code, description), revenue_code, hcpcs


def _cms_row_codes(row: dict[str, str]) -> list[tuple[str, str]]:
    codes = []
    number = 1
    while f"code|{number}" in row:
        code, kind = row[f"code|{number}"], row.get(f"code|{number}|type", "").upper()
        if code:
            codes.append((code, kind))
        number += 1
    return codes


def _cms_groups(
    path: Path, rows: Iterator[tuple[int, dict[str, str]]], load: ChargemasterLoad
) -> dict[tuple, list[tuple[int, str]]]:
    """Group CMS rows by item; payer-plan rows of one item share a group."""
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for line, row in rows:
        load.rows_read += 1
        if not any(row.values()):
            load.blank_rows += 1
            continue
        codes = _cms_row_codes(row)
        if not codes and row.get("modifiers"):
            load.modifier_rows += 1
            continue
        if not row.get("description"):
            load.errors.append(
                _error(path, line, "description", "description is missing")
            )
            continue
        key = (
            row["description"],
            tuple(codes),
            *(row.get(c, "") for c in _ITEM_COLUMNS),
        )
        groups.setdefault(key, []).append((line, row.get("standard_charge|gross", "")))
    return groups


def _cms_candidates(
    path: Path, groups: dict[tuple, list[tuple[int, str]]], load: ChargemasterLoad
) -> list[_Candidate]:
    found = []
    for (description, codes, *_), rows in groups.items():
        line = rows[0][0]
        load.collapsed_rows += len(rows) - 1
        cells = {cell for _, cell in rows}
        if len(cells) > 1:
            lines = ", ".join(str(row_line) for row_line, _ in rows)
            load.errors.append(
                _error(
                    path,
                    line,
                    "standard_charge|gross",
                    f"rows {lines} of one item disagree on the gross charge",
                )
            )
            continue
        price = _price(path, line, "standard_charge|gross", cells.pop(), load)
        if price is None:
            continue
        charge_code, revenue_code, hcpcs = _cms_charge_code(list(codes), description)
        split = split_hcpcs(hcpcs) if hcpcs else None
        found.append(
            _Candidate(
                line,
                charge_code,
                description,
                price,
                revenue_code,
                split[0] if split else None,
            )
        )
    return found


def _normalise_header(name: str) -> str:
    # The CMS examples write both "code | 1" and "code|1".
    return "|".join(part.strip() for part in name.strip().lower().split("|"))


def _load_cms_csv(path: Path, text: str, load: ChargemasterLoad) -> list[_Candidate]:
    records = _records(text)
    # Rows 1-2 are the hospital's metadata (names, then values); row 3 the header.
    for _ in range(2):
        next(records, None)
    header_line, header = next(records, (3, []))
    names = [_normalise_header(name) for name in header]
    if "description" not in names or "standard_charge|gross" not in names:
        raise ConfigurationError(
            "CMS CSV header (row 3) is missing 'description' or 'standard_charge|gross'; "
            "check the format",
            path=str(path),
            line=header_line,
        )
    rows = (
        (line, dict(zip(names, (value.strip() for value in record))))
        for line, record in records
    )
    return _cms_candidates(path, _cms_groups(path, rows, load), load)


def _json_array_lines(text: str, key: str) -> list[int]:
    """Return the line each element of the top-level array ``key`` starts on.

    The json module reports no positions, so the array is walked element by
    element with ``raw_decode``.
    """
    match = re.search(rf'"{re.escape(key)}"\s*:\s*\[', text)
    if not match:
        return []
    decoder = json.JSONDecoder()
    lines, position = [], match.end()
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return lines
        lines.append(text.count("\n", 0, position) + 1)
        _, position = decoder.raw_decode(text, position)


def _load_cms_json(path: Path, text: str, load: ChargemasterLoad) -> list[_Candidate]:
    try:
        document = json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"not JSON: {exc.msg}", path=str(path), line=exc.lineno
        ) from exc
    entries = document.get("standard_charge_information") or []
    lines = _json_array_lines(text, "standard_charge_information")
    load.rows_read += len(document.get("modifier_information") or [])
    load.modifier_rows += len(document.get("modifier_information") or [])
    rows = []
    for line, entry in zip(lines, entries):
        codes = {
            f"code|{n}": str(c.get("code", "")).strip()
            for n, c in enumerate(entry.get("code_information") or [], 1)
        }
        types = {
            f"code|{n}|type": str(c.get("type", "")).strip()
            for n, c in enumerate(entry.get("code_information") or [], 1)
        }
        for charge in entry.get("standard_charges") or [{}]:
            drug = entry.get("drug_information") or {}
            gross = charge.get("gross_charge")
            rows.append(
                (
                    line,
                    {
                        "description": str(entry.get("description") or "").strip(),
                        **codes,
                        **types,
                        "setting": str(charge.get("setting") or ""),
                        "drug_unit_of_measurement": str(drug.get("unit") or ""),
                        "drug_type_of_measurement": str(drug.get("type") or ""),
                        "standard_charge|gross": "" if gross is None else str(gross),
                    },
                )
            )
    return _cms_candidates(path, _cms_groups(path, iter(rows), load), load)
