"""A Tryton ERP destination: journals as posted moves, supply issues as done stock moves.

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

Each document carries the delivery's idempotency key in ``external_ref``,
which carebridge's Tryton module makes unique per company. A batch first
looks its keys up: a key found done is delivered, a key found in draft is
posted (or issued). Only the missing ones are created. If a create fails
because another worker created some of the keys meanwhile, the lookup runs
again. If it fails on the data, the batch is sent one record at a time so
that only the bad record goes dead, with Tryton's message as the reason.

Connection errors, timeouts, HTTP 5xx and server exceptions are retried.
Tryton's ``UserError`` (a missing period, an unknown account or item, short
stock) is permanent. Such a delivery goes to the dead letters, where it
stays until a person fixes the data in Tryton and replays it.
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
    ``cost_center_codes`` and ``item_codes`` map carebridge codes to
    Tryton's where they differ; an unmapped code is looked up as is.
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
    account_codes: dict[str, str] = Field(default_factory=dict)
    cost_center_codes: dict[str, str] = Field(default_factory=dict)
    item_codes: dict[str, str] = Field(default_factory=dict)

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


class TrytonDestination:
    """Delivers journals and supply issues to one Tryton database over JSON-RPC."""

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
        return {"journal": self._send_journals, "supply_issue": self._send_issues}

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
        results.update(
            self._deliver(client, "account.move", prepared, self._post_moves, "posted")
        )
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
                "company.company", [("id", "=", company)], ["currency.code"]
            )
            self._company_currency = (rows[0].get("currency.") or {}).get("code")
        return company

    def _post_moves(self, client: TrytonClient, ids: list[int]) -> None:
        client.model("account.move", "post", ids)

    # -------------------------------------------------------- supply issues

    def _send_issues(
        self, client: TrytonClient, items: list[Outbound]
    ) -> dict[int, SendResult]:
        prepared, results = _prepare(
            items, lambda item: self._stock_move_values(client, item)
        )
        results.update(
            self._deliver(client, "stock.move", prepared, self._issue_moves, "done")
        )
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

    def _issue_moves(self, client: TrytonClient, ids: list[int]) -> None:
        client.model("stock.move", "issue", ids)

    # --------------------------------------------------------- idempotency

    def _deliver(
        self,
        client: TrytonClient,
        model: str,
        prepared: list[_Prepared],
        finish: Callable[[TrytonClient, list[int]], None],
        done_state: str,
    ) -> dict[int, SendResult]:
        """Create the records whose key is missing, then finish (post or do) them all.

        Returns a result for each prepared delivery. Raises
        :class:`TrytonUnavailable` if Tryton fails for a reason other than
        the data. Nothing is lost then, because the next attempt finds by key
        whatever this one committed.
        """
        if not prepared:
            return {}
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
            and found[p.outbound.idempotency_key][1] != done_state
        ]
        failed = (
            self._finish(client, pending, found, finish, done_state) if pending else {}
        )
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
        pending: list[_Prepared],
        found: dict[str, tuple[int, str]],
        finish: Callable[[TrytonClient, list[int]], None],
        done_state: str,
    ) -> dict[str, str]:
        """Post or do the records of ``pending``; return {key: reason} for failures."""
        ids = [found[p.outbound.idempotency_key][0] for p in pending]
        try:
            finish(client, ids)
        except TrytonUserError:
            failed: dict[str, str] = {}
            for p in pending:
                key = p.outbound.idempotency_key
                try:
                    finish(client, [found[key][0]])
                except TrytonUserError as exc:
                    failed[key] = _short(f"Tryton rejected the record: {exc}")
                    continue
                found[key] = (found[key][0], done_state)
            return failed
        for p in pending:
            key = p.outbound.idempotency_key
            found[key] = (found[key][0], done_state)
        return {}

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
