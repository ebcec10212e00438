"""External keys on purchase orders."""

from trytond.pool import PoolMeta

from .external import ExternalRefMixin


class Purchase(ExternalRefMixin, metaclass=PoolMeta):
    __name__ = "purchase.purchase"
