"""A Tryton ERP destination: journals, supply issues, purchase orders and claims over JSON-RPC.

Deliveries arrive in batches (``send_batch``, about 100 per claim), so a
batch makes a handful of JSON-RPC calls in all instead of several per
record. On 2 cores with trytond 8.2.1 this sends about 30 records/s against
about 3 records/s one at a time (benchmarks/tryton.py, docs/erp-tryton.md).
Per batch and kind:

* ``journal``: one ``account.move`` per carebridge journal, in the
  configured journal (``MISC`` by default), dated with the posting date and
  in the period that contains it. Lines are summarized per account, cost
  center and side. Lines on income-statement accounts carry an analytic
  line on the cost center's analytic account. The move is posted.
* ``supply_issue``: one ``stock.move`` of the item from the storage location
  (``STO``) to the consumption location (``PCON``, type production), dated
  with the service date. The carebridge module's ``stock.move.issue``
  method then assigns and does it, because trytond 8.2 exposes no way to
  assign a bare move over RPC.
* ``purchase_order``: one ``purchase.purchase`` per carebridge purchase
  order, from the supplier's party (found by its code or a party
  identifier) to the configured warehouse (``WH``), dated with the order
  date, with ``reference`` set to the PO number and one line per order
  line. The batch is quoted, then confirmed, so Tryton creates the draft
  incoming stock moves and the order is ``processing`` (``confirmed`` if
  Tryton's queue has not processed it yet).
* ``claim``: one customer ``account.invoice`` per released claim, to the
  payer's party (found like a supplier), posted, and one ``account.move``
  that clears the invoice lines' account into carebridge's receivable
  account, so the claim moves from unbilled to billed receivables and no
  revenue is booked twice. A replacement claim first gets a credit note for
  the invoice it replaces. See :meth:`TrytonDestination._send_claims` and
  docs/erp-tryton.md.

Each document carries the delivery's idempotency key in ``external_ref``,
which carebridge's Tryton module makes unique per company. A batch first
looks its keys up: a key found posted, done or (for a purchase) confirmed
is delivered, and a key found earlier in its workflow (a draft move, a
draft or quoted purchase) is finished. Only the missing ones are created.
If a create fails because another worker created some of the keys
meanwhile, the lookup runs again. If it fails on the data, the batch is
sent one record at a time so that only the bad record goes dead, with
Tryton's message as the reason.

Connection errors, timeouts, HTTP 5xx and server exceptions are retried.
Tryton's ``UserError`` (a missing period, an unknown account or item, short
stock) is permanent, and so is a record carebridge cannot map (an unknown
supplier or payer, a currency other than the company's). Such a delivery goes to
the dead letters, where it stays until a person fixes the data in Tryton
and replays it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from carebridge.destinations.registry import (
    DestinationType,
    Outbound,
    SendResult,
    Verdict,
    register,
)
from carebridge.erp.rpc import (
    TrytonClient,
    TrytonUnavailable,
    TrytonUserError,
)

log = logging.getLogger(__name__)

DETAIL_LIMIT = 300
INCOME_STATEMENT = "income"
UNIT_PRICE = Decimal("0.0001")
"""Tryton's default precision of unit prices on invoice lines."""
CREDIT = ":credit"
"""Appended to a replaced claim's invoice key to make its credit note's key."""
CLEARING = ":clearing"
"""Appended to an invoice's or credit note's key to make its clearing move's key."""

_CLIENTS: dict[tuple[Any, ...], TrytonClient] = {}


class TrytonSettings(BaseModel):
    """``settings:`` of a destination of type ``tryton``.

    The password is read from the environment variable ``password_env`` or
    from ``password_file``, never from carebridge.yaml. ``account_codes``,
    ``cost_center_codes``, ``item_codes`` and ``supplier_codes`` map
    carebridge codes to Tryton's where they differ; an unmapped code is
    looked up as is. A supplier code is a party's code or the code of one of
    its identifiers. ``warehouse`` is the code of the warehouse location
    that purchase orders deliver to.

    Claim invoices use the journal ``invoice_journal``, the payer's party
    (its code is the payer id, or the code mapped in ``payer_codes``), the
    billed receivable ``invoice_receivable_account`` (by default the payer's
    receivable account, else the company's default one) and the
    revenue-type clearing account ``invoice_clearing_account`` on their
    lines. These three are Tryton codes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)
    database: str = Field(min_length=1)
    user: str = Field(default="admin", min_length=1)
    password_env: str | None = Field(default=None, min_length=1)
    password_file: str | None = Field(default=None, min_length=1)
    timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    journal: str = Field(default="MISC", min_length=1)
    storage_location: str = Field(default="STO", min_length=1)
    consumption_location: str = Field(default="PCON", min_length=1)
    warehouse: str = Field(default="WH", min_length=1)
    account_codes: dict[str, str] = Field(default_factory=dict)
    cost_center_codes: dict[str, str] = Field(default_factory=dict)
    item_codes: dict[str, str] = Field(default_factory=dict)
    supplier_codes: dict[str, str] = Field(default_factory=dict)
    payer_codes: dict[str, str] = Field(default_factory=dict)
    invoice_journal: str = Field(default="REV", min_length=1)
    invoice_receivable_account: str | None = Field(default=None, min_length=1)
    invoice_clearing_account: str = Field(default="CB-CLAIMS", min_length=1)

    @model_validator(mode="after")
    def _one_password_source(self) -> TrytonSettings:
        if (self.password_env is None) == (self.password_file is None):
            raise ValueError("set exactly one of password_env and password_file")
        return self

    def password(self) -> str:
        """Read the password from its environment variable or file.

        Raises:
            PasswordUnavailable: The variable is unset or the file cannot be read.
        """
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise PasswordUnavailable(
                    f"environment variable {self.password_env} is not set; set it to "
                    "the Tryton user's password"
                )
            return value
        assert self.password_file is not None
        try:
            return Path(self.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise PasswordUnavailable(
                f"cannot read password_file {self.password_file}: {exc.strerror}"
            ) from exc


class PasswordUnavailable(Exception):
    """The destination's password cannot be read (variable unset, file unreadable)."""


class _Rejected(Exception):
    """A record carebridge cannot map to Tryton (unknown code, no period)."""


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One delivery turned into the values of the Tryton record to create."""

    outbound: Outbound
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Document:
    """An invoice or credit note of a claim: what its clearing move needs."""

    date: dt.date
    amount: Decimal
    """The signed total: positive for an invoice, negative for a credit note."""
    party: int
    receivable_account: str
    """carebridge's receivable account code, which the clearing move credits."""
    description: str


_Finish = Callable[[TrytonClient, dict[int, str]], None]
"""A call that moves records, given as {id: state}, to their finished state."""


@dataclass(frozen=True, slots=True)
class _Workflow:
    """The finishing step of one kind's records, and the states that count as delivered.

    A record found in one of ``delivered_states`` is delivered. Any other
    record is passed to ``finish``, which leaves it in ``finished_state``.
    When ``finishable_states`` is set, a record in a state outside both sets
    (a cancelled purchase) goes dead instead, because carebridge can neither
    finish it nor create it again under the same key.
    """

    model: str
    finish: _Finish
    delivered_states: frozenset[str]
    finished_state: str
    finishable_states: frozenset[str] | None = None


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 3] + "..."


def _decimal(value: Any, field: str) -> Decimal:
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise _Rejected(f"invalid {field} {value!r}: not a number") from None


def _date(value: Any, field: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise _Rejected(f"invalid {field} {value!r}: not an ISO date") from None


def _prepare(
    items: list[Outbound], build: Callable[[Outbound], dict[str, Any]]
) -> tuple[list[_Prepared], dict[int, SendResult]]:
    """Build each delivery's values; a payload that cannot be mapped goes dead."""
    prepared: list[_Prepared] = []
    rejected: dict[int, SendResult] = {}
    for item in items:
        try:
            prepared.append(_Prepared(item, build(item)))
        except _Rejected as exc:
            rejected[item.delivery_id] = SendResult(Verdict.DEAD, _short(str(exc)))
        except (KeyError, TypeError, ValueError) as exc:
            reason = f"invalid payload: {type(exc).__name__} {exc}"
            rejected[item.delivery_id] = SendResult(Verdict.DEAD, _short(reason))
    return prepared, rejected


def _post_moves(client: TrytonClient, records: dict[int, str]) -> None:
    client.model("account.move", "post", list(records))


def _issue_moves(client: TrytonClient, records: dict[int, str]) -> None:
    client.model("stock.move", "issue", list(records))


def _confirm_purchases(client: TrytonClient, records: dict[int, str]) -> None:
    # A purchase goes draft -> quotation -> confirmed. Tryton skips a record
    # a transition does not apply to, so a purchase quoted by an earlier
    # attempt is only confirmed. Confirming queues Tryton's ``process``,
    # which creates the incoming stock moves and sets the state to
    # processing. Without a queue worker, trytond runs it as soon as the
    # call has committed.
    drafts = [record for record, state in records.items() if state == "draft"]
    if drafts:
        client.model("purchase.purchase", "quote", drafts)
    client.model("purchase.purchase", "confirm", list(records))


def _post_invoices(client: TrytonClient, records: dict[int, str]) -> None:
    # Tryton 8.2 posts a draft invoice directly: validate_invoice is an
    # optional step (it numbers supplier invoices only).
    client.model("account.invoice", "post", list(records))


MOVES = _Workflow("account.move", _post_moves, frozenset({"posted"}), "posted")
ISSUES = _Workflow("stock.move", _issue_moves, frozenset({"done"}), "done")
INVOICES = _Workflow(
    "account.invoice",
    _post_invoices,
    frozenset({"posted", "paid"}),
    "posted",
    finishable_states=frozenset({"draft", "validated"}),
)
PURCHASES = _Workflow(
    "purchase.purchase",
    _confirm_purchases,
    frozenset({"confirmed", "processing", "done"}),
    "confirmed",
    finishable_states=frozenset({"draft", "quotation"}),
)


class TrytonDestination:
    """Delivers journals, supply issues, purchase orders and claims to one Tryton database."""

    def __init__(self, name: str, settings: TrytonSettings) -> None:
        self.name = name
        self.settings = settings
        self._client: TrytonClient | None = None
        self._accounts: dict[str, tuple[int, bool]] = {}
        self._cost_centers: dict[str, int] = {}
        self._products: dict[str, tuple[int, int]] = {}
        self._periods: list[tuple[dt.date, dt.date, int]] = []
        self._locations: dict[str, int] = {}
        self._journal: int | None = None
        self._company_currency: str | None = None
        self._company_currency_id: int | None = None
        self._parties: dict[str, tuple[int, int | None]] = {}
        self._shared_identifiers: dict[str, list[int]] = {}
        self._warehouse: int | None = None
        self._party_accounts: set[int] = set()
        self._receivables: dict[int, int] = {}
        self._default_receivable: int | None = None
        self._invoice_journal: int | None = None
        self._unit: int | None = None

    @classmethod
    def build(cls, name: str, settings: BaseModel) -> TrytonDestination:
        """Build from validated settings (the registry's constructor)."""
        if not isinstance(settings, TrytonSettings):
            raise TypeError(f"expected TrytonSettings, got {type(settings).__name__}")
        return cls(name, settings)

    # --------------------------------------------------------------- entry

    def send(self, outbound: Outbound) -> SendResult:
        """Deliver one record; see :meth:`send_batch`."""
        return self.send_batch([outbound])[0]

    def send_batch(self, outbounds: Sequence[Outbound]) -> list[SendResult]:
        """Deliver ``outbounds`` with a few calls per kind; return one result each."""
        results: dict[int, SendResult] = {}
        by_kind: dict[str, list[Outbound]] = defaultdict(list)
        for outbound in outbounds:
            by_kind[outbound.kind].append(outbound)
        try:
            client = self._connect()
            for kind, items in by_kind.items():
                handler = self._handlers().get(kind)
                if handler is None:
                    for item in items:
                        results[item.delivery_id] = SendResult(
                            Verdict.DEAD, f"kind {kind!r} is not delivered to Tryton"
                        )
                    continue
                results.update(handler(client, items))
        except TrytonUnavailable as exc:
            # Tryton is down or failed mid-batch. Whatever it committed is
            # found by its key on the next attempt.
            detail = _short(str(exc))
            log.info(
                "Tryton unavailable",
                extra={
                    "action": "tryton_unavailable",
                    "destination": self.name,
                    "deliveries": len(outbounds),
                },
            )
            for outbound in outbounds:
                results.setdefault(
                    outbound.delivery_id, SendResult(Verdict.RETRY, detail)
                )
        except PasswordUnavailable as exc:
            # A set-up fault that a person fixes, after which the deliveries
            # must still go out, so they wait instead of going dead.
            log.warning(
                "Tryton password unavailable",
                extra={"action": "tryton_password_missing", "destination": self.name},
            )
            for outbound in outbounds:
                results.setdefault(
                    outbound.delivery_id, SendResult(Verdict.RETRY, str(exc))
                )
        return [results[outbound.delivery_id] for outbound in outbounds]

    def _handlers(
        self,
    ) -> dict[str, Callable[[TrytonClient, list[Outbound]], dict[int, SendResult]]]:
        return {
            "journal": self._send_journals,
            "supply_issue": self._send_issues,
            "purchase_order": self._send_purchases,
            "claim": self._send_claims,
        }

    def _connect(self) -> TrytonClient:
        if self._client is None:
            settings = self.settings
            key = (
                settings.host,
                settings.port,
                settings.database,
                settings.user,
                settings.password(),
                settings.timeout_seconds,
            )
            # The engine builds a destination per delivery pass; sharing the
            # client keeps its session, so a pass costs no login.
            client = _CLIENTS.get(key)
            if client is None:
                client = TrytonClient(*key[:5], timeout=settings.timeout_seconds)
                _CLIENTS[key] = client
            self._client = client
        return self._client

    # ------------------------------------------------------------ journals

    def _send_journals(
        self, client: TrytonClient, items: list[Outbound]
    ) -> dict[int, SendResult]:
        self._prefetch_journal_codes(client, items)
        prepared, results = _prepare(
            items, lambda item: self._move_values(client, item)
        )
        results.update(self._deliver(client, MOVES, prepared))
        return results

    def _move_values(self, client: TrytonClient, item: Outbound) -> dict[str, Any]:
        payload = json.loads(item.payload)
        journal = payload["journal"]
        date = _date(journal["posting_date"], "posting_date")
        company = self._company(client)
        if journal["currency"] != self._company_currency:
            raise _Rejected(
                f"journal currency {journal['currency']} differs from the Tryton "
                f"company currency {self._company_currency}"
            )

        lines = self._summarized_lines(client, payload["lines"], date)
        return {
            "company": company,
            "journal": self._journal_id(client),
            "period": self._period(client, date),
            "date": date,
            "description": f"carebridge journal {journal['journal_key']}",
            "external_ref": item.idempotency_key,
            "lines": [["create", lines]],
        }

    def _summarized_lines(
        self, client: TrytonClient, journal_lines: list[dict[str, Any]], date: dt.date
    ) -> list[dict[str, Any]]:
        """Return one Tryton move line per account, cost center and side."""
        sums: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
        for line in journal_lines:
            debit = _decimal(line["debit"], "debit")
            credit = _decimal(line["credit"], "credit")
            if debit:
                sums[(line["account"], line["cost_center"], "debit")] += debit
            if credit:
                sums[(line["account"], line["cost_center"], "credit")] += credit

        move_lines = []
        for (account_code, cost_center, side), amount in sorted(sums.items()):
            account, income = self._account(client, account_code)
            debit = amount if side == "debit" else Decimal(0)
            credit = amount if side == "credit" else Decimal(0)
            move_line: dict[str, Any] = {
                "account": account,
                "debit": debit,
                "credit": credit,
            }
            if income:
                # Cost accounting covers the income statement, so revenue and
                # expense lines carry the cost center and balance-sheet lines
                # do not.
                analytic = {
                    "account": self._cost_center(client, cost_center),
                    "debit": debit,
                    "credit": credit,
                    "date": date,
                }
                move_line["analytic_lines"] = [["create", [analytic]]]
            move_lines.append(move_line)
        return move_lines

    def _prefetch_journal_codes(
        self, client: TrytonClient, items: list[Outbound]
    ) -> None:
        """Look up the batch's accounts, cost centers and periods in three calls."""
        accounts: set[str] = set()
        cost_centers: set[str] = set()
        dates: list[dt.date] = []
        for item in items:
            try:
                payload = json.loads(item.payload)
                dates.append(dt.date.fromisoformat(payload["journal"]["posting_date"]))
                for line in payload["lines"]:
                    accounts.add(
                        self.settings.account_codes.get(
                            line["account"], line["account"]
                        )
                    )
                    cost_centers.add(
                        self.settings.cost_center_codes.get(
                            line["cost_center"], line["cost_center"]
                        )
                    )
            except (ValueError, KeyError, TypeError):
                continue  # reported for that delivery when its values are built
        self._load_accounts(client, sorted(accounts - set(self._accounts)))
        self._load_cost_centers(client, sorted(cost_centers - set(self._cost_centers)))
        if dates:
            self._load_periods(client, min(dates), max(dates))

    def _company(self, client: TrytonClient) -> int:
        """Return the login user's current company and note its currency code."""
        company = client.context.get("company")
        if not company:
            # A set-up fault in Tryton: deliveries wait until it is fixed.
            raise TrytonUnavailable(
                f"the Tryton user {client.user!r} has no current company"
            )
        if self._company_currency is None:
            rows = client.search_read(
                "company.company", [("id", "=", company)], ["currency", "currency.code"]
            )
            self._company_currency_id = rows[0]["currency"]
            self._company_currency = (rows[0].get("currency.") or {}).get("code")
        return company

    # -------------------------------------------------------- supply issues

    def _send_issues(
        self, client: TrytonClient, items: list[Outbound]
    ) -> dict[int, SendResult]:
        prepared, results = _prepare(
            items, lambda item: self._stock_move_values(client, item)
        )
        results.update(self._deliver(client, ISSUES, prepared))
        return results

    def _stock_move_values(
        self, client: TrytonClient, item: Outbound
    ) -> dict[str, Any]:
        issue = json.loads(item.payload)["issue"]
        date = _date(issue["service_date"], "service_date")
        quantity = _decimal(issue["quantity"], "quantity")
        if quantity <= 0:
            raise _Rejected(f"invalid quantity {quantity}: not positive")
        product, unit = self._product(client, issue["item_code"])
        return {
            "product": product,
            "unit": unit,
            # stock.move.quantity is a float field in trytond 8.2.
            "quantity": float(quantity),
            "from_location": self._location(client, self.settings.storage_location),
            "to_location": self._location(client, self.settings.consumption_location),
            "company": self._company(client),
            "planned_date": date,
            "effective_date": date,
            "external_ref": item.idempotency_key,
        }

    # ------------------------------------------------------ purchase orders

    def _send_purchases(
        self, client: TrytonClient, items: list[Outbound]
    ) -> dict[int, SendResult]:
        self._prefetch_parties(client, items, "purchase_order", "supplier",
                               self.settings.supplier_codes)
        prepared, results = _prepare(
            items, lambda item: self._purchase_values(client, item)
        )
        results.update(self._deliver(client, PURCHASES, prepared))
        return results

    def _purchase_values(self, client: TrytonClient, item: Outbound) -> dict[str, Any]:
        """Return the values of a ``purchase.purchase`` and its lines.

        Raw RPC runs no on_change, so every field that Tryton's client would
        fill in is sent: the supplier's invoice address, the warehouse, the
        company's currency and each line's unit.

        The invoice method is ``manual``. With ``order`` Tryton creates the
        supplier invoice when the purchase is confirmed, and with
        ``fulfillment`` when the goods are received. Both need an expense
        account on each product's category and a payable account on the
        supplier, which the demo's products and parties do not have. The
        supplier's bill is accounts payable's work in any case: they create
        the invoice from the purchase with Tryton's "Manual Invoice" button
        when it arrives.
        """
        order = json.loads(item.payload)["purchase_order"]
        po_number = order["po_number"]
        company = self._company(client)
        if order["currency"] != self._company_currency:
            raise _Rejected(
                f"purchase order {po_number} currency {order['currency']} differs "
                f"from the Tryton company currency {self._company_currency}; post it "
                "to a Tryton company in that currency"
            )
        party, address = self._party(
            client, order["supplier"], "supplier", "supplier_codes"
        )
        lines = []
        for line in order["lines"]:
            quantity = _decimal(line["quantity"], "quantity")
            if quantity <= 0:
                raise _Rejected(
                    f"purchase order {po_number} line {line['line_no']}: "
                    f"quantity {quantity} is not positive; correct the request and replay"
                )
            unit_price = _decimal(line["unit_price"], "unit_price")
            if unit_price < 0:
                raise _Rejected(
                    f"purchase order {po_number} line {line['line_no']}: "
                    f"unit price {unit_price} is negative; correct the item's cost and replay"
                )
            product, unit = self._product(client, line["item_code"])
            lines.append(
                {
                    "type": "line",
                    "sequence": int(line["line_no"]),
                    "product": product,
                    "unit": unit,
                    # purchase.line.quantity is a float field in trytond 8.2.
                    "quantity": float(quantity),
                    "unit_price": unit_price,
                    "description": line.get("description") or line["item_code"],
                }
            )
        if not lines:
            raise _Rejected(f"purchase order {po_number} has no lines")
        return {
            "company": company,
            "party": party,
            "invoice_address": address,
            "warehouse": self._warehouse_id(client),
            "currency": self._company_currency_id,
            "purchase_date": _date(order["order_date"], "order_date"),
            "reference": po_number,
            "description": (
                f"carebridge {po_number} (request {order['request_id']}, "
                f"{order['department']} for {order['location']})"
            ),
            "invoice_method": "manual",
            "external_ref": item.idempotency_key,
            "lines": [["create", lines]],
        }

    def _prefetch_parties(
        self, client: TrytonClient, items: list[Outbound], document: str, field: str,
        mapping: dict[str, str],
    ) -> None:
        """Look up the parties that ``items`` name, and their addresses, in two to three calls.

        ``document`` and ``field`` locate the party's code in each payload
        (``purchase_order.supplier``, ``claim.payer_id``), and ``mapping``
        turns it into the Tryton code.
        """
        codes: set[str] = set()
        for item in items:
            try:
                code = json.loads(item.payload)[document][field]
            except (ValueError, KeyError, TypeError):
                continue  # reported for that delivery when its values are built
            codes.add(mapping.get(code, code))
        known = set(self._parties) | set(self._shared_identifiers)
        self._load_parties(client, sorted(codes - known))

    def _load_parties(self, client: TrytonClient, codes: list[str]) -> None:
        """Find each code's party, by party code first, then by identifier code.

        Inactive parties and addresses are not found. The address is the
        party's first address marked for invoices, else its first address,
        as Tryton's ``address_get('invoice')`` picks it.
        """
        if not codes:
            return
        parties = {
            row["code"]: row["id"]
            for row in client.search_read(
                "party.party", [("code", "in", codes)], ["id", "code"]
            )
        }
        by_identifier = [code for code in codes if code not in parties]
        if by_identifier:
            owners: dict[str, set[int]] = defaultdict(set)
            for row in client.search_read(
                "party.identifier",
                [("code", "in", by_identifier), ("party.active", "=", True)],
                ["party", "code"],
            ):
                owners[row["code"]].add(row["party"])
            for code, found in owners.items():
                if len(found) == 1:
                    parties[code] = found.pop()
                else:
                    self._shared_identifiers[code] = sorted(found)
        if not parties:
            return
        addresses: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for row in client.search_read(
            "party.address",
            [("party", "in", sorted(set(parties.values())))],
            ["id", "party", "invoice"],
            order=[("party", "ASC"), ("sequence", "ASC"), ("id", "ASC")],
        ):
            addresses[row["party"]].append(row)
        for code, party in parties.items():
            rows = addresses.get(party, [])
            invoice = next((row for row in rows if row["invoice"]), None)
            chosen = invoice or (rows[0] if rows else None)
            self._parties[code] = (party, chosen["id"] if chosen else None)

    def _party(
        self, client: TrytonClient, code: str, role: str, setting: str
    ) -> tuple[int, int]:
        """Return the party and invoice address of a supplier or payer, or reject.

        ``role`` names the party in messages (``supplier``, ``payer``) and
        ``setting`` is the settings mapping from carebridge's codes to
        Tryton's (``supplier_codes``, ``payer_codes``).
        """
        mapping: dict[str, str] = getattr(self.settings, setting)
        tryton_code = mapping.get(code, code)
        if tryton_code not in self._parties and tryton_code not in self._shared_identifiers:
            self._load_parties(client, [tryton_code])
        named = code if tryton_code == code else f"{code} (Tryton code {tryton_code})"
        if tryton_code in self._shared_identifiers:
            owners = self._shared_identifiers[tryton_code]
            ids = ", ".join(str(party) for party in owners)
            raise _Rejected(
                f"{role} {named}: the identifier {tryton_code} belongs to "
                f"{len(owners)} Tryton parties (ids {ids}); map the {role} to one "
                f"party's code under {setting} in the destination's settings"
            )
        if tryton_code not in self._parties:
            raise _Rejected(
                f"{role} {named} is not a party in Tryton: no active party has "
                f"the code or an identifier {tryton_code}. Create the {role}'s "
                f"party in Tryton, or map the {role} to its party's code under "
                f"{setting} in the destination's settings, then replay"
            )
        party, address = self._parties[tryton_code]
        if address is None:
            raise _Rejected(
                f"{role} {named} (Tryton party id={party}) has no address; add "
                "an invoice address to the party in Tryton, then replay"
            )
        return party, address

    # --------------------------------------------------------------- claims

    def _send_claims(
        self, client: TrytonClient, items: list[Outbound]
    ) -> dict[int, SendResult]:
        """Book each released claim as a posted customer invoice to its payer.

        A replacement claim (frequency 7) first gets a credit note for the
        invoice of the claim it replaces, keyed by that claim, and then an
        invoice of its own. Each invoice and credit note goes with a move
        that clears its lines' account into carebridge's receivable account,
        so the claim moves from unbilled to billed receivables without
        booking revenue twice. A delivery is delivered when all of its
        documents are posted; otherwise the first failure is its reason.
        """
        self._prefetch_parties(client, items, "claim", "payer_id", self.settings.payer_codes)
        failed: dict[int, str] = {}
        details: dict[int, list[str]] = defaultdict(list)
        claims: dict[int, dict[str, Any]] = {}
        for item in items:
            try:
                claims[item.delivery_id] = json.loads(item.payload)["claim"]
            except (ValueError, KeyError, TypeError) as exc:
                failed[item.delivery_id] = _short(
                    f"invalid payload: {type(exc).__name__} {exc}"
                )
        documents: dict[str, _Document] = {}
        posted: list[Outbound] = []

        def book(batch: list[Outbound], workflow: _Workflow, build) -> set[int]:
            """Deliver ``batch`` with ``workflow``; return the delivered delivery ids."""
            prepared, rejected = _prepare(batch, build)
            for delivery_id, result in rejected.items():
                failed.setdefault(delivery_id, result.detail)
            results = self._deliver(client, workflow, prepared)
            delivered = set()
            for p in prepared:
                result = results[p.outbound.delivery_id]
                if result.verdict is Verdict.DELIVERED:
                    delivered.add(p.outbound.delivery_id)
                    details[p.outbound.delivery_id].append(result.detail)
                    posted.append(p.outbound)
                else:
                    failed.setdefault(p.outbound.delivery_id, result.detail)
            return delivered

        def invoice(credit: bool):
            return lambda item: self._invoice_values(
                client, item, claims[item.delivery_id], credit, documents
            )

        valid = [item for item in items if item.delivery_id in claims]
        originals = [i for i in valid if not claims[i.delivery_id].get("replaces")]
        replacements = [i for i in valid if claims[i.delivery_id].get("replaces")]
        book(originals, INVOICES, invoice(False))
        if replacements:
            credits = self._credit_outbounds(client, replacements, claims, failed)
            credited = book(credits, INVOICES, invoice(True))
            book(
                [i for i in replacements if i.delivery_id in credited],
                INVOICES,
                invoice(False),
            )
        invoices = list(posted)
        if invoices:
            ids = self._find(
                client, INVOICES.model, [o.idempotency_key for o in invoices]
            )
            clearing = [
                dataclasses.replace(o, idempotency_key=o.idempotency_key + CLEARING)
                for o in invoices
            ]
            book(
                clearing,
                MOVES,
                lambda item: self._clearing_values(
                    client,
                    item,
                    documents[item.idempotency_key.removesuffix(CLEARING)],
                    ids[item.idempotency_key.removesuffix(CLEARING)][0],
                ),
            )

        results: dict[int, SendResult] = {}
        for item in items:
            if item.delivery_id in failed:
                results[item.delivery_id] = SendResult(
                    Verdict.DEAD, failed[item.delivery_id]
                )
            else:
                detail = "; ".join(details[item.delivery_id])
                results[item.delivery_id] = SendResult(Verdict.DELIVERED, _short(detail))
        return results

    def _credit_outbounds(
        self,
        client: TrytonClient,
        replacements: list[Outbound],
        claims: dict[int, dict[str, Any]],
        failed: dict[int, str],
    ) -> list[Outbound]:
        """Return the credit-note deliveries of ``replacements`` whose prior invoice is posted.

        A credit note's key is the replaced claim's invoice key with
        ``:credit``, so a replaced invoice is credited once whatever
        delivery gets there. A replacement whose prior invoice is not posted
        in Tryton goes dead: crediting an invoice that is not there would
        leave the payer's account short.
        """
        replaced: dict[int, str] = {}
        for item in replacements:
            prior = claims[item.delivery_id]["replaces"]["claim_reference"]
            replaced[item.delivery_id] = _sibling_key(item.idempotency_key, prior)
        found = self._find(client, INVOICES.model, sorted(set(replaced.values())))
        credits = []
        for item in replacements:
            key = replaced[item.delivery_id]
            state = found[key][1] if key in found else None
            if state not in INVOICES.delivered_states:
                claim = claims[item.delivery_id]
                prior = claim["replaces"]["claim_reference"]
                where = "not in Tryton" if state is None else f"{state} in Tryton"
                failed[item.delivery_id] = _short(
                    f"claim {claim['claim_reference']} replaces claim {prior}, whose "
                    f"invoice (external_ref {key}) is {where}, so it cannot be "
                    f"credited. Deliver claim {prior} first (replay its delivery), "
                    "then replay this one"
                )
                continue
            credits.append(dataclasses.replace(item, idempotency_key=key + CREDIT))
        return credits

    def _invoice_values(
        self,
        client: TrytonClient,
        item: Outbound,
        claim: dict[str, Any],
        credit: bool,
        documents: dict[str, _Document],
    ) -> dict[str, Any]:
        """Return an ``account.invoice`` of type ``out`` for a claim, or its credit note.

        The credit note repeats the replaced claim's lines with negative
        quantities. Lines credit the clearing account, because Tryton
        accepts only revenue-type accounts on customer invoice lines. A line
        whose amount divides evenly by its whole units shows them as its
        quantity. Any other line is one unit at its amount, so that every
        line equals carebridge's to the cent.
        """
        reference = claim["claim_reference"]
        company = self._company(client)
        if claim["currency"] != self._company_currency:
            raise _Rejected(
                f"claim {reference} currency {claim['currency']} differs from the "
                f"Tryton company currency {self._company_currency}; post it to a "
                "Tryton company in that currency"
            )
        party, address = self._party(client, claim["payer_id"], "payer", "payer_codes")
        source = claim["replaces"] if credit else claim
        date = _date(claim["released_on"], "released_on")
        clearing = self._tryton_account(
            client, self.settings.invoice_clearing_account, "invoice_clearing_account"
        )
        unit = self._unit_id(client)
        sign = Decimal(-1) if credit else Decimal(1)
        lines = []
        total = Decimal(0)
        for line in source["lines"]:
            amount = _decimal(line["amount"], "amount")
            quantity, unit_price = _quantity_and_price(
                _decimal(line["units"], "units"), amount
            )
            total += amount
            lines.append(
                {
                    "type": "line",
                    "sequence": int(line["line_no"]),
                    "account": clearing,
                    "unit": unit,
                    # account.invoice.line.quantity is a float field in trytond 8.2.
                    "quantity": float(sign * quantity),
                    "unit_price": unit_price,
                    "description": (
                        f"{line['code']} {line['description']}, {line['units']} "
                        f"units, {line['service_date']}"
                    ),
                    "currency": self._company_currency_id,
                    "company": company,
                }
            )
        if not lines:
            raise _Rejected(f"claim {source['claim_reference']} has no lines; an empty "
                            "claim cannot be invoiced, so check the claim in carebridge")
        if total != _decimal(source["total"], "total"):
            raise _Rejected(
                f"claim {source['claim_reference']} lines add up to {total}, not "
                f"to its total {source['total']}; check the claim in carebridge"
            )
        if credit:
            description = (
                f"carebridge credit note for claim {source['claim_reference']}, "
                f"replaced by claim {reference}"
            )
        elif claim["frequency_code"] == "7":
            description = (
                f"carebridge claim {reference} ({claim['claim_type']}, replaces "
                f"claim {claim['replaces']['claim_reference']})"
            )
        else:
            description = f"carebridge claim {reference} ({claim['claim_type']})"
        documents[item.idempotency_key] = _Document(
            date=date,
            amount=sign * total,
            party=party,
            receivable_account=claim["receivable_account"],
            description=description,
        )
        return {
            "type": "out",
            "company": company,
            "currency": self._company_currency_id,
            "party": party,
            "invoice_address": address,
            "account": self._billed_receivable(client, party),
            "journal": self._invoice_journal_id(client),
            # NOTE: the release date is a UTC date. Tryton warns about a
            # customer invoice dated after its own today, so a server west of
            # UTC may reject a claim released just after UTC midnight.
            "invoice_date": date,
            "reference": source["claim_reference"],
            "description": description,
            "external_ref": item.idempotency_key,
            "lines": [["create", lines]],
        }

    def _clearing_values(
        self, client: TrytonClient, item: Outbound, document: _Document, invoice: int
    ) -> dict[str, Any]:
        """Return the move that clears an invoice's lines into carebridge's receivable.

        An invoice gives Dr clearing / Cr receivable, a credit note the
        reverse, dated like the document. Its ``origin`` is the invoice.
        """
        company = self._company(client)
        clearing = self._tryton_account(
            client, self.settings.invoice_clearing_account, "invoice_clearing_account"
        )
        receivable, _income = self._account(client, document.receivable_account)
        amount = abs(document.amount)
        debit, credit = (
            (clearing, receivable) if document.amount > 0 else (receivable, clearing)
        )
        lines = [
            {"account": debit, "debit": amount, "credit": Decimal(0)},
            {"account": credit, "debit": Decimal(0), "credit": amount},
        ]
        for line in lines:
            if line["account"] in self._party_accounts:
                line["party"] = document.party
        return {
            "company": company,
            "journal": self._journal_id(client),
            "period": self._period(client, document.date),
            "date": document.date,
            "origin": f"account.invoice,{invoice}",
            "description": f"clearing of {document.description}",
            "external_ref": item.idempotency_key,
            "lines": [["create", lines]],
        }

    def _billed_receivable(self, client: TrytonClient, party: int) -> int:
        """Return the invoice's receivable account: the setting, the party's, or the default."""
        if self.settings.invoice_receivable_account is not None:
            return self._tryton_account(
                client,
                self.settings.invoice_receivable_account,
                "invoice_receivable_account",
            )
        if party not in self._receivables:
            rows = client.search_read(
                "party.party", [("id", "=", party)], ["account_receivable"]
            )
            account = rows[0]["account_receivable"] if rows else None
            if account is None:
                if self._default_receivable is None:
                    config = client.search_read(
                        "account.configuration", [], ["default_account_receivable"]
                    )
                    if config:
                        self._default_receivable = config[0]["default_account_receivable"]
                account = self._default_receivable
            if account is None:
                raise _Rejected(
                    f"the payer's Tryton party id={party} has no receivable account "
                    "and the company has no default one; set a default receivable "
                    "account in Tryton's accounting configuration, or set "
                    "invoice_receivable_account in the destination's settings, "
                    "then replay"
                )
            self._receivables[party] = account
        return self._receivables[party]

    def _tryton_account(self, client: TrytonClient, code: str, setting: str) -> int:
        """Return the id of the open account with Tryton code ``code`` named by ``setting``."""
        if code not in self._accounts:
            self._load_accounts(client, [code])
        if code not in self._accounts:
            raise _Rejected(
                f"account {code} ({setting}) is not an open account in Tryton's "
                f"chart; create it or set {setting} in the destination's settings, "
                "then replay"
            )
        return self._accounts[code][0]

    def _invoice_journal_id(self, client: TrytonClient) -> int:
        if self._invoice_journal is None:
            code = self.settings.invoice_journal
            rows = client.search_read("account.journal", [("code", "=", code)], ["id"])
            if not rows:
                raise _Rejected(f"invoice journal {code} is not in Tryton")
            self._invoice_journal = rows[0]["id"]
        return self._invoice_journal

    def _unit_id(self, client: TrytonClient) -> int:
        if self._unit is None:
            self._unit = client.model("ir.model.data", "get_id", "product", "uom_unit")
        return self._unit

    def _warehouse_id(self, client: TrytonClient) -> int:
        if self._warehouse is None:
            code = self.settings.warehouse
            rows = client.search_read(
                "stock.location",
                [("code", "=", code), ("type", "=", "warehouse")],
                ["id"],
            )
            if not rows:
                raise _Rejected(
                    f"warehouse {code} is not a warehouse location in Tryton; set "
                    "the destination's warehouse setting to the code of one"
                )
            self._warehouse = rows[0]["id"]
        return self._warehouse

    # --------------------------------------------------------- idempotency

    def _deliver(
        self, client: TrytonClient, workflow: _Workflow, prepared: list[_Prepared]
    ) -> dict[int, SendResult]:
        """Create the records whose key is missing, then finish (post, do, confirm) them.

        Returns a result for each prepared delivery. Raises
        :class:`TrytonUnavailable` if Tryton fails for a reason other than
        the data. Nothing is lost then, because the next attempt finds by key
        whatever this one committed.
        """
        if not prepared:
            return {}
        model = workflow.model
        keys = [p.outbound.idempotency_key for p in prepared]
        found = self._find(client, model, keys)
        existed = set(found)
        missing = [p for p in prepared if p.outbound.idempotency_key not in found]
        rejected: dict[int, str] = {}
        if missing:
            created, rejected = self._create(client, model, missing)
            found.update(created)
        pending = [
            p
            for p in prepared
            if p.outbound.idempotency_key in found
            and found[p.outbound.idempotency_key][1] not in workflow.delivered_states
        ]
        failed = self._finish(client, workflow, pending, found) if pending else {}
        results: dict[int, SendResult] = {}
        for p in prepared:
            key = p.outbound.idempotency_key
            if p.outbound.delivery_id in rejected:
                reason = rejected[p.outbound.delivery_id]
                results[p.outbound.delivery_id] = SendResult(Verdict.DEAD, reason)
            elif key in failed:
                results[p.outbound.delivery_id] = SendResult(Verdict.DEAD, failed[key])
            else:
                record_id, state = found[key]
                detail = f"{model} id={record_id} {state}"
                if key in existed:
                    detail += " (found by external_ref)"
                results[p.outbound.delivery_id] = SendResult(Verdict.DELIVERED, detail)
        return results

    def _find(
        self, client: TrytonClient, model: str, keys: list[str]
    ) -> dict[str, tuple[int, str]]:
        rows = client.search_read(
            model, [("external_ref", "in", keys)], ["id", "external_ref", "state"]
        )
        return {row["external_ref"]: (row["id"], row["state"]) for row in rows}

    def _create(
        self, client: TrytonClient, model: str, missing: list[_Prepared]
    ) -> tuple[dict[str, tuple[int, str]], dict[int, str]]:
        """Create ``missing``; return {key: (id, "draft")} and {delivery id: reason}."""
        try:
            ids = client.model(model, "create", [p.values for p in missing])
            return _created(missing, ids), {}
        except TrytonUserError:
            pass
        # Either another worker created some keys since the lookup, or a
        # record has bad data. Look again, then create one at a time so a bad
        # record fails alone.
        keys = [p.outbound.idempotency_key for p in missing]
        created = self._find(client, model, keys)
        rejected: dict[int, str] = {}
        for p in missing:
            key = p.outbound.idempotency_key
            if key in created:
                continue
            try:
                (record_id,) = client.model(model, "create", [p.values])
                created[key] = (record_id, "draft")
            except TrytonUserError as exc:
                again = self._find(client, model, [key])
                if key in again:
                    created.update(again)
                else:
                    rejected[p.outbound.delivery_id] = _short(
                        f"Tryton rejected the record: {exc}"
                    )
        return created, rejected

    def _finish(
        self,
        client: TrytonClient,
        workflow: _Workflow,
        pending: list[_Prepared],
        found: dict[str, tuple[int, str]],
    ) -> dict[str, str]:
        """Finish the records of ``pending``; return {key: reason} for failures."""
        failed: dict[str, str] = {}
        finishable = workflow.finishable_states
        if finishable is not None:
            for p in pending:
                key = p.outbound.idempotency_key
                record_id, state = found[key]
                if state not in finishable:
                    failed[key] = _short(
                        f"{workflow.model} id={record_id} with this external_ref is "
                        f"{state} in Tryton, so carebridge can neither finish it nor "
                        "create it again. Reset it to draft in Tryton and replay, or "
                        "leave this delivery dead"
                    )
            pending = [p for p in pending if p.outbound.idempotency_key not in failed]
        if not pending:
            return failed
        records = {
            found[p.outbound.idempotency_key][0]: found[p.outbound.idempotency_key][1]
            for p in pending
        }
        try:
            workflow.finish(client, records)
        except TrytonUserError:
            for p in pending:
                key = p.outbound.idempotency_key
                record_id, state = found[key]
                try:
                    workflow.finish(client, {record_id: state})
                except TrytonUserError as exc:
                    failed[key] = _short(f"Tryton rejected the record: {exc}")
                    continue
                found[key] = (record_id, workflow.finished_state)
            return failed
        for p in pending:
            key = p.outbound.idempotency_key
            found[key] = (found[key][0], workflow.finished_state)
        return failed

    # ------------------------------------------------------------- lookups

    def _load_accounts(self, client: TrytonClient, codes: list[str]) -> None:
        if not codes:
            return
        rows = client.search_read(
            "account.account",
            [("code", "in", codes), ("closed", "!=", True), ("type", "!=", None)],
            ["id", "code", "type.statement", "party_required"],
        )
        for row in rows:
            statement = (row.get("type.") or {}).get("statement")
            self._accounts[row["code"]] = (row["id"], statement == INCOME_STATEMENT)
            if row["party_required"]:
                self._party_accounts.add(row["id"])

    def _account(self, client: TrytonClient, code: str) -> tuple[int, bool]:
        tryton_code = self.settings.account_codes.get(code, code)
        if tryton_code not in self._accounts:
            self._load_accounts(client, [tryton_code])
        if tryton_code not in self._accounts:
            raise _Rejected(
                f"account {tryton_code} is not an open account in Tryton's chart"
            )
        return self._accounts[tryton_code]

    def _load_cost_centers(self, client: TrytonClient, codes: list[str]) -> None:
        if not codes:
            return
        rows = client.search_read(
            "analytic_account.account",
            [("code", "in", codes), ("type", "=", "normal")],
            ["id", "code"],
        )
        for row in rows:
            self._cost_centers[row["code"]] = row["id"]

    def _cost_center(self, client: TrytonClient, code: str) -> int:
        tryton_code = self.settings.cost_center_codes.get(code, code)
        if tryton_code not in self._cost_centers:
            self._load_cost_centers(client, [tryton_code])
        if tryton_code not in self._cost_centers:
            raise _Rejected(
                f"cost center {tryton_code} is not an analytic account in Tryton"
            )
        return self._cost_centers[tryton_code]

    def _product(self, client: TrytonClient, code: str) -> tuple[int, int]:
        tryton_code = self.settings.item_codes.get(code, code)
        if tryton_code not in self._products:
            rows = client.search_read(
                "product.product", [("code", "=", tryton_code)], ["id", "default_uom"]
            )
            if not rows:
                raise _Rejected(f"item {tryton_code} is not a product in Tryton")
            self._products[tryton_code] = (rows[0]["id"], rows[0]["default_uom"])
        return self._products[tryton_code]

    def _location(self, client: TrytonClient, code: str) -> int:
        if code not in self._locations:
            rows = client.search_read("stock.location", [("code", "=", code)], ["id"])
            if not rows:
                raise _Rejected(f"stock location {code} is not in Tryton")
            self._locations[code] = rows[0]["id"]
        return self._locations[code]

    def _journal_id(self, client: TrytonClient) -> int:
        if self._journal is None:
            rows = client.search_read(
                "account.journal", [("code", "=", self.settings.journal)], ["id"]
            )
            if not rows:
                raise _Rejected(f"journal {self.settings.journal} is not in Tryton")
            self._journal = rows[0]["id"]
        return self._journal

    def _load_periods(
        self, client: TrytonClient, first: dt.date, last: dt.date
    ) -> None:
        rows = client.search_read(
            "account.period",
            [
                ("type", "=", "standard"),
                ("state", "=", "open"),
                ("start_date", "<=", last),
                ("end_date", ">=", first),
            ],
            ["id", "start_date", "end_date"],
        )
        known = {period for _start, _end, period in self._periods}
        self._periods.extend(
            (r["start_date"], r["end_date"], r["id"])
            for r in rows
            if r["id"] not in known
        )

    def _period(self, client: TrytonClient, date: dt.date) -> int:
        for attempt in (1, 2):
            for start, end, period in self._periods:
                if start <= date <= end:
                    return period
            if attempt == 1:
                self._load_periods(client, date, date)
        raise _Rejected(f"no open period in Tryton contains {date.isoformat()}")


def _sibling_key(key: str, record_key: str) -> str:
    """Return the key of another record of the same destination and kind."""
    return key.rsplit(":", 1)[0] + ":" + record_key


def _quantity_and_price(units: Decimal, amount: Decimal) -> tuple[Decimal, Decimal]:
    """Split a line amount into whole units and a unit price that give it exactly."""
    if units > 0 and units == units.to_integral_value():
        price = (amount / units).quantize(UNIT_PRICE)
        if price * units == amount:
            return units, price
    return Decimal(1), amount


def _created(missing: list[_Prepared], ids: list[int]) -> dict[str, tuple[int, str]]:
    return {
        p.outbound.idempotency_key: (record_id, "draft")
        for p, record_id in zip(missing, ids, strict=True)
    }


register(DestinationType("tryton", TrytonSettings, TrytonDestination.build))
