"""Mappers from a stored raw message to canonical records, by message format."""

from __future__ import annotations

from collections.abc import Callable

from carebridge.errors import ParseError
from carebridge.ingest.fhir.json import load_fhir_json, parse_fhir_json
from carebridge.ingest.fhir.mapping import map_fhir
from carebridge.ingest.files.csvrows import read_csv_records
from carebridge.ingest.files.synthea import map_synthea_row
from carebridge.ingest.hl7v2.mapping import map_message
from carebridge.ingest.hl7v2.parser import parse_message
from carebridge.model import CanonicalBatch

Mapper = Callable[[bytes, int, int], CanonicalBatch]


HL7V2_CHARSET_FORMAT = "hl7v2;charset="
"""Format of an HL7 v2 message whose channel default charset is not UTF-8
(an MLLP listener configured so); the codec name follows the prefix."""


def _map_hl7v2(
    raw: bytes, message_id: int, _occurrence: int, *, default_charset: str = "utf-8"
) -> CanonicalBatch:
    # Files carry no charset negotiation; UTF-8 is the channel default and a
    # superset of the ASCII that HL7 v2 assumes when MSH-18 is empty.
    message = parse_message(raw, default_charset=default_charset)
    batch = map_message(message, message_id)
    batch.warnings[:0] = list(message.warnings)
    return batch


FHIR_VALIDATED_FORMAT = "fhir-json;validated"
"""Format of FHIR JSON that the FHIR API validated against R4B before storing
it, with server-assigned ids and references. The worker does not validate it
again."""


def _map_fhir(raw: bytes, message_id: int, _occurrence: int) -> CanonicalBatch:
    return map_fhir(load_fhir_json(raw), message_id)


def _map_validated_fhir(raw: bytes, message_id: int, _occurrence: int) -> CanonicalBatch:
    return map_fhir(parse_fhir_json(raw), message_id)


def _synthea_mapper(kind: str) -> Mapper:
    def map_row(raw: bytes, message_id: int, occurrence: int) -> CanonicalBatch:
        table = read_csv_records(raw, source=f"message {message_id}")
        if len(table.records) != 1:
            raise ParseError(
                f"expected one {kind} row under the header, found {len(table.records)}"
            )
        record = table.records[0]
        if record.error or record.fields is None:
            raise ParseError(record.error or "row could not be read")
        return map_synthea_row(kind, record.fields, message_id, occurrence=occurrence)

    return map_row


MAPPERS: dict[str, Mapper] = {
    "hl7v2": _map_hl7v2,
    "fhir-json": _map_fhir,
    FHIR_VALIDATED_FORMAT: _map_validated_fhir,
    **{
        f"synthea-csv:{kind}": _synthea_mapper(kind)
        for kind in ("patients", "encounters", "procedures", "immunizations", "supplies")
    },
}


def map_raw(fmt: str, raw: bytes, message_id: int, occurrence: int = 1) -> CanonicalBatch:
    """Map a stored raw message of format ``fmt`` to canonical records.

    ``occurrence`` is the message's number among identical rows of its file.

    Raises:
        ParseError: the message cannot be read or has no mapper.
    """
    mapper = MAPPERS.get(fmt)
    if mapper is None and fmt.startswith(HL7V2_CHARSET_FORMAT):
        charset = fmt.removeprefix(HL7V2_CHARSET_FORMAT)
        return _map_hl7v2(raw, message_id, occurrence, default_charset=charset)
    if mapper is None:
        raise ParseError(f"no mapper for message format {fmt!r}")
    return mapper(raw, message_id, occurrence)
