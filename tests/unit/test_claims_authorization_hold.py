"""The billing-readiness check names why a listed service is not authorized."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

from carebridge.claims.readiness import _unauthorized
from carebridge.model.codes import CPT

VISIT = dt.date(2021, 10, 5)


class FixedLookup:
    """A lookup that returns one state for every service and records each request."""

    def __init__(self, state: str) -> None:
        self.state = state
        self.requested: list[tuple[str, str, dt.date]] = []

    def status(self, conn, *, encounter_id, patient_id, system, code, service_date) -> str:
        self.requested.append((system, code, service_date))
        return self.state


def facts(*hcpcs: str) -> SimpleNamespace:
    charges = [SimpleNamespace(charge_code=f"CDM{code}", hcpcs=code, service_date=VISIT)
               for code in hcpcs]
    return SimpleNamespace(encounter_id="E1", encounter=SimpleNamespace(patient_id="P1"),
                           charges=charges)


BILLING = SimpleNamespace(authorization_required=frozenset({(CPT, "99213")}))


def test_used_up_units_are_named() -> None:
    lookup = FixedLookup("exhausted")
    missing = _unauthorized(None, facts("99213", "85025"), BILLING, lookup)
    assert missing == ["CPT 99213 (its authorized units are used up)"]
    assert lookup.requested == [(CPT, "99213", VISIT)]


def test_approved_service_is_not_held() -> None:
    assert _unauthorized(None, facts("99213"), BILLING, FixedLookup("approved")) == []


def test_each_state_has_its_own_words() -> None:
    words = {state: _unauthorized(None, facts("99213"), BILLING, FixedLookup(state))[0]
             for state in ("missing", "pending", "expired")}
    assert words == {
        "missing": "CPT 99213 (none on record)",
        "pending": "CPT 99213 (waiting for the payer's decision)",
        "expired": "CPT 99213 (expired before the service date)",
    }
