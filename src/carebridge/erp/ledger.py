"""Tryton's posted moves read back as an :class:`~carebridge.reconcile.ErpLedger`.

The Tryton destination posts each journal as one ``account.move`` whose
``external_ref`` is the delivery's idempotency key,
``carebridge:DESTINATION:journal:JOURNAL_KEY``. :class:`TrytonLedger` reads
every posted move that carries an ``external_ref`` and strips that prefix,
so the key it reports is the journal's ``journal_key``, the key that
reconciliation compares. The moves that clear claim invoices
(``carebridge:DESTINATION:claim:...:clearing``) are not journals and are
left out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from carebridge.engine.deliveries import idempotency_key
from carebridge.erp.rpc import TrytonClient
from carebridge.reconcile import ErpJournal

if TYPE_CHECKING:
    from carebridge.destinations.tryton import TrytonSettings

log = logging.getLogger(__name__)

BATCH_SIZE = 500
"""Moves per ``search_read`` page, and moves whose lines one call reads."""


class TrytonLedger:
    """The journals stored in Tryton by one destination, read over JSON-RPC.

    Only posted moves count. A draft under a carebridge key (a worker
    stopped between create and post) is left out, so its journal is
    reported missing until a delivery pass posts it. A move cancelled with
    Tryton's ``account.move.cancel`` wizard is left out too: the wizard
    keeps it posted and posts a copy without a key whose ``origin`` is the
    cancelled move. A posted move whose
    ``external_ref`` does not start with this destination's journal prefix
    is returned under its full ``external_ref``, which reconciliation then
    reports as ``erp_unknown``.
    """

    def __init__(self, client: TrytonClient, destination: str) -> None:
        self.client = client
        self.destination = destination
        self.name = f"Tryton (destination {destination})"
        self._prefix = idempotency_key(destination, "journal", "")
        self._claim_prefix = idempotency_key(destination, "claim", "")

    @classmethod
    def from_settings(cls, destination: str, settings: TrytonSettings) -> TrytonLedger:
        """Connect with a ``tryton`` destination's settings.

        Raises:
            PasswordUnavailable: The password variable is unset or its file
                cannot be read.
        """
        client = TrytonClient(
            settings.host,
            settings.port,
            settings.database,
            settings.user,
            settings.password(),
            timeout=settings.timeout_seconds,
        )
        return cls(client, destination)

    def journals(self) -> Iterator[ErpJournal]:
        """Yield one entry per posted move with an ``external_ref``, with its line totals.

        Raises:
            TrytonUnavailable: Tryton cannot be reached or failed.
            TrytonUserError: Tryton rejected a read (for example a user
                without read access to moves).
        """
        count = 0
        cancelled_count = 0
        for moves in self._posted_moves():
            ids = [move["id"] for move in moves]
            cancelled = self._cancelled(ids)
            totals = self._line_totals(ids)
            for move in moves:
                if move["id"] in cancelled:
                    cancelled_count += 1
                    continue
                debit, credit = totals.get(move["id"], (Decimal(0), Decimal(0)))
                count += 1
                yield ErpJournal(self._journal_key(move["external_ref"]), debit, credit)
        log.info(
            "read Tryton moves",
            extra={"action": "tryton_ledger_read", "destination": self.destination,
                   "moves": count, "cancelled": cancelled_count},
        )

    def _posted_moves(self) -> Iterator[list[dict[str, Any]]]:
        """Yield pages of posted moves that carry an ``external_ref``, by id."""
        last_id = 0
        while True:
            # Paging by id, not by offset, so a move posted meanwhile
            # cannot shift a page and hide another move.
            page = self.client.search_read(
                "account.move",
                [("external_ref", "!=", None), ("state", "=", "posted"),
                 ("external_ref", "not like", self._claim_prefix + "%"),
                 ("id", ">", last_id)],
                ["id", "external_ref"],
                order=[("id", "ASC")],
                limit=BATCH_SIZE,
            )
            if not page:
                return
            yield page
            last_id = page[-1]["id"]

    def _cancelled(self, move_ids: list[int]) -> set[int]:
        """Return the ids among ``move_ids`` that a posted cancel move reverses."""
        rows = self.client.search_read(
            "account.move",
            [("origin", "in", [f"account.move,{move_id}" for move_id in move_ids]),
             ("state", "=", "posted")],
            ["origin"],
        )
        return {int(row["origin"].split(",", 1)[1]) for row in rows}

    def _line_totals(self, move_ids: list[int]) -> dict[int, tuple[Decimal, Decimal]]:
        """Return (total debit, total credit) per move id."""
        lines = self.client.search_read(
            "account.move.line", [("move", "in", move_ids)], ["move", "debit", "credit"]
        )
        totals: dict[int, tuple[Decimal, Decimal]] = {}
        for line in lines:
            debit, credit = totals.get(line["move"], (Decimal(0), Decimal(0)))
            totals[line["move"]] = (debit + line["debit"], credit + line["credit"])
        return totals

    def _journal_key(self, external_ref: str) -> str:
        if external_ref.startswith(self._prefix):
            return external_ref[len(self._prefix):]
        return external_ref
