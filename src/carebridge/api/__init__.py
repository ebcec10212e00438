"""The HTTP API: FHIR R4 intake and the operations API (see :mod:`carebridge.api.app`)."""
