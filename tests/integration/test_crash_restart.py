"""kill -9 during a run, restart, and compare with an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import DEMO

pytestmark = pytest.mark.timeout(600)

INPUTS = [
    str(DEMO / "data" / "synthea" / "csv"),
    str(DEMO / "data" / "hl7v2"),
    str(DEMO / "data" / "synthea" / "fhir"),
]


def ingest_command(database: Path) -> list[str]:
    return [sys.executable, "-m", "carebridge.cli", "ingest", "--db",
            f"sqlite:///{database}", "--json", *INPUTS]


def run_to_end(database: Path) -> None:
    result = subprocess.run(ingest_command(database), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr


def kill_after(database: Path, seconds: float) -> None:
    process = subprocess.Popen(ingest_command(database), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def query(database: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(database) as conn:
        return conn.execute(sql).fetchall()


def test_kill_nine_loses_and_doubles_nothing(tmp_path: Path) -> None:
    clean = tmp_path / "clean.db"
    crashed = tmp_path / "crashed.db"
    run_to_end(clean)

    rounds = random.Random(20240501)
    for _ in range(4):
        kill_after(crashed, rounds.uniform(0.8, 4.0))
    run_to_end(crashed)

    assert query(crashed, "SELECT count(*) FROM messages WHERE state = 'received'") == [(0,)]
    charged_clean = query(clean, "SELECT service_key, amount FROM charge_lines ORDER BY 1")
    charged_crashed = query(crashed, "SELECT service_key, amount FROM charge_lines ORDER BY 1")
    assert charged_crashed == charged_clean
    issues_clean = query(clean, "SELECT usage_key, total_cost FROM supply_issues ORDER BY 1")
    issues_crashed = query(crashed, "SELECT usage_key, total_cost FROM supply_issues ORDER BY 1")
    assert issues_crashed == issues_clean
    assert query(crashed, "SELECT count(*) FROM charge_lines WHERE journal_id IS NULL") == [(0,)]
    lines = query(crashed, "SELECT count(*) FROM journal_lines")[0][0]
    assert lines == 2 * (len(charged_crashed) + len(issues_crashed))
    unbalanced = query(crashed, "SELECT count(*) FROM journals WHERE total_debit != total_credit")
    assert unbalanced == [(0,)]
