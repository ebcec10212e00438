"""External keys on stock moves, and issuing supply moves over RPC.

A ``stock.move`` out of a storage location must be assigned before it can
be done, and Tryton 8.2 exposes neither ``assign`` nor ``assign_try`` over
RPC (its ``do`` button is read-only on a draft move that needs assignation).
:meth:`Move.issue` runs both on the server in the RPC call's transaction,
so a batch of issues is assigned and done, or nothing changes.
"""

from trytond.exceptions import UserError
from trytond.i18n import gettext
from trytond.pool import Pool, PoolMeta
from trytond.rpc import RPC
from trytond.transaction import Transaction

from .external import ExternalRefMixin


class Move(ExternalRefMixin, metaclass=PoolMeta):
    __name__ = "stock.move"

    @classmethod
    def __setup__(cls):
        super().__setup__()
        cls.__rpc__.update({"issue": RPC(readonly=False, instantiate=0)})

    @classmethod
    def issue(cls, moves):
        """Assign and do ``moves``; raise a UserError if stock is short.

        Moves already done are left alone, so a repeated call is harmless.
        Assignation uses the stock on hand at the moves' source locations and
        their children. A move that cannot be fully assigned fails the whole
        call instead of being split.
        """
        # Like a button: check the caller may write moves, then run the
        # workflow without per-field access checks (state is read-only).
        Pool().get("ir.model.access").check(cls.__name__, "write")
        with Transaction().set_context(_check_access=False):
            cls._issue(cls.browse([m.id for m in moves]))

    @classmethod
    def _issue(cls, moves):
        pending = [m for m in moves if m.state != "done"]
        wrong = [m for m in pending if m.state not in {"draft", "staging", "assigned"}]
        if wrong:
            raise UserError(
                gettext(
                    "carebridge.msg_issue_wrong_state",
                    moves=", ".join(m.rec_name for m in wrong[:5]),
                )
            )
        drafts = [m for m in pending if m.state in {"draft", "staging"}]
        if drafts and not cls.assign_try(drafts, grouping=("product",)):
            short = [m for m in cls.browse(drafts) if m.state != "assigned"]
            raise UserError(
                gettext(
                    "carebridge.msg_issue_insufficient_stock",
                    moves=", ".join(m.rec_name for m in short[:5]),
                )
            )
        cls.do(cls.browse([m.id for m in pending]))
