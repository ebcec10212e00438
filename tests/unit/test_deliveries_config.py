"""The ``destinations:`` section of carebridge.yaml: parsed, and refused with a line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from carebridge.config import load_configuration
from carebridge.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src/carebridge/demo/config"

GOOD = """
destinations:
  - name: erp
    type: http
    kinds: [journal]
    settings:
      url: http://127.0.0.1:8080/journals
      timeout_seconds: 5
    max_attempts: 4
  - name: archive
    type: http
    enabled: false
    kinds: [journal]
    settings:
      url: https://archive.example.org/in
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    target = tmp_path / "demo" / "config"
    shutil.copytree(DEMO, target)
    (tmp_path / "demo" / "data").symlink_to(DEMO.parent / "data")
    return target


def _append(config_dir: Path, text: str) -> Path:
    path = config_dir / "carebridge.yaml"
    path.write_text(path.read_text() + text)
    return path


def _line(path: Path, needle: str, occurrence: int = 1) -> int:
    lines = enumerate(path.read_text().splitlines(), 1)
    hits = [
        n for n, line in lines if needle in line and not line.lstrip().startswith("#")
    ]
    return hits[occurrence - 1]


def _fails(config_dir: Path, line: int, field: str) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        load_configuration(config_dir)
    error = caught.value
    assert (Path(error.path).name, error.line, error.field) == (
        "carebridge.yaml",
        line,
        field,
    )
    assert f"carebridge.yaml:{line}" in str(error)
    return error


def test_demo_has_no_destination() -> None:
    assert load_configuration(DEMO).destinations == ()


def test_destinations_are_loaded(config_dir: Path) -> None:
    _append(config_dir, GOOD)
    erp, archive = load_configuration(config_dir).destinations
    assert (erp.name, erp.type, erp.kinds, erp.enabled) == (
        "erp",
        "http",
        ("journal",),
        True,
    )
    assert erp.settings == {
        "url": "http://127.0.0.1:8080/journals",
        "timeout_seconds": 5.0,
    }
    assert erp.max_attempts == 4
    assert erp.backoff_cap_seconds == 300.0
    assert archive.enabled is False


def test_unknown_type_names_the_type_line(config_dir: Path) -> None:
    path = _append(config_dir, GOOD.replace("type: http", "type: sftp", 1))
    error = _fails(config_dir, _line(path, "type: sftp"), "destinations.0.type")
    assert "unknown destination type 'sftp'" in str(error)


def test_bad_setting_names_the_setting_line(config_dir: Path) -> None:
    path = _append(
        config_dir, GOOD.replace("http://127.0.0.1:8080/journals", "ftp://x/y")
    )
    _fails(config_dir, _line(path, "ftp://x/y"), "destinations.0.settings.url")


def test_missing_url_names_the_settings_line(config_dir: Path) -> None:
    path = _append(
        config_dir,
        GOOD.replace("      url: https://archive.example.org/in\n", "      {}\n"),
    )
    path.write_text(
        path.read_text().replace("    settings:\n      {}\n", "    settings: {}\n")
    )
    _fails(config_dir, _line(path, "settings: {}"), "destinations.1.settings.url")


def test_duplicate_name_is_refused(config_dir: Path) -> None:
    path = _append(config_dir, GOOD.replace("name: archive", "name: erp"))
    _fails(config_dir, _line(path, "name: erp", 2), "destinations.1.name")


def test_unknown_kind_is_refused(config_dir: Path) -> None:
    path = _append(config_dir, GOOD.replace("kinds: [journal]", "kinds: [invoice]", 1))
    _fails(config_dir, _line(path, "kinds: [invoice]"), "destinations.0.kinds.0")


def test_cap_below_base_is_refused(config_dir: Path) -> None:
    path = _append(
        config_dir,
        GOOD.replace(
            "    max_attempts: 4\n",
            "    backoff_base_seconds: 10\n    backoff_cap_seconds: 2\n",
        ),
    )
    _fails(
        config_dir,
        _line(path, "backoff_cap_seconds: 2"),
        "destinations.0.backoff_cap_seconds",
    )
