"""FHIR JSON parsing, R4B validation and Claim amounts."""

from __future__ import annotations

import json
from decimal import Decimal
from importlib import resources
from pathlib import Path

import pytest

from carebridge.errors import ParseError
from carebridge.ingest.fhir import claim_amounts, load_fhir_json, parse_fhir_json

SYNTHEA_FHIR = Path(str(resources.files("carebridge") / "demo/data/synthea/fhir"))

# A professional claim with three priced items; amounts carry trailing zeros.
CLAIM_TEMPLATE = """{
  "resourceType": "Claim", "id": "clm-0021", "status": "active",
  "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type",
                       "code": "professional"}]},
  "use": "claim", "patient": {"reference": "Patient/pat-0021"}, "created": "2024-05-01",
  "provider": {"reference": "Organization/org-0021"},
  "priority": {"coding": [
    {"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}]},
  "insurance": [
    {"sequence": 1, "focal": true, "coverage": {"reference": "Coverage/cov-0021"}}],
  "item": [
    {"sequence": 1, "productOrService": {"coding": [
       {"system": "http://www.ama-assn.org/go/cpt", "code": "99213"}]},
     "unitPrice": {"value": UNIT_PRICE, "currency": "USD"},
     "net": {"value": 135.50, "currency": "USD"}},
    {"sequence": 2, "productOrService": {"coding": [{"system": "urn:example:supply",
                                                     "code": "SUP1001"}]},
     "quantity": {"value": 3}, "unitPrice": {"value": 0.10, "currency": "USD"},
     "net": {"value": 0.30, "currency": "USD"}},
    {"sequence": 3, "productOrService": {"coding": [{"system": "urn:example:supply",
                                                     "code": "SUP2002"}]},
     "unitPrice": {"value": 19.00, "currency": "USD"},
     "net": {"value": 19.00, "currency": "USD"}}
  ],
  "total": {"value": 154.80, "currency": "USD"}
}"""


def claim_bytes(unit_price: str = "135.50") -> bytes:
    return CLAIM_TEMPLATE.replace("UNIT_PRICE", unit_price).encode()


# --- decimal precision ---


def test_claim_amounts_keep_scale() -> None:
    items, total = claim_amounts(load_fhir_json(claim_bytes()))
    assert [str(net) for net in items] == ["135.50", "0.30", "19.00"]
    assert str(total) == "154.80"


def test_claim_items_sum_to_total() -> None:
    items, total = claim_amounts(load_fhir_json(claim_bytes()))
    assert sum(items, Decimal(0)) == total
    assert Decimal(3) * Decimal("0.10") == items[1]


def test_unit_price_decimal_type() -> None:
    claim = load_fhir_json(claim_bytes())
    unit_price = claim["item"][0]["unitPrice"]["value"]
    assert isinstance(unit_price, Decimal)
    assert str(unit_price) == "135.50"


def test_grouped_thousands_rejected() -> None:
    with pytest.raises(ParseError) as caught:
        load_fhir_json(claim_bytes('"1,000.00"'))
    assert caught.value.location == "Claim.item[0].unitPrice.value"
    assert "'1,000.00'" in str(caught.value)


def test_decimal_as_string_rejected() -> None:
    with pytest.raises(ParseError) as caught:
        load_fhir_json(claim_bytes('"135.50"'))
    assert caught.value.location == "Claim.item[0].unitPrice.value"
    assert "expected a JSON number" in str(caught.value)


def test_grouped_thousands_rejected_unvalidated() -> None:
    claim = load_fhir_json(claim_bytes('"1,000.00"'), validate=False)
    with pytest.raises(ParseError) as caught:
        claim_amounts({"item": [{"unitPrice": claim["item"][0]["unitPrice"]}]})
    assert caught.value.location == "Claim.item[0].unitPrice.value"


def test_claim_amounts_rejects_float() -> None:
    claim = json.loads(claim_bytes())
    with pytest.raises(ParseError, match="parsed as a float") as caught:
        claim_amounts(claim)
    assert caught.value.location == "Claim.item[0].net.value"


def test_claim_net_computed_from_unit_price() -> None:
    claim = load_fhir_json(claim_bytes())
    del claim["item"][1]["net"]
    items, _ = claim_amounts(claim)
    assert str(items[1]) == "0.30"


def test_claim_item_without_amount_raises() -> None:
    claim = load_fhir_json(claim_bytes())
    del claim["item"][2]["net"]
    del claim["item"][2]["unitPrice"]
    with pytest.raises(ParseError) as caught:
        claim_amounts(claim)
    assert caught.value.location == "Claim.item[2]"


def test_claim_without_total() -> None:
    claim = load_fhir_json(claim_bytes())
    del claim["total"]
    assert claim_amounts(claim)[1] is None


# --- JSON syntax ---


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"resourceType": "Claim", "total": {"value": NaN}}', "NaN"),
        (
            b'{"resourceType": "Claim", "id": "a", "id": "b"}',
            "duplicate JSON property 'id'",
        ),
        (b'{"resourceType": "Claim",', "invalid JSON at line 1"),
        (b"[1, 2]", "must be an object"),
        (b'{"id": "x"}', "missing resourceType"),
        (b'{"resourceType": "Claim", "id": "\xff"}', "not valid UTF-8"),
    ],
)
def test_malformed_json_raises(raw: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_fhir_json(raw)


# --- R4B validation ---


def test_boolean_as_string_rejected() -> None:
    with pytest.raises(ParseError) as caught:
        load_fhir_json(b'{"resourceType": "Patient", "active": "true"}')
    assert caught.value.location == "Patient.active"


@pytest.mark.parametrize(("raw", "location"), [
    (b'{"resourceType": "Patient", "multipleBirthInteger": "2"}',
     "Patient.multipleBirthInteger"),
    (b'{"resourceType": "Patient", "deceasedBoolean": "false"}', "Patient.deceasedBoolean"),
    ((b'{"resourceType": "Observation", "status": "final", "code": {"text": "x"},'
      b' "valueQuantity": {"value": "7.2"}}'), "Observation.valueQuantity.value"),
    ((b'{"resourceType": "Bundle", "type": "collection", "entry": [{"resource":'
      b' {"resourceType": "Patient", "active": "true"}}]}'),
     "Bundle.entry[0].resource.active"),
    (b'{"resourceType": "Bundle", "type": "collection", "total": "1"}', "Bundle.total"),
])
def test_number_as_string_rejected(raw: bytes, location: str) -> None:
    with pytest.raises(ParseError) as caught:
        load_fhir_json(raw)
    assert caught.value.location == location
    assert "expected a JSON" in str(caught.value)


def test_unknown_element_rejected() -> None:
    with pytest.raises(ParseError) as caught:
        load_fhir_json(b'{"resourceType": "Patient", "colour": "blue"}')
    assert caught.value.location == "Patient.colour"


def test_unknown_resource_type_rejected() -> None:
    with pytest.raises(ParseError, match="unknown FHIR resource type 'Invoicee'"):
        load_fhir_json(b'{"resourceType": "Invoicee"}')


def test_bundle_injected_bad_resource_located() -> None:
    path = sorted(SYNTHEA_FHIR.glob("Temika453_*.json"))[0]
    bundle = json.loads(path.read_bytes())
    index = next(
        i
        for i, e in enumerate(bundle["entry"])
        if e["resource"]["resourceType"] == "Procedure"
    )
    bundle["entry"][index]["resource"]["performedPeriod"]["start"] = (
        "2016-02-30T10:00:00Z"
    )
    with pytest.raises(ParseError) as caught:
        load_fhir_json(json.dumps(bundle).encode())
    assert caught.value.location == (
        f"Bundle.entry[{index}].resource.performedPeriod.start"
    )
    assert "invalid Procedure" in str(caught.value)


@pytest.mark.parametrize(
    ("envelope", "location"),
    [('"total": "3"', "Bundle.total"), ('"entries": []', "Bundle.entries")],
)
def test_bundle_envelope_validated(envelope: str, location: str) -> None:
    raw = '{"resourceType": "Bundle", "type": "searchset", ' + envelope + "}"
    with pytest.raises(ParseError) as caught:
        load_fhir_json(raw.encode())
    assert caught.value.location == location


@pytest.mark.parametrize("name", sorted(p.name for p in SYNTHEA_FHIR.glob("*.json")))
def test_synthea_bundle_validates(name: str) -> None:
    bundle = load_fhir_json((SYNTHEA_FHIR / name).read_bytes())
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "transaction"
