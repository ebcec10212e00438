"""Configuration: versioned master data and rules, loaded and checked at start.

Use :func:`load_configuration` on a folder such as ``carebridge/demo/config``.
"""

from carebridge.config.assemble import load_configuration
from carebridge.config.chargemaster import (
    ChargemasterLoad,
    load_chargemaster,
    parse_money,
)
from carebridge.config.model import Configuration

__all__ = [
    "ChargemasterLoad",
    "Configuration",
    "load_chargemaster",
    "load_configuration",
    "parse_money",
]
