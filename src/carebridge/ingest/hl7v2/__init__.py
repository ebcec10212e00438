"""HL7 v2 ingest: split files into messages, parse them, map them to records."""

from carebridge.ingest.hl7v2.escapes import (
    DEFAULT_DELIMITERS,
    Delimiters,
    escape,
    unescape,
    unescape_with_warnings,
)
from carebridge.ingest.hl7v2.framing import FileSplit, RawHl7, split_file
from carebridge.ingest.hl7v2.mapping import FINANCE_MESSAGE_TYPES, map_message
from carebridge.ingest.hl7v2.parser import (
    Hl7Message,
    Hl7Segment,
    location,
    parse_message,
)

__all__ = [
    "DEFAULT_DELIMITERS",
    "FINANCE_MESSAGE_TYPES",
    "Delimiters",
    "FileSplit",
    "Hl7Message",
    "Hl7Segment",
    "RawHl7",
    "escape",
    "location",
    "map_message",
    "parse_message",
    "split_file",
    "unescape",
    "unescape_with_warnings",
]
