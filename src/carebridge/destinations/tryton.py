"""A Tryton ERP destination: journals, supply issues and purchase orders over JSON-RPC.

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
supplier, a currency other than the company's). Such a delivery goes to
the dead letters, where it stays until a person fixes the data in Tryton
and replays it.
"""

from __future__ import annotations

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


MOVES = _Workflow("account.move", _post_moves, frozenset({"posted"}), "posted")
ISSUES = _Workflow("stock.move", _issue_moves, frozenset({"done"}), "done")
PURCHASES = _Workflow(
    "purchase.purchase",
    _confirm_purchases,
    frozenset({"confirmed", "processing", "done"}),
    "confirmed",
    finishable_states=frozenset({"draft", "quotation"}),
)


class TrytonDestination:
    """Delivers journals, supply issues and purchase orders to one Tryton database."""

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
        self._suppliers: dict[str, tuple[int, int | None]] = {}
        self._supplier_problems: dict[str, str] = {}
        self._warehouse: int | None = None

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
        self._prefetch_suppliers(client, items)
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
                f"from the Tryton company currency {self._company_currency}"
            )
        party, address = self._supplier(client, order["supplier"])
        lines = []
        for line in order["lines"]:
            quantity = _decimal(line["quantity"], "quantity")
            if quantity <= 0:
                raise _Rejected(
                    f"purchase order {po_number} line {line['line_no']}: "
                    f"quantity {quantity} is not positive"
                )
            unit_price = _decimal(line["unit_price"], "unit_price")
            if unit_price < 0:
                raise _Rejected(
                    f"purchase order {po_number} line {line['line_no']}: "
                    f"unit price {unit_price} is negative"
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

    def _prefetch_suppliers(self, client: TrytonClient, items: list[Outbound]) -> None:
        """Look up the batch's suppliers and their addresses in two to three calls."""
        codes: set[str] = set()
        for item in items:
            try:
                supplier = json.loads(item.payload)["purchase_order"]["supplier"]
            except (ValueError, KeyError, TypeError):
                continue  # reported for that delivery when its values are built
            codes.add(self.settings.supplier_codes.get(supplier, supplier))
        known = set(self._suppliers) | set(self._supplier_problems)
        self._load_suppliers(client, sorted(codes - known))

    def _load_suppliers(self, client: TrytonClient, codes: list[str]) -> None:
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
                    ids = ", ".join(str(party) for party in sorted(found))
                    self._supplier_problems[code] = (
                        f"the identifier {code} belongs to {len(found)} Tryton "
                        f"parties (ids {ids}); map the supplier to one party's "
                        "code under supplier_codes in the destination's settings"
                    )
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
            self._suppliers[code] = (party, chosen["id"] if chosen else None)

    def _supplier(self, client: TrytonClient, code: str) -> tuple[int, int]:
        """Return the supplier's party and invoice address, or reject the order."""
        tryton_code = self.settings.supplier_codes.get(code, code)
        if (
            tryton_code not in self._suppliers
            and tryton_code not in self._supplier_problems
        ):
            self._load_suppliers(client, [tryton_code])
        named = code if tryton_code == code else f"{code} (Tryton code {tryton_code})"
        if tryton_code in self._supplier_problems:
            raise _Rejected(f"supplier {named}: {self._supplier_problems[tryton_code]}")
        if tryton_code not in self._suppliers:
            raise _Rejected(
                f"supplier {named} is not a party in Tryton: no active party has "
                f"the code or an identifier {tryton_code}. Create the supplier's "
                "party in Tryton, or map the supplier to its party's code under "
                "supplier_codes in the destination's settings, then replay"
            )
        party, address = self._suppliers[tryton_code]
        if address is None:
            raise _Rejected(
                f"supplier {named} (Tryton party id={party}) has no address; add "
                "an invoice address to the party in Tryton, then replay"
            )
        return party, address

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
            ["id", "code", "type.statement"],
        )
        for row in rows:
            statement = (row.get("type.") or {}).get("statement")
            self._accounts[row["code"]] = (row["id"], statement == INCOME_STATEMENT)

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


def _created(missing: list[_Prepared], ids: list[int]) -> dict[str, tuple[int, str]]:
    return {
        p.outbound.idempotency_key: (record_id, "draft")
        for p, record_id in zip(missing, ids, strict=True)
    }


register(DestinationType("tryton", TrytonSettings, TrytonDestination.build))
