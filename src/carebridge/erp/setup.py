"""Set up a Tryton database for carebridge: company, books, cost centers, items, stock, parties.

Everything runs over JSON-RPC against a running server (see
:mod:`carebridge.erp.server`), in this order:

1. the currency (USD unless configured) and a rate of 1;
2. the company, made the admin user's current company;
3. Tryton's minimal chart of accounts (``account.create_chart`` wizard on
   the template ``account.account_template_root_en``);
4. carebridge's own accounts (from ``accounts.csv``) under the chart's root,
   with the code carebridge uses, so journals map by account number, and
   the clearing account of claim invoices (``CB-CLAIMS``, see
   docs/erp-tryton.md);
5. one fiscal year per calendar year with monthly periods, and a sequence
   that numbers its invoices and credit notes;
6. an analytic root ``Cost centers`` with one account per department's cost
   center, coded with the cost center;
7. one goods product per supply item, coded with the item code, at its unit
   cost, purchasable in the same unit;
8. a production location ``Patient consumption`` (code ``PCON``) that supply
   issues move stock into, and opening stock in the warehouse's storage zone;
9. one supplier party per supplier in the business rules (every version),
   coded with carebridge's supplier code and with one invoice address, so
   the ``tryton`` destination finds it for a purchase order;
10. one customer party for the payer of ``billing.yaml``, coded with its
    payer id and with one invoice address, for claim invoices.

The routine is for demos and tests: a real hospital's Tryton already has
its company, chart and items, and the ``tryton`` destination only needs
the codes to match (or a mapping in its settings).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from carebridge.config.model import AccountType, Configuration
from carebridge.erp.rpc import TrytonClient

log = logging.getLogger(__name__)

CONSUMPTION_LOCATION_CODE = "PCON"
STORAGE_LOCATION_CODE = "STO"
COST_CENTER_ROOT_CODE = "CC"
CLAIMS_CLEARING_CODE = "CB-CLAIMS"
"""The revenue-type account that claim invoice lines credit and a second move clears."""


@dataclass(frozen=True, slots=True)
class SetupResult:
    """What the set-up created: the company's and location's ids, and counts."""

    company: int
    fiscal_years: int
    accounts: int
    cost_centers: int
    products: int
    consumption_location: int
    suppliers: int = 0
    payers: int = 0


def setup_company(
    client: TrytonClient,
    config: Configuration,
    *,
    years: Iterable[int],
    company_name: str = "carebridge Demo Hospital",
    opening_stock: Decimal = Decimal(100000),
) -> SetupResult:
    """Create the company, books, cost centers, items and stock of a new database.

    Args:
        client: A client logged in as ``admin`` on a database that has the
            modules of :data:`carebridge.erp.server.MODULES` and nothing else.
        config: carebridge's configuration: accounts, departments, supply
            items, the suppliers of its rules, the payer of its billing
            settings and the currency are taken from it.
        years: The calendar years to open as fiscal years; a journal dated
            outside them is rejected by Tryton.
        company_name: The company's party name.
        opening_stock: The quantity of each supply item put into storage.
    """
    currency = _currency(client, config.rules.currency)
    company = _company(client, company_name, currency)
    _chart(client, company)
    accounts = _accounts(client, config, company)
    fiscal_years = _fiscal_years(client, company, sorted(set(years)))
    cost_centers = _cost_centers(client, config, company)
    products = _products(client, config)
    location = _consumption_location(client)
    _opening_stock(client, company, products, opening_stock)
    suppliers = _suppliers(client, config)
    payers = _payers(client, config)
    log.info(
        "Tryton company set up",
        extra={
            "action": "tryton_setup",
            "company": company,
            "fiscal_years": fiscal_years,
            "accounts": accounts,
            "products": len(products),
            "suppliers": suppliers,
            "payers": payers,
        },
    )
    return SetupResult(
        company,
        fiscal_years,
        accounts,
        cost_centers,
        len(products),
        location,
        suppliers,
        payers,
    )


def _currency(client: TrytonClient, code: str) -> int:
    found = client.search_read("currency.currency", [("code", "=", code)], ["id"])
    if found:
        return found[0]["id"]
    (currency,) = client.model(
        "currency.currency",
        "create",
        [
            {
                "name": code,
                "code": code,
                "symbol": "$" if code == "USD" else code,
                "digits": 2,
                "rounding": Decimal("0.01"),
                "rates": [
                    ["create", [{"date": dt.date(1900, 1, 1), "rate": Decimal(1)}]]
                ],
            }
        ],
    )
    return currency


def _company(client: TrytonClient, name: str, currency: int) -> int:
    (party,) = client.model("party.party", "create", [{"name": name}])
    (company,) = client.model(
        "company.company", "create", [{"party": party, "currency": currency}]
    )
    user = client.search_read("res.user", [("login", "=", client.user)], ["id"])[0][
        "id"
    ]
    client.model(
        "res.user",
        "write",
        [user],
        {"companies": [["add", [company]]], "company": company},
    )
    # The context (company, currency) comes from the user's preferences.
    client.login()
    return company


def _chart(client: TrytonClient, company: int) -> None:
    template = client.model(
        "ir.model.data", "get_id", "account", "account_template_root_en"
    )
    session, _start, _end = client.call("wizard.account.create_chart.create")
    try:
        client.call(
            "wizard.account.create_chart.execute",
            session,
            {"account": {"account_template": template, "company": company}},
            "create_account",
        )
        receivable = _account_by_flag(client, "receivable")
        payable = _account_by_flag(client, "payable")
        client.call(
            "wizard.account.create_chart.execute",
            session,
            {
                "properties": {
                    "company": company,
                    "account_receivable": receivable,
                    "account_payable": payable,
                }
            },
            "create_properties",
        )
    finally:
        client.call("wizard.account.create_chart.delete", session)


def _account_by_flag(client: TrytonClient, flag: str) -> int:
    found = client.search_read(
        "account.account",
        [(f"type.{flag}", "=", True), ("closed", "!=", True)],
        ["id"],
        order=[("code", "ASC")],
        limit=1,
    )
    if not found:
        raise LookupError(f"the chart has no {flag} account")
    return found[0]["id"]


def _account_types(client: TrytonClient) -> dict[str, int]:
    """Pick the chart's account type for each carebridge account role.

    The minimal chart flags receivable, payable, stock, revenue and expense
    types, but also flags an income-statement type as ``stock`` (stock
    expenses), so each role also checks the statement. Cash takes the first
    unflagged sibling of the receivable type (current assets). Equity takes
    the first balance-sheet type under the top-level group that contains
    neither assets nor liabilities.
    """
    types = client.search_read(
        "account.account.type",
        [],
        [
            "name",
            "statement",
            "parent",
            "receivable",
            "payable",
            "stock",
            "revenue",
            "expense",
            "childs",
        ],
        order=[("sequence", "ASC"), ("id", "ASC")],
    )
    by_id = {t["id"]: t for t in types}
    leaves = [t for t in types if not t["childs"]]
    flags = ("receivable", "payable", "stock", "revenue", "expense")

    def first(role: str, test) -> int:
        for item in leaves:
            if test(item):
                return item["id"]
        raise LookupError(f"the chart has no account type for {role} accounts")

    def balance(item: dict[str, Any]) -> bool:
        return item["statement"] == "balance"

    def unflagged(item: dict[str, Any]) -> bool:
        return not any(item[flag] for flag in flags)

    receivable = first("receivable", lambda t: t["receivable"] and balance(t))
    payable = first("payable", lambda t: t["payable"] and balance(t))
    current_assets = by_id[receivable]["parent"]
    asset_group = by_id[current_assets]["parent"]
    liability_group = by_id[payable]["parent"]
    top_level = by_id[asset_group]["parent"]
    equity_groups = {
        t["id"]
        for t in types
        if t["parent"] == top_level
        and balance(t)
        and t["id"] not in (asset_group, liability_group)
    }
    return {
        "receivable": receivable,
        "payable": payable,
        "stock": first("inventory", lambda t: t["stock"] and balance(t)),
        "cash": first(
            "other asset",
            lambda t: t["parent"] == current_assets and balance(t) and unflagged(t),
        ),
        "equity": first(
            "equity",
            lambda t: t["parent"] in equity_groups and balance(t) and unflagged(t),
        ),
        "revenue": first(
            "revenue", lambda t: t["revenue"] and t["statement"] == "income"
        ),
        "expense": first(
            "expense", lambda t: t["expense"] and t["statement"] == "income"
        ),
    }


def _accounts(client: TrytonClient, config: Configuration, company: int) -> int:
    roots = client.search_read(
        "account.account", [("parent", "=", None)], ["id"], order=[("id", "ASC")]
    )
    root = roots[0]["id"]
    types = _account_types(client)
    existing = {
        row["code"]
        for row in client.search_read(
            "account.account",
            [("code", "in", [*config.accounts, CLAIMS_CLEARING_CODE])],
            ["code"],
        )
    }
    values: list[dict[str, Any]] = []
    for number, account in sorted(config.accounts.items()):
        if number in existing:
            continue
        if number == config.receivable_account:
            role = "receivable"
        elif number == config.inventory_account:
            role = "stock"
        else:
            role = {
                AccountType.ASSET: "cash",
                AccountType.LIABILITY: "payable",
                AccountType.EQUITY: "equity",
                AccountType.REVENUE: "revenue",
                AccountType.EXPENSE: "expense",
            }[account.type]
        values.append(
            {
                "code": number,
                "name": account.name,
                "company": company,
                "parent": root,
                "type": types[role],
                # carebridge posts summarized journals without a party: one
                # line per account and cost center, never per patient.
                "party_required": False,
                "reconcile": False,
            }
        )
    if CLAIMS_CLEARING_CODE not in existing:
        values.append(
            {
                "code": CLAIMS_CLEARING_CODE,
                "name": "Claims billed - clearing",
                "company": company,
                "parent": root,
                # Tryton accepts only revenue-type accounts on customer
                # invoice lines. The move that goes with each claim invoice
                # clears it back to zero (docs/erp-tryton.md).
                "type": types["revenue"],
                "party_required": False,
                "reconcile": False,
            }
        )
    if values:
        client.model("account.account", "create", values)
    return len(values)


def _fiscal_years(client: TrytonClient, company: int, years: list[int]) -> int:
    sequence_type = client.model(
        "ir.model.data", "get_id", "account", "sequence_type_account_move"
    )
    if not years:
        return 0
    # Tryton requires a move sequence of its own for each fiscal year.
    sequences = client.model(
        "ir.sequence.strict",
        "create",
        [
            {
                "name": f"Account moves {year}",
                "sequence_type": sequence_type,
                "company": company,
            }
            for year in years
        ],
    )
    invoice_type = client.model(
        "ir.model.data", "get_id", "account_invoice", "sequence_type_account_invoice"
    )
    invoice_sequences = client.model(
        "ir.sequence.strict",
        "create",
        [
            {
                "name": f"Invoices {year}",
                "sequence_type": invoice_type,
                "company": company,
                "prefix": f"{year}-",
            }
            for year in years
        ],
    )
    values = [
        {
            "name": str(year),
            "start_date": dt.date(year, 1, 1),
            "end_date": dt.date(year, 12, 31),
            "company": company,
            "move_sequence": sequence,
            # Posting an invoice or credit note takes its number from here.
            "invoice_sequences": [
                [
                    "create",
                    [
                        {
                            "company": company,
                            "out_invoice_sequence": numbers,
                            "out_credit_note_sequence": numbers,
                            "in_invoice_sequence": numbers,
                            "in_credit_note_sequence": numbers,
                        }
                    ],
                ]
            ],
        }
        for year, sequence, numbers in zip(
            years, sequences, invoice_sequences, strict=True
        )
    ]
    ids = client.model("account.fiscalyear", "create", values)
    for fiscal_year in ids:
        # One call per year: trytond 8.2.1 fails with "maximum recursion
        # depth exceeded" when create_period gets 37 fiscal years at once.
        client.model("account.fiscalyear", "create_period", [fiscal_year])
    return len(ids)


def _cost_centers(client: TrytonClient, config: Configuration, company: int) -> int:
    (root,) = client.model(
        "analytic_account.account",
        "create",
        [
            {
                "name": "Cost centers",
                "code": COST_CENTER_ROOT_CODE,
                "type": "root",
                "company": company,
                "state": "opened",
            }
        ],
    )
    seen: set[str] = set()
    values = []
    for department in sorted(config.departments.values(), key=lambda d: d.cost_center):
        if department.cost_center in seen:
            continue
        seen.add(department.cost_center)
        values.append(
            {
                "name": department.name,
                "code": department.cost_center,
                "type": "normal",
                "company": company,
                "parent": root,
                "root": root,
                "state": "opened",
            }
        )
    client.model("analytic_account.account", "create", values)
    return len(values)


def _products(client: TrytonClient, config: Configuration) -> dict[str, int]:
    unit = client.model("ir.model.data", "get_id", "product", "uom_unit")
    items = {item.item_code: item for item in config.supply_items.values()}
    values = [
        {
            "name": item.description,
            "code": code,
            "type": "goods",
            "default_uom": unit,
            # carebridge orders in the same unit as it counts stock.
            "purchasable": True,
            "purchase_uom": unit,
            "list_price": Decimal(0),
            "cost_price_method": "average",
            "products": [["create", [{"cost_price": item.unit_cost}]]],
        }
        for code, item in sorted(items.items())
    ]
    if values:
        client.model("product.template", "create", values)
    products = client.search_read(
        "product.product", [("code", "in", sorted(items))], ["id", "code"]
    )
    return {row["code"]: row["id"] for row in products}


def _consumption_location(client: TrytonClient) -> int:
    (location,) = client.model(
        "stock.location",
        "create",
        [
            {
                "name": "Patient consumption",
                "code": CONSUMPTION_LOCATION_CODE,
                "type": "production",
            }
        ],
    )
    return location


def _opening_stock(
    client: TrytonClient, company: int, products: dict[str, int], quantity: Decimal
) -> None:
    if not products:
        return
    storage = client.search_read(
        "stock.location", [("code", "=", STORAGE_LOCATION_CODE)], ["id"]
    )[0]["id"]
    (inventory,) = client.model(
        "stock.inventory",
        "create",
        [
            {
                "location": storage,
                "company": company,
                # Before the oldest issue carebridge may post, so every issue
                # finds the stock.
                "date": dt.date(1900, 1, 1),
                "lines": [
                    [
                        "create",
                        [
                            {"product": product, "quantity": float(quantity)}
                            for product in products.values()
                        ],
                    ]
                ],
            }
        ],
    )
    client.model("stock.inventory", "confirm", [inventory])


def _suppliers(client: TrytonClient, config: Configuration) -> int:
    """Create a party per supplier of the rules that Tryton does not have yet.

    The party's code is carebridge's supplier code, which is what the
    ``tryton`` destination looks up. The supplier location and the
    purchase sequence come from Tryton's defaults.
    """
    suppliers: dict[str, str] = {}
    for rules in config.rule_book.versions:
        suppliers.update(rules.suppliers)
    if not suppliers:
        return 0
    existing = {
        row["code"]
        for row in client.search_read(
            "party.party", [("code", "in", sorted(suppliers))], ["code"]
        )
    }
    values = [
        {
            "name": name,
            "code": code,
            # Raw RPC adds no address, and a confirmed purchase needs one.
            "addresses": [["create", [{"invoice": True}]]],
        }
        for code, name in sorted(suppliers.items())
        if code not in existing
    ]
    if values:
        client.model("party.party", "create", values)
    return len(values)


def _payers(client: TrytonClient, config: Configuration) -> int:
    """Create the customer party of the billing payer if Tryton does not have it.

    The party's code is the payer id of ``billing.yaml``, which the
    ``tryton`` destination looks up for a claim invoice. Its receivable
    account is the company's default (the chart's main receivable), which
    requires a party on each line: the payer.
    """
    if config.billing is None:
        return 0
    payer = config.billing.file.payer
    if client.search_read("party.party", [("code", "=", payer.payer_id)], ["id"]):
        return 0
    client.model(
        "party.party",
        "create",
        [
            {
                "name": payer.name,
                "code": payer.payer_id,
                # Raw RPC adds no address, and an invoice needs one.
                "addresses": [["create", [{"invoice": True}]]],
            }
        ],
    )
    return 1
