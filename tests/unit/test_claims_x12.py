"""The 837 builder, its checks and pyx12 validation, on small invented claims."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal
from importlib import resources
from pathlib import Path

import pytest

from carebridge.claims.build837 import (
    INSTITUTIONAL,
    PROFESSIONAL,
    ClaimDraft,
    ClaimLineDraft,
    PatientFacts,
    build_837,
)
from carebridge.claims.readiness import service_lines
from carebridge.claims.validate import (
    ValidationPool,
    build_and_validate,
    check_claim_text,
    claim_amounts,
    component,
    pyx12_errors,
)
from carebridge.claims.x12 import X12DataError, x12_amount
from carebridge.config import load_configuration
from carebridge.config.schema import BillingFile

DEMO_CONFIG = Path(str(resources.files("carebridge").joinpath("demo", "config")))
CREATED = dt.datetime(2024, 5, 2, 9, 30, tzinfo=dt.UTC)
SERVED = dt.date(2024, 5, 1)


@pytest.fixture(scope="module")
def billing() -> BillingFile:
    settings = load_configuration(DEMO_CONFIG).billing
    assert settings is not None
    return settings.file


def patient() -> PatientFacts:
    return PatientFacts(
        patient_id="pat-0027", last_name="TESTPATIENT", first_name="UPSILON",
        birth_date=dt.date(1980, 1, 1), gender="female", member_id="MBRU0027",
    )


def lines(*amounts: tuple[str, str, str]) -> tuple[ClaimLineDraft, ...]:
    return tuple(
        ClaimLineDraft(
            line_no=number, procedure_code=code, revenue_code="0300", units=Decimal(units),
            amount=Decimal(amount), service_date=SERVED, charge_line_ids=(number,),
        )
        for number, (code, units, amount) in enumerate(amounts, start=1)
    )


BR27_LINES = lines(("71045", "1", "125.00"), ("A4550", "2", "39.00"),
                   ("A4206", "1", "0.10"), ("A4245", "1", "0.20"))


def draft(**changes) -> ClaimDraft:
    values = dict(
        claim_reference="CB0000000027", patient_control_number="PCN0027",
        kind=PROFESSIONAL, frequency_code="1", original_reference=None,
        start=dt.datetime(2024, 5, 1, 10, 0, tzinfo=dt.UTC),
        end=dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC),
        patient=patient(), diagnoses=("J029", "R509"), lines=BR27_LINES,
        total=Decimal("164.30"), place_of_service="11",
    )
    values.update(changes)
    return ClaimDraft(**values)


def segments(text: str, name: str) -> list[str]:
    return [s for s in text.replace("\n", "").split("~") if s.split("*", 1)[0] == name]


def test_amount_format_has_no_float_artefact() -> None:
    assert x12_amount(Decimal("164.30")) == "164.3"
    assert x12_amount(Decimal("125.00")) == "125"
    assert x12_amount(Decimal("0.10")) == "0.1"
    assert x12_amount(Decimal("1E+3")) == "1000"
    assert x12_amount(Decimal("0.00")) == "0"


def test_837p_claim_and_line_segments(billing: BillingFile) -> None:
    text = build_837(draft(), billing, 27, CREATED)
    assert segments(text, "CLM") == ["CLM*PCN0027*164.3***11:B:1*Y*A*Y*Y"]
    assert segments(text, "SV1") == [
        "SV1*HC:71045*125*UN*1***1:2",
        "SV1*HC:A4550*39*UN*2***1:2",
        "SV1*HC:A4206*0.1*UN*1***1:2",
        "SV1*HC:A4245*0.2*UN*1***1:2",
    ]
    assert segments(text, "HI") == ["HI*ABK:J029*ABF:R509"]
    assert "164.29999999999998" not in text
    total, line_amounts = claim_amounts(text)
    assert total == sum(line_amounts) == Decimal("164.30")


def test_837p_envelope_and_provider(billing: BillingFile) -> None:
    text = build_837(draft(), billing, 27, CREATED)
    isa = text.split("~", 1)[0]
    assert len(isa) == 105
    assert isa[3] == "*"
    assert isa[104] == ":"
    assert isa.split("*")[11] == "^"
    assert isa.split("*")[13] == "000000027"
    assert segments(text, "ST") == ["ST*837*0001*005010X222A1"]
    assert segments(text, "GS")[0].endswith("*X*005010X222A1")
    assert "NM1*85*2*CAREBRIDGE DEMO HOSPITAL*****XX*1234567893" in segments(text, "NM1")
    assert segments(text, "N4")[0] == "N4*BOSTON*MA*021151234"
    se_count = int(segments(text, "SE")[0].split("*")[1])
    st_index = text.index("\nST*837")
    se_index = text.index("\nSE*")
    assert se_count == text[st_index:se_index].count("~") + 1


def test_837i_revenue_code_lines(billing: BillingFile) -> None:
    inpatient = billing.institutional_classes["inpatient"]
    text = build_837(
        draft(kind=INSTITUTIONAL, institutional=inpatient, place_of_service=None),
        billing, 28, CREATED,
    )
    assert segments(text, "ST") == ["ST*837*0001*005010X223A2"]
    assert segments(text, "CLM") == ["CLM*PCN0027*164.3***11:A:1**A*Y*Y"]
    assert segments(text, "SV2")[0] == "SV2*0300*HC:71045*125*UN*1"
    assert segments(text, "CL1") == ["CL1*3*1*01"]
    assert "DTP*435*DT*202405011000" in segments(text, "DTP")
    assert segments(text, "HI")[:2] == ["HI*ABK:J029", "HI*ABJ:J029"]
    assert segments(text, "NM1")[-1].startswith("NM1*71*1*EXAMPLE*ALEX")


def test_corrected_claim_frequency_7(billing: BillingFile) -> None:
    text = build_837(
        draft(frequency_code="7", original_reference="CB0000000001"), billing, 29, CREATED
    )
    clm = segments(text, "CLM")[0].split("*")
    assert component(clm[5], 2) == "7"
    assert segments(text, "REF")[-1] == "REF*F8*CB0000000001"


def test_emitted_claims_pass_pyx12(billing: BillingFile) -> None:
    professional = build_837(draft(), billing, 30, CREATED)
    emergency = billing.institutional_classes["emergency"]
    institutional = build_837(
        draft(kind=INSTITUTIONAL, institutional=emergency, frequency_code="7",
              original_reference="CB0000000001"),
        billing, 31, CREATED,
    )
    assert pyx12_errors({30: professional, 31: institutional}) == {}


def test_pyx12_names_the_broken_claim(billing: BillingFile) -> None:
    good = build_837(draft(), billing, 40, CREATED)
    broken = build_837(draft(), billing, 41, CREATED).replace(
        "DMG*D8*19800101*F", "DMG*D8*19801301*F"
    )
    errors = pyx12_errors({40: good, 41: broken})
    assert list(errors) == [41]
    assert any("DMG02" in message for message in errors[41])


def test_validation_pool_agrees_with_one_process(billing: BillingFile) -> None:
    drafts = [(number, draft(), Decimal("164.30")) for number in range(60, 66)]
    drafts[2] = (62, draft(total=Decimal("164.00")), Decimal("164.30"))
    bad_name = dataclasses.replace(patient(), last_name="O*BRIEN")  # "*" separates elements
    drafts[4] = (64, draft(patient=bad_name), Decimal("164.30"))
    texts, problems = build_and_validate(drafts, billing, CREATED)
    assert sorted(texts) == [60, 61, 63, 65]
    assert sorted(problems) == [62, 64]
    with ValidationPool(2) as pool:
        wait = pool.submit(drafts, billing, CREATED)
        assert wait() == (texts, problems)


def test_tampered_line_amount_is_caught(billing: BillingFile) -> None:
    text = build_837(draft(), billing, 50, CREATED)
    tampered = text.replace("SV1*HC:A4206*0.1*", "SV1*HC:A4206*0.2*")
    problems = check_claim_text(tampered)
    assert len(problems) == 1
    assert "164.3" in problems[0]
    assert "164.4" in problems[0]
    # pyx12 alone accepts it: the total is outside what it checks.
    assert pyx12_errors({50: tampered}) == {}


def test_unbalanced_draft_is_caught(billing: BillingFile) -> None:
    text = build_837(draft(total=Decimal("164.00")), billing, 51, CREATED)
    problems = check_claim_text(text)
    assert problems == [
        "claim total CLM02 164.00 differs from the sum of its 4 line charges 164.30"
    ]


def test_total_checked_against_charge_lines(billing: BillingFile) -> None:
    text = build_837(draft(), billing, 52, CREATED)
    assert check_claim_text(text, Decimal("164.30")) == []
    problems = check_claim_text(text, Decimal("164.20"))
    assert len(problems) == 1
    assert "charge lines 164.20" in problems[0]


def test_bad_npi_and_zip_are_caught(billing: BillingFile) -> None:
    text = build_837(draft(), billing, 53, CREATED)
    wrong = text.replace("XX*1234567893", "XX*1234567890").replace(
        "N4*BOSTON*MA*021151234", "N4*BOSTON*MA*02115"
    )
    problems = check_claim_text(wrong)
    assert len(problems) == 2
    assert "check digit" in problems[0]
    assert "ZIP+4" in problems[1]


def test_delimiter_in_data_is_rejected(billing: BillingFile) -> None:
    odd = PatientFacts(
        patient_id="p1", last_name="O*BRIEN", first_name=None,
        birth_date=dt.date(1980, 1, 1), gender="M", member_id="M1",
    )
    with pytest.raises(X12DataError) as caught:
        build_837(draft(patient=odd), billing, 54, CREATED)
    assert "NM103" in str(caught.value)
    assert "O*BRIEN" not in str(caught.value)


def test_professional_line_needs_procedure_code(billing: BillingFile) -> None:
    no_code = lines((None, "1", "10.00"))
    with pytest.raises(X12DataError):
        build_837(draft(lines=no_code, total=Decimal("10.00")), billing, 55, CREATED)


class Charge:
    """The columns of a charge_lines row that service lines read."""

    def __init__(self, id, hcpcs, amount, units="1", revenue_code="0300", day=SERVED):
        self.id = id
        self.hcpcs = hcpcs
        self.amount = Decimal(amount)
        self.units = Decimal(units)
        self.revenue_code = revenue_code
        self.service_date = day


def test_service_lines_net_credits() -> None:
    charges = [
        Charge(1, "85025", "40.00"),
        Charge(2, "85025", "40.00"),
        Charge(3, "85025", "-40.00"),
        Charge(4, "99213", "135.50"),
        Charge(5, "87536", "20.00"),
        Charge(6, "87536", "-20.00"),
    ]
    result = service_lines(charges)
    assert [(l.procedure_code, l.units, l.amount) for l in result] == [
        ("85025", Decimal(1), Decimal("40.00")),
        ("99213", Decimal(1), Decimal("135.50")),
    ]
    assert result[0].charge_line_ids == (1, 2, 3)
    assert [l.line_no for l in result] == [1, 2]
