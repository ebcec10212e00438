"""Checks of identifiers that claims carry: NPI check digit and ZIP+4.

These are the checks that X12 validators such as pyx12 do not make, because
the 837 implementation guides give the NPI and ZIP code only a length.
"""

from __future__ import annotations

import re

NPI_PREFIX = "80840"
"""ISO 7812 issuer prefix of the NPI. The NPI's tenth digit is the Luhn
check digit of this prefix followed by the NPI's first nine digits."""

_NPI = re.compile(r"^\d{10}$")
_ZIP_PLUS_4 = re.compile(r"^\d{9}$")


def luhn_valid(digits: str) -> bool:
    """Return whether a string of digits ends in a correct Luhn check digit."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def npi_valid(npi: str) -> bool:
    """Return whether ``npi`` is ten digits whose last is the NPI check digit."""
    return bool(_NPI.match(npi)) and luhn_valid(NPI_PREFIX + npi)


def npi_problem(npi: str) -> str | None:
    """Return why ``npi`` is not a valid NPI, or ``None`` when it is."""
    if not _NPI.match(npi):
        return f"NPI {npi!r} must be 10 digits"
    if not luhn_valid(NPI_PREFIX + npi):
        return f"NPI {npi} has an invalid check digit (Luhn with prefix {NPI_PREFIX})"
    return None


def zip_plus_4_valid(zip_code: str) -> bool:
    """Return whether ``zip_code`` is a 9-digit ZIP+4 code, written without a hyphen."""
    return bool(_ZIP_PLUS_4.match(zip_code))
