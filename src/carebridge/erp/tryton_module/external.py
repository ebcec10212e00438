"""The ``external_ref`` field shared by every model of this module."""

from trytond.model import Index, Unique, fields


class ExternalRefMixin:
    """A per-company unique key set by the system that created the record."""

    __slots__ = ()

    external_ref = fields.Char(
        "External Reference",
        strip=False,
        help="The key the sending system gave this record; unique per company.",
    )

    @classmethod
    def __setup__(cls):
        super().__setup__()
        table = cls.__table__()
        cls._sql_constraints += [
            (
                "external_ref_unique",
                Unique(table, table.company, table.external_ref),
                "carebridge.msg_external_ref_unique",
            ),
        ]
        cls._sql_indexes.add(Index(table, (table.external_ref, Index.Equality())))

    @classmethod
    def copy(cls, records, default=None):
        # A copy is a new document (a reversal, a duplicate made by hand),
        # not the one the sending system posted.
        default = dict(default) if default else {}
        default.setdefault("external_ref", None)
        return super().copy(records, default=default)
