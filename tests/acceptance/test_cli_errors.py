"""Clear answers from the command line for bad configuration and bad paths."""

from __future__ import annotations

import json
import shutil
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


def test_unknown_file_format_is_clear(tmp_path: Path) -> None:
    strange = tmp_path / "notes.txt"
    strange.write_text("hello\n")
    result = carebridge("ingest", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}", str(strange))
    assert result.returncode == 1
    assert "format not recognised" in result.stderr
    assert "notes.txt" in result.stderr


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
