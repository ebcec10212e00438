"""External keys on journal entries and invoices."""

from trytond.pool import PoolMeta

from .external import ExternalRefMixin


class Move(ExternalRefMixin, metaclass=PoolMeta):
    __name__ = "account.move"


class Invoice(ExternalRefMixin, metaclass=PoolMeta):
    __name__ = "account.invoice"
