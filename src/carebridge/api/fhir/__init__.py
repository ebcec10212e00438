"""FHIR R4 REST under ``/fhir``: resources and Bundles in, stored as messages.

Modules: :mod:`.routes` (HTTP), :mod:`.interactions` and :mod:`.bundles`
(create, update, read, search, transaction, batch), :mod:`.writes` (one
database transaction per write), :mod:`.repository` (queries),
:mod:`.validation`, :mod:`.resources` (types, ids, exact-decimal JSON) and
:mod:`.capability`.
"""

from carebridge.api.fhir.routes import router

__all__ = ["router"]
