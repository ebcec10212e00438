"""Data for the web UI tests: demo messages run through the engine, with dead letters.

:func:`load_ui_data` stores and processes the bundled HL7 v2 samples (and,
on request, the Synthea CSV export) plus one DFT^P03 whose CPT code is
unknown, posts journals and delivers them once to a destination that
fails, so every delivery is a dead letter. It also opens one
procurement approval and creates a client per role.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, select

from carebridge.api.security import create_client, parse_roles
from carebridge.config.model import Configuration, DestinationConfig
from carebridge.engine.deliveries import run_deliveries
from carebridge.engine.job import JobOptions, run_job
from carebridge.store.schema import approvals, messages, work_items
from carebridge.workflows.procurement import RequestDraft, create_request

from .conftest import DEMO, hl7

UNKNOWN_CPT_DFT = hl7(
    "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240501120000||DFT^P03|CTLWEB1|P|2.5",
    "EVN|P03|20240501120000",
    "PID|1||MRNWEB1^^^SENDFAC^MR||TESTPATIENT^SIGMA",
    "PV1|1|O|CLINIC1||||||||||||||||VISWEB1",
    "FT1|1|TXNWEB1||20240501|20240501|CG|99999^UNKNOWN VISIT^CPT|||1|135.50&USD|135.50&USD",
)
"""A charge whose CPT code is not in the crosswalk: an unknown_code work item.
Replacing 99999 with 99213 makes it chargeable at 135.50."""

NEXT_DAY_DFT = hl7(
    "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240502120000||DFT^P03|CTLWEB2|P|2.5",
    "EVN|P03|20240502120000",
    "PID|1||MRNWEB2^^^SENDFAC^MR||TESTPATIENT^TAU",
    "PV1|1|O|CLINIC1||||||||||||||||VISWEB2",
    "FT1|1|TXNWEB2||20240502|20240502|CG|99213^OFFICE VISIT EST^CPT|||1|135.50&USD",
)
"""A chargeable visit on another day, so that there are two journals to deliver."""

THIRD_DAY_DFT = hl7(
    "MSH|^~\\&|CHGSYS|SENDFAC|FINAPP|RCVFAC|20240503120000||DFT^P03|CTLWEB3|P|2.5",
    "EVN|P03|20240503120000",
    "PID|1||MRNWEB3^^^SENDFAC^MR||TESTPATIENT^UPSILON",
    "PV1|1|O|CLINIC1||||||||||||||||VISWEB3",
    "FT1|1|TXNWEB3||20240503|20240503|CG|99213^OFFICE VISIT EST^CPT|||1|135.50&USD",
)
"""A third day's visit, so the tests' own charges make two journals. The
demo's 2019 charge depends on which of two patients claims a shared visit
number first, and lanes of different patients run in no fixed order."""


ROLES = ("admin", "integration-analyst", "revenue-cycle", "supply-chain", "finance",
         "auditor")


@dataclass
class UiData:
    """What the tests act on: ids of the prepared records and a secret per role."""

    config: Configuration
    unknown_code_item: int
    procurement_item: int
    secrets: dict[str, str]


def with_destination(config: Configuration, url: str) -> Configuration:
    """Return ``config`` delivering journals to ``url``, giving up after one attempt."""
    destination = DestinationConfig(
        "erp", "http", ("journal",), {"url": url, "timeout_seconds": 2.0},
        max_attempts=1, circuit_failure_threshold=100_000, batch_size=1000,
    )
    return dataclasses.replace(config, destinations=(destination,))


def open_procurement_approval(engine: Engine, config: Configuration, message_id: int) -> int:
    """Raise a real procurement request and return its first approval step's work item."""
    draft = RequestDraft(
        request_key="web-test-1", origin="web-test", department="CLINIC", location="CLINIC",
        category="medical_surgical", item_code="SUP-100232", quantity=Decimal(100),
        requested_on=dt.date.today(), requested_by="client:buyer",
        message_id=message_id, supplier="MEDLINE",
    )
    with engine.begin() as conn:
        request_id = create_request(conn, config, draft)
        return conn.execute(
            select(approvals.c.work_item_id).where(approvals.c.request_id == request_id)
            .order_by(approvals.c.step_no)
        ).scalars().first()


def load_ui_data(engine: Engine, config: Configuration, tmp_path: Path, url: str, *,
                 synthea: bool = False) -> UiData:
    """Run the demo inputs into ``engine``; every delivery to ``url`` must fail once."""
    config = with_destination(config, url)
    dft = tmp_path / "web-charges.hl7"
    dft.write_bytes(UNKNOWN_CPT_DFT + NEXT_DAY_DFT + THIRD_DAY_DFT)
    paths = [DEMO / "data" / "hl7v2", dft]
    if synthea:
        paths.append(DEMO / "data" / "synthea" / "csv")
    run_job(engine, config, JobOptions(paths=paths, out_dir=tmp_path / "out"))
    run_deliveries(engine, config, owner="web-test")
    with engine.connect() as conn:
        message_id = conn.execute(select(messages.c.id).where(
            messages.c.dedup_key.like("%|CTLWEB1"))).scalar_one()
        item_id = conn.execute(select(work_items.c.id).where(
            work_items.c.message_id == message_id,
            work_items.c.reason == "unknown_code")).scalar_one()
    procurement = open_procurement_approval(engine, config, message_id)
    secrets = {role: create_client(engine, role, parse_roles(role)).client_secret
               for role in ROLES}
    return UiData(config, item_id, procurement, secrets)
