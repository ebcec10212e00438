"""Logging set-up for the command line: readable lines with their ids.

Modules log through ``logging.getLogger(__name__)`` and pass ids in
``extra`` (``action``, ``message_id``, ``run_id``, ...). The formatter here
appends those fields as ``key=value`` so that they reach the log file.
"""

from __future__ import annotations

import logging
from pathlib import Path

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    """Format a record as text followed by its ``extra`` fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Return the formatted line, with the record's extra fields appended."""
        text = super().format(record)
        extras = {
            key: value for key, value in vars(record).items() if key not in _STANDARD
        }
        if extras:
            text += " " + " ".join(f"{key}={value}" for key, value in sorted(extras.items()))
        return text


def configure(console_level: int, log_file: Path | None = None) -> None:
    """Send logs to stderr at ``console_level`` and, if given, to ``log_file`` at INFO."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler()
    console.setLevel(console_level)
    console.setFormatter(KeyValueFormatter())
    root.addHandler(console)
    level = console_level
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(KeyValueFormatter())
        root.addHandler(file_handler)
        level = min(level, logging.INFO)
    root.setLevel(level)
