"""Clear answers from the command line for bad configuration and bad paths."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from importlib import resources
from pathlib import Path

import yaml

CONFIG = Path(str(resources.files("carebridge").joinpath("demo", "config")))


def carebridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carebridge.cli", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )


def copy_config(tmp_path: Path) -> Path:
    folder = tmp_path / "config"
    shutil.copytree(CONFIG, folder)
    settings = folder / "carebridge.yaml"
    relative = yaml.safe_load(settings.read_text())["chargemaster"]["path"]
    settings.write_text(
        settings.read_text().replace(relative, str((CONFIG / relative).resolve()))
    )
    return folder


def test_invalid_csv_names_file_line_field(tmp_path: Path) -> None:
    folder = copy_config(tmp_path)
    items = folder / "supply_items.csv"
    lines = items.read_text().splitlines()
    cells = lines[2].split(",")
    cells[4] = "cheap"
    lines[2] = ",".join(cells)
    items.write_text("\n".join(lines) + "\n")
    (tmp_path / "in").mkdir()

    result = carebridge("ingest", "--config", str(folder), "--db",
                        f"sqlite:///{tmp_path / 'db.sqlite'}", str(tmp_path / "in"))

    assert result.returncode == 2
    assert "supply_items.csv:3" in result.stderr
    assert "unit_cost" in result.stderr
    assert "cheap" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_yaml_names_line_and_field(tmp_path: Path) -> None:
    folder = copy_config(tmp_path)
    settings = folder / "carebridge.yaml"
    lines = settings.read_text().splitlines()
    number = next(i for i, line in enumerate(lines) if line.strip().startswith("max_units:"))
    lines[number] = "  max_units: lots"
    settings.write_text("\n".join(lines) + "\n")
    (tmp_path / "in").mkdir()

    result = carebridge("ingest", "--config", str(folder), str(tmp_path / "in"))

    assert result.returncode == 2
    assert f"carebridge.yaml:{number + 1}" in result.stderr
    assert "rules.max_units" in result.stderr


def test_unknown_file_becomes_work_item(tmp_path: Path) -> None:
    strange = tmp_path / "notes.txt"
    strange.write_text("hello\n")
    empty = tmp_path / "empty.hl7"
    empty.write_bytes(b"")
    database = tmp_path / "db.sqlite"
    result = carebridge("ingest", "--json", "--db", f"sqlite:///{database}", str(strange),
                        str(empty))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["messages_failed"] == 2
    assert summary["work_items"]["by_reason"] == {"malformed_input": 2}
    with sqlite3.connect(database) as conn:
        details = sorted(row[0] for row in conn.execute("SELECT detail FROM work_items"))
        raws = sorted(row[0] for row in conn.execute("SELECT raw FROM message_bodies"))
    assert "file is empty" in details[0]
    assert "format not recognised" in details[1]
    assert "notes.txt" in details[1]
    assert raws == [b"", b"hello\n"]


def test_folder_scan_lists_skipped_files(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "conditions.csv").write_text("START,STOP\n")
    (folder / "readme.md").write_text("notes\n")
    result = carebridge("ingest", "--json", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}",
                        str(folder))
    assert result.returncode == 0, result.stderr
    skipped = {Path(item["path"]).name: item["reason"]
               for item in json.loads(result.stdout)["files_skipped"]}
    assert set(skipped) == {"conditions.csv", "readme.md"}
    assert "without finance events" in skipped["conditions.csv"]


def test_chargemaster_report_names_bad_rows() -> None:
    data = CONFIG.parent / "data" / "chargemasters" / "cms-v3"
    result = carebridge(
        "chargemaster", "--format", "cms-v3-tall-csv", "--json",
        str(data / "V3.0.0_Tall_CSV_Format_Example.csv"),
    )
    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert report["items"] == 12
    assert report["bad_rows"] == 7
    assert any(":6: column 'standard_charge|gross'" in error for error in report["errors"])


def test_prune_needs_an_archive(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    missing = carebridge("prune", "--db", url, "--archive", str(tmp_path / "archive"))
    assert missing.returncode == 2
    assert "not found" in missing.stderr
    assert carebridge("db", "upgrade", "--db", url).returncode == 0
    refused = carebridge("prune", "--db", url)
    assert refused.returncode == 2
    assert "archive" in refused.stderr

    planned = carebridge("prune", "--db", url, "--archive", str(tmp_path / "archive"),
                         "--dry-run", "--json")
    assert planned.returncode == 0, planned.stderr
    report = json.loads(planned.stdout)
    assert report["dry_run"] is True
    assert report["pruned"] == 0


def test_database_errors_are_one_line(tmp_path: Path) -> None:
    for url in ("postgresql+psycopg://nobody@127.0.0.1:1/none", "not a url",
                f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}-never"):
        result = carebridge("deliveries", "list", "--db", url)
        assert result.returncode in (2, 4), (url, result.stderr)
        assert "error:" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "missing-dir").exists()
