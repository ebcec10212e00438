"""NPI check digits, ZIP+4 and billing.yaml validation."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import pytest

from carebridge.config import load_configuration
from carebridge.errors import ConfigurationError
from carebridge.model.identifiers import luhn_valid, npi_problem, npi_valid, zip_plus_4_valid

DEMO = Path(str(resources.files("carebridge").joinpath("demo")))


@pytest.mark.parametrize("npi", ["1234567893", "1245319599"])
def test_npi_with_check_digit_is_valid(npi: str) -> None:
    assert npi_valid(npi)
    assert npi_problem(npi) is None


@pytest.mark.parametrize("npi", ["1234567890", "1234567894", "1245319590"])
def test_npi_wrong_check_digit_is_invalid(npi: str) -> None:
    assert not npi_valid(npi)
    assert "check digit" in (npi_problem(npi) or "")


@pytest.mark.parametrize("npi", ["123456789", "12345678930", "12345678A3", ""])
def test_npi_wrong_shape_is_invalid(npi: str) -> None:
    assert not npi_valid(npi)
    assert "10 digits" in (npi_problem(npi) or "")


def test_npi_check_needs_the_80840_prefix() -> None:
    # Without the prefix the Luhn check of 1234567893 fails; with it, it passes.
    assert not luhn_valid("1234567893")
    assert luhn_valid("808401234567893")


@pytest.mark.parametrize(("zip_code", "valid"), [
    ("021151234", True), ("02115", False), ("02115-1234", False),
    ("0211512345", False), ("02115123A", False),
])
def test_zip_plus_4(zip_code: str, valid: bool) -> None:
    assert zip_plus_4_valid(zip_code) is valid


@pytest.fixture()
def config_copy(tmp_path: Path) -> Path:
    target = tmp_path / "demo" / "config"
    shutil.copytree(DEMO / "config", target)
    (tmp_path / "demo" / "data").symlink_to(DEMO / "data")
    return target


def _edit(path: Path, old: str, new: str) -> int:
    """Replace ``old`` once and return the line it was on."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    line = text[: text.index(old)].count("\n") + 1
    path.write_text(text.replace(old, new, 1))
    return line


def _fails(config_dir: Path) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        load_configuration(config_dir)
    return caught.value


def test_billing_npi_check_digit_fails_at_start(config_copy: Path) -> None:
    path = config_copy / "billing.yaml"
    line = _edit(path, 'npi: "1234567893"', 'npi: "1234567890"')
    error = _fails(config_copy)
    assert Path(error.path).name == "billing.yaml"
    assert error.line == line
    assert error.field == "billing_provider.npi"
    assert "check digit" in str(error)


def test_billing_zip_without_plus_4_fails(config_copy: Path) -> None:
    path = config_copy / "billing.yaml"
    line = _edit(path, 'zip: "021151234"', 'zip: "02115"')
    error = _fails(config_copy)
    assert error.line == line
    assert error.field == "billing_provider.address.zip"
    assert "ZIP+4" in str(error)


def test_billing_zip_with_hyphen_is_accepted(config_copy: Path) -> None:
    _edit(config_copy / "billing.yaml", 'zip: "021151234"', 'zip: "02115-1234"')
    billing = load_configuration(config_copy).billing
    assert billing is not None
    assert billing.file.billing_provider.address.zip == "021151234"


def test_diagnosis_crosswalk_bad_code_fails(config_copy: Path) -> None:
    path = config_copy / "diagnosis_crosswalk.csv"
    line = _edit(path, "SNOMED,195967001,J45.909", "SNOMED,195967001,J45-909")
    error = _fails(config_copy)
    assert Path(error.path).name == "diagnosis_crosswalk.csv"
    assert error.line == line
    assert error.field == "icd10cm"


def test_no_billing_file_means_no_claims(config_copy: Path) -> None:
    (config_copy / "billing.yaml").unlink()
    assert load_configuration(config_copy).billing is None


def test_demo_billing_loads() -> None:
    billing = load_configuration(DEMO / "config").billing
    assert billing is not None
    assert billing.diagnosis_crosswalk[("SNOMED", "195662009")] == "J029"
    assert billing.authorization_required == frozenset()
    assert "inpatient" in billing.file.institutional_classes
