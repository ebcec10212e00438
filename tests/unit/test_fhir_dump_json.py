"""``dump_json`` writes each Decimal exactly as it was parsed, wherever it is."""

from __future__ import annotations

import json
from decimal import Decimal

from carebridge.api.fhir.resources import dump_json, read_body


def test_decimals_keep_their_text() -> None:
    document = {"resourceType": "Claim", "total": {"value": Decimal("154.80")},
                "item": [{"net": {"value": Decimal("0.30")}}, {"factor": Decimal("1E+2")},
                         {"net": {"value": Decimal("-0.000")}}]}
    assert dump_json(document) == (b'{"resourceType":"Claim","total":{"value":154.80},'
                                   b'"item":[{"net":{"value":0.30}},{"factor":1E+2},'
                                   b'{"net":{"value":-0.000}}]}')


def test_strings_beside_decimals_unchanged() -> None:
    document = {"resourceType": "Basic", "note": 'say "135.50"', "amount": Decimal("135.50"),
                "text": "Grüße", "list": ['"', Decimal(2), '""']}
    written = dump_json(document)
    assert written.decode("utf-8") == ('{"resourceType":"Basic","note":"say \\"135.50\\"",'
                                       '"amount":135.50,"text":"Grüße","list":["\\"",2,"\\"\\""]}')


def test_round_trip_through_read_body() -> None:
    raw = (b'{"resourceType":"Observation","valueQuantity":{"value":72.50},'
           b'"component":[{"valueQuantity":{"value":0.1000}}]}')
    assert dump_json(read_body(raw)) == raw
    assert json.loads(dump_json(read_body(raw)), parse_float=Decimal)["valueQuantity"] == {
        "value": Decimal("72.50")}
