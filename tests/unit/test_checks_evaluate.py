"""`carebridge evaluate` on a small index: its JSON and the targets it must meet."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from carebridge.cli import main

CHECKS = ("duplicate_patients", "missing_charges", "anomalies")
METRICS = {"precision", "recall", "f1", "seconds"}


@pytest.fixture(scope="module")
def report() -> dict:
    result = CliRunner().invoke(main, ["evaluate", "--patients", "2000", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_evaluate_json_keys(report):
    for check in CHECKS:
        assert METRICS <= set(report[check]), check
        assert METRICS <= set(report[check]["baseline"]), check
    assert report["patients"] == 2000


def test_duplicates_beat_baseline(report):
    duplicates = report["duplicate_patients"]
    assert duplicates["f1"] >= 0.95
    assert duplicates["f1"] > duplicates["baseline"]["f1"]
    assert duplicates["records"] == 2000


def test_missing_charges_targets(report):
    missing = report["missing_charges"]
    assert missing["recall"] >= 0.9
    assert missing["precision"] >= 0.8
    assert missing["labelled"] > 50


def test_anomalies_precision_target(report):
    anomalies = report["anomalies"]
    assert anomalies["precision"] >= 0.9
    assert anomalies["recall"] > anomalies["baseline"]["recall"]


def test_evaluate_table_output():
    result = CliRunner().invoke(main, ["evaluate", "--patients", "300", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert "duplicate_patients" in result.output
    assert "baseline" in result.output
