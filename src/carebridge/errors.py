"""Exceptions raised by carebridge.

All derive from :class:`CarebridgeError`::

    CarebridgeError
    ├── ConfigurationError      invalid configuration file; fix the file, then restart
    ├── InputError              malformed input; the raw input is kept for reprocessing
    │   ├── FramingError        bytes that do not form an HL7 v2 message or MLLP frame
    │   ├── ParseError          a message whose structure or a field cannot be read
    │   └── ChargemasterRowError  one chargemaster row that cannot be loaded
    └── StoreError              the database failed; a retry may help

Each class says whether retrying the same operation can succeed.
"""

from __future__ import annotations


class CarebridgeError(Exception):
    """Base class of every carebridge error."""

    retryable: bool = False
    exit_code: int = 1


class ConfigurationError(CarebridgeError):
    """A configuration file is invalid; the message names file, line and field."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.field = field
        where = path or "<configuration>"
        if line is not None:
            where = f"{where}:{line}"
        if field:
            where = f"{where}: field {field!r}"
        super().__init__(f"{where}: {message}")


class InputError(CarebridgeError):
    """Input that cannot be processed as sent."""


class FramingError(InputError):
    """Bytes that do not form an HL7 v2 message or an MLLP frame."""


class ParseError(InputError):
    """A message whose structure or one of its fields cannot be read.

    ``location`` follows HL7 v2 ERR-2 where it applies, e.g. ``FT1^1^10``.
    """

    def __init__(self, message: str, *, location: str | None = None) -> None:
        self.location = location
        super().__init__(f"{location}: {message}" if location else message)


class ChargemasterRowError(InputError):
    """One chargemaster row that cannot be loaded; names the file and line."""

    def __init__(self, message: str, *, path: str, line: int) -> None:
        self.path = path
        self.line = line
        super().__init__(f"{path}:{line}: {message}")


class StoreError(CarebridgeError):
    """The database failed; retrying may succeed."""

    retryable = True
