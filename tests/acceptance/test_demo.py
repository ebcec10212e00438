"""The main job end to end through the installed ``carebridge`` command."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(900)


def carebridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carebridge.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("demo")
    result = carebridge("demo", "--json", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), out


def test_summary_has_required_keys(demo_run: tuple[dict[str, Any], Path]) -> None:
    summary, _ = demo_run
    for key in (
        "messages_read", "duplicates", "services", "charges", "supply_postings",
        "journals", "work_items", "elapsed_seconds", "messages_per_second",
        "database", "outputs",
    ):
        assert key in summary, key
    assert set(summary["charges"]) >= {"count", "total"}
    assert set(summary["supply_postings"]) >= {"count", "total_cost"}
    assert set(summary["journals"]) >= {"count", "balanced"}
    assert set(summary["work_items"]) >= {"total", "by_reason"}
    assert summary["database"].startswith("sqlite:///")


def test_demo_posts_into_tryton_by_default(demo_run: tuple[dict[str, Any], Path]) -> None:
    summary, out = demo_run
    erp = summary["erp"]
    assert set(erp) >= {"moves", "stock_moves", "purchase_orders", "invoices", "matches_ledger"}
    assert erp["matches_ledger"] is True
    assert erp["moves"] == summary["journals"]["count"]
    assert erp["stock_moves"] == summary["supply_postings"]["count"]
    assert (out / "tryton").is_dir()
    claims = summary["claims"]
    assert claims["count"] == claims["validated"] + claims["held"]
    assert claims["validated"] > 0


def test_amounts_are_two_decimal_strings(demo_run: tuple[dict[str, Any], Path]) -> None:
    summary, _ = demo_run
    for amount in (summary["charges"]["total"], summary["supply_postings"]["total_cost"]):
        assert isinstance(amount, str)
        whole, _, cents = amount.partition(".")
        assert whole.lstrip("-").isdigit()
        assert len(cents) == 2


def test_volume_across_formats(demo_run: tuple[dict[str, Any], Path]) -> None:
    summary, _ = demo_run
    formats = summary["messages_by_format"]
    assert summary["messages_read"] >= 500
    assert formats.get("hl7v2", 0) >= 50
    assert formats.get("fhir-json", 0) == 4
    assert sum(count for fmt, count in formats.items() if fmt.startswith("synthea-csv")) >= 400


def test_every_service_accounted(demo_run: tuple[dict[str, Any], Path]) -> None:
    summary, _ = demo_run
    accounted = summary["services_accounted"]
    assert summary["services"] == (
        accounted["charged"] + accounted["work_items"] + accounted["duplicates"]
    )
    assert accounted["identity_holds"] is True
    assert accounted["charged"] > 0
    assert accounted["duplicates"] > 0  # the FHIR bundles repeat CSV services
    assert summary["charges"]["from_services"] == accounted["charged"]


def test_journals_balanced(demo_run: tuple[dict[str, Any], Path]) -> None:
    summary, _ = demo_run
    assert summary["journals"]["count"] > 0
    assert summary["journals"]["balanced"] is True
    assert summary["journals"]["debit_total"] == summary["journals"]["credit_total"]


def test_bean_check_accepts_ledger(demo_run: tuple[dict[str, Any], Path]) -> None:
    summary, _ = demo_run
    bean_check = shutil.which("bean-check") or str(Path(sys.executable).with_name("bean-check"))
    result = subprocess.run(
        [bean_check, summary["outputs"]["beancount"]], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary["ledger_check"]["ok"] is True


def test_journal_lines_trace_to_messages(demo_run: tuple[dict[str, Any], Path]) -> None:
    summary, out = demo_run
    database = out / "carebridge.db"
    with sqlite3.connect(database) as conn:
        untraced = conn.execute(
            "SELECT count(*) FROM journal_lines jl LEFT JOIN messages m "
            "ON m.id = jl.source_message_id WHERE m.id IS NULL"
        ).fetchone()[0]
        lines = conn.execute("SELECT count(*) FROM journal_lines").fetchone()[0]
    assert lines == 2 * (summary["charges"]["count"] + summary["supply_postings"]["count"])
    assert untraced == 0


def test_second_run_posts_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = carebridge("demo", "--json", "--no-erp", "--out", str(tmp_path / "one"),
                       "--db", url)
    second = carebridge("demo", "--json", "--no-erp", "--out", str(tmp_path / "two"),
                        "--db", url)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    one, two = json.loads(first.stdout), json.loads(second.stdout)

    assert two["messages_read"] == one["messages_read"]
    assert two["duplicates"] == two["messages_read"]
    assert two["charges"]["count"] == 0
    assert two["supply_postings"]["count"] == 0
    assert two["journals"]["count"] == 0
    with sqlite3.connect(tmp_path / "shared.db") as conn:
        charges = conn.execute("SELECT count(*) FROM charge_lines").fetchone()[0]
        keys = conn.execute("SELECT count(DISTINCT service_key) FROM charge_lines").fetchone()[0]
        issues = conn.execute("SELECT count(*) FROM supply_issues").fetchone()[0]
    assert charges == keys == one["charges"]["count"]
    assert issues == one["supply_postings"]["count"]


def test_help_explains_every_command() -> None:
    result = carebridge("--help")
    assert result.returncode == 0
    for command in ("demo", "ingest"):
        assert command in result.stdout
    for command in ("demo", "ingest"):
        sub = carebridge(command, "--help")
        assert sub.returncode == 0
        assert "--db" in sub.stdout
        assert "--json" in sub.stdout
